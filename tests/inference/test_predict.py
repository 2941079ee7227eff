import pytest
import torch

from bids_cadiff.inference.predict import (
    SlidingWindowSettings,
    predict_ensemble,
    predict_probabilities,
    resolve_device,
)
from bids_cadiff.models.config import DiffusionConfig, ModelConfig
from bids_cadiff.models.diffusion import CADiff
from tests.models.synthetic import nested_shapes


@pytest.fixture
def model():
    torch.manual_seed(0)
    return CADiff(
        ModelConfig(spatial_dims=3, num_classes=3, channels=(4, 8), time_embed_dim=16),
        DiffusionConfig(),
    ).eval()


def test_sliding_window_whole_volume_is_seeded(model):
    image, dist, _ = nested_shapes(1, 13)
    window = SlidingWindowSettings(roi_size=(8, 8, 8), overlap=0.25)
    a = predict_probabilities(model, image, dist, window=window, steps=2, seed=5)
    b = predict_probabilities(model, image, dist, window=window, steps=2, seed=5)
    c = predict_probabilities(model, image, dist, window=window, steps=2, seed=6)
    assert a.shape == (1, 3, 13, 13, 13)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(a.sum(1), torch.ones(1, 13, 13, 13), atol=1e-4, rtol=1e-4)


def test_single_window_equals_direct_sampling(model):
    image, dist, _ = nested_shapes(1, 8)
    window = SlidingWindowSettings(roi_size=(8, 8, 8), overlap=0.0)
    out = predict_probabilities(model, image, dist, window=window, steps=3, seed=1)
    noise = torch.randn((1, 3, 8, 8, 8), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, model.sample(image, dist, steps=3, noise=noise))


def test_ensemble_uncertainty(model):
    image, dist, _ = nested_shapes(1, 8)
    window = SlidingWindowSettings(roi_size=(8, 8, 8))
    mean, unc = predict_ensemble(model, image, dist, window=window, seeds=[0, 1, 2], steps=2)
    assert mean.shape == (1, 3, 8, 8, 8) and unc.shape == (1, 1, 8, 8, 8)
    assert float(unc.min()) >= 0 and float(unc.max()) <= 2 / 3 + 1e-6
    _, same = predict_ensemble(model, image, dist, window=window, seeds=[4, 4], steps=2)
    assert float(same.max()) == 0.0


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="--device cpu"):
            resolve_device("cuda")


def test_predict_volume_2d_model_slice_by_slice():
    from bids_cadiff.inference.predict import predict_volume

    torch.manual_seed(0)
    model = CADiff(
        ModelConfig(spatial_dims=2, num_classes=3, channels=(4, 8), time_embed_dim=16),
        DiffusionConfig(),
    ).eval()
    image, dist, _ = nested_shapes(1, 10)
    probs = predict_volume(model, image[0, 0].numpy(), dist[0].numpy(), patch_size=(8, 8),
                           steps=2, seed=3, slice_axis=1)
    assert probs.shape == (3, 10, 10, 10)
    torch.testing.assert_close(probs.sum(0), torch.ones(10, 10, 10), atol=1e-4, rtol=1e-4)
    # slice i along axis 1 is the 2D prediction of that slice with seed 3 + i
    window = SlidingWindowSettings(roi_size=(8, 8))
    one = predict_probabilities(model, image[:, :, :, 4], dist[:, :, :, 4], window=window,
                                steps=2, seed=7)
    torch.testing.assert_close(probs[:, :, 4], one[0])
