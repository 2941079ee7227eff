import pytest
import torch

from bids_cadiff.models.config import ModelConfig
from bids_cadiff.models.denoiser import CADiffDenoiser


def _inputs(cfg: ModelConfig, shape, batch=2):
    image = torch.rand(batch, 1, *shape)
    dist = torch.rand(batch, 3, *shape) * 2 - 1 if cfg.uses_distance_field else None
    labels = torch.randn(batch, cfg.num_classes, *shape)
    t_d = torch.tensor([0, 700][:batch])
    t_m = torch.tensor([1000, 30][:batch])
    return image, dist, labels, t_d, t_m


@pytest.mark.parametrize(
    "dims,shape", [(3, (9, 10, 11)), (3, (17, 13, 7)), (2, (21, 19)), (2, (8, 33))]
)
def test_shapes_odd_sizes(dims, shape):
    cfg = ModelConfig(spatial_dims=dims, num_classes=5, channels=(4, 8, 16))
    net = CADiffDenoiser(cfg)
    d0, logits = net(*_inputs(cfg, shape))
    assert d0.shape == (2, 3, *shape)
    assert logits.shape == (2, 5, *shape)


@pytest.mark.parametrize("dims", [2, 3])
def test_every_parameter_receives_a_gradient(dims):
    cfg = ModelConfig(spatial_dims=dims, num_classes=3, channels=(4, 8), num_res_blocks=2)
    net = CADiffDenoiser(cfg)
    d0, logits = net(*_inputs(cfg, (7,) * dims))
    (d0.square().mean() + logits.square().mean()).backward()
    names = dict(net.named_parameters())
    assert any("skip_fusion.0.convs" in n for n in names)  # TACA's kernel bank is there
    assert any("time_d" in n for n in names) and any("time_m" in n for n in names)
    missing = [n for n, p in names.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_changing_either_timestep_changes_output():
    torch.manual_seed(0)
    cfg = ModelConfig(spatial_dims=3, num_classes=3, channels=(4, 8))
    net = CADiffDenoiser(cfg).eval()
    image, dist, labels, _, _ = _inputs(cfg, (6, 7, 8), batch=1)
    t = torch.tensor([300])
    with torch.no_grad():
        base_d, base_m = net(image, dist, labels, t, t)
        for t_d, t_m in [(torch.tensor([301]), t), (t, torch.tensor([301]))]:
            d, m = net(image, dist, labels, t_d, t_m)
            assert not torch.allclose(d, base_d)
            assert not torch.allclose(m, base_m)


@pytest.mark.parametrize("mode", ["diffusion", "dual", "collaborative"])
@pytest.mark.parametrize("taca", [True, False])
def test_ablation_architectures(mode, taca):
    cfg = ModelConfig(spatial_dims=3, num_classes=3, channels=(4, 8), mode=mode, taca=taca)
    net = CADiffDenoiser(cfg)
    d0, logits = net(*_inputs(cfg, (5, 6, 7)))
    assert (d0 is not None) == (mode == "collaborative")
    assert logits.shape == (2, 3, 5, 6, 7)
    assert any("skip_fusion" in n for n, _ in net.named_parameters()) == taca


def test_missing_distance_field_is_a_clear_error():
    cfg = ModelConfig(spatial_dims=2, num_classes=3, channels=(4, 8))
    image, _, labels, t_d, t_m = _inputs(cfg, (8, 8))
    with pytest.raises(ValueError, match="distance field"):
        CADiffDenoiser(cfg)(image, None, labels, t_d, t_m)


def test_config_validation():
    with pytest.raises(ValueError, match="spatial_dims"):
        ModelConfig(spatial_dims=4)
    with pytest.raises(ValueError, match="mode"):
        ModelConfig(mode="triple")
    with pytest.raises(ValueError, match="odd"):
        ModelConfig(taca_kernel_sizes=(4,))
    assert ModelConfig.from_dict(ModelConfig().to_dict()) == ModelConfig()
