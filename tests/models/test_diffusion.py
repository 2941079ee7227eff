import time

import pytest
import torch

from bids_cadiff.models.config import DiffusionConfig, ModelConfig
from bids_cadiff.models.diffusion import CADiff, alpha_bar_schedule, ddim_timesteps
from tests.models.synthetic import dice, nested_shapes


def tiny(mode="collaborative", dims=3, **diffusion):
    return CADiff(
        ModelConfig(spatial_dims=dims, num_classes=3, channels=(4, 8), time_embed_dim=16, mode=mode),
        DiffusionConfig(**diffusion),
    )


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_starts_clean_and_decreases(schedule):
    ab = alpha_bar_schedule(schedule, 1000)
    assert ab.shape == (1001,) and ab[0] == 1.0
    assert (ab[1:] < ab[:-1]).all() and ab[-1] < 0.01


def test_ddim_timesteps():
    assert ddim_timesteps(1000, 5) == [1000, 800, 600, 400, 200, 0]
    assert ddim_timesteps(10, 1) == [10, 0]
    with pytest.raises(ValueError):
        ddim_timesteps(10, 0)


def test_q_sample_endpoints():
    model = tiny()
    x0, noise = torch.ones(2, 3, 4, 4, 4), torch.randn(2, 3, 4, 4, 4)
    torch.testing.assert_close(model.q_sample(x0, torch.tensor([0, 0]), noise), x0)
    far = model.q_sample(x0, torch.tensor([1000, 1000]), noise)
    assert torch.allclose(far, noise, atol=0.02)


def test_sampling_calls_network_s_times_and_is_deterministic():
    model = tiny().eval()
    calls = []
    model.denoiser.register_forward_hook(lambda m, i, o: calls.append(int(i[4][0])))
    image, dist, _ = nested_shapes(1, 8)
    a = model.sample(image, dist, steps=4, generator=torch.Generator().manual_seed(3))
    assert calls == [1000, 750, 500, 250]
    b = model.sample(image, dist, steps=4, generator=torch.Generator().manual_seed(3))
    c = model.sample(image, dist, steps=4, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(a.sum(1), torch.ones(1, 8, 8, 8))


@pytest.mark.parametrize("mode", ["diffusion", "dual", "collaborative"])
@pytest.mark.parametrize(
    "diffusion", [{"consistency_loss": False}, {"similarity": "cosine"}, {"similarity": "dice"}]
)
@pytest.mark.parametrize("taca", [True, False])
def test_each_ablation_trains_a_step_and_samples(mode, diffusion, taca):
    model = CADiff(
        ModelConfig(spatial_dims=3, num_classes=3, channels=(4, 8), time_embed_dim=16,
                    mode=mode, taca=taca),
        DiffusionConfig(**diffusion),
    )
    image, dist, labels = nested_shapes(2, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = model.training_losses(image, dist, labels)
    assert ("mse" in losses) == (mode == "collaborative")
    # L_sac fits the predicted field: only the collaborative mode has one to train
    trains_sac = diffusion.get("consistency_loss", True) and mode == "collaborative"
    assert ("sac" in losses) == trains_sac == ("sim_d" in losses) == ("sim_m" in losses)
    before = [p.detach().clone() for p in model.parameters()]
    losses["loss"].backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    probs = model.eval().sample(image, dist if mode != "diffusion" else None, steps=2)
    assert probs.shape == (2, 3, 8, 8, 8)


def test_two_d_training_and_sampling():
    model = tiny(dims=2)
    image, dist, labels = nested_shapes(2, 12, spatial_dims=2)
    model.training_losses(image, dist, labels)["loss"].backward()
    assert model.eval().sample(image, dist).shape == (2, 3, 12, 12)


def test_tiny_model_learns_nested_shapes_within_a_minute():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = CADiff(
        ModelConfig(spatial_dims=3, num_classes=3, channels=(8, 16), time_embed_dim=32),
        DiffusionConfig(),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    start = time.monotonic()
    for _ in range(300):
        image, dist, labels = nested_shapes(2, 16, generator=gen)
        loss = model.training_losses(image, dist, labels, generator=gen)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    image, dist, labels = nested_shapes(2, 16, generator=torch.Generator().manual_seed(99))
    pred = model.eval().sample(image, dist, generator=torch.Generator().manual_seed(1))
    pred = pred.argmax(1, keepdim=True)
    elapsed = time.monotonic() - start
    scores = [dice(pred, labels, k) for k in (1, 2)]
    assert min(scores) > 0.9, scores
    assert elapsed < 60, f"took {elapsed:.0f} s"


def test_timestep_fractions_weight_the_inference_cases():
    model = tiny(t_m_max_fraction=0.5, t_d_zero_fraction=0.75)
    gen = torch.Generator().manual_seed(0)
    t_m = model._draw_timesteps(4000, 1000, 0.5, torch.device("cpu"), gen)
    t_d = model._draw_timesteps(4000, 0, 0.75, torch.device("cpu"), gen)
    assert 0.45 < float((t_m == 1000).float().mean()) < 0.55
    assert 0.72 < float((t_d == 0).float().mean()) < 0.78
    assert t_m.min() >= 0 and t_m.max() <= 1000 and t_d.max() <= 1000


def test_zero_fractions_keep_the_uniform_random_stream():
    """Fraction 0 makes one draw only, so recipes trained before the option reproduce."""
    model = tiny()
    a = model._draw_timesteps(16, 1000, 0.0, torch.device("cpu"), torch.Generator().manual_seed(1))
    b = torch.randint(0, 1001, (16,), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_timestep_fractions_validated(value):
    with pytest.raises(ValueError, match="t_m_max_fraction"):
        DiffusionConfig(t_m_max_fraction=value)


def test_weighted_recipe_trains_a_step():
    model = tiny(t_m_max_fraction=0.5, t_d_zero_fraction=0.5, batch_dice=True)
    image, dist, labels = nested_shapes(2, 8)
    losses = model.training_losses(image, dist, labels, generator=torch.Generator().manual_seed(0))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    assert DiffusionConfig.from_dict(model.diffusion_config.to_dict()) == model.diffusion_config
