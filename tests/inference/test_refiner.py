"""Running the 1 mm refiner: grid geometry, normalisation, and the whole path onto a T1w grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_cadiff.inference.refiner import (
    active_box,
    fine_grid,
    refine_probabilities,
    refiner_image,
    upsample_probabilities,
    upsampling_factor,
)
from bids_cadiff.inference.resample import field_to_grid, posterior_on_grid
from bids_cadiff.models.refiner import Refiner, RefinerConfig

COARSE = np.array([[2.0, 0, 0, -40], [0, 2.0, 0, -50], [0, 0, 2.0, -30], [0, 0, 0, 1]])


def test_fine_voxels_split_each_coarse_voxel_evenly() -> None:
    shape, affine = fine_grid((3, 4, 5), COARSE, 2)
    assert shape == (6, 8, 10)
    assert np.allclose(np.linalg.norm(affine[:3, :3], axis=0), 1.0)
    # the 8 fine voxels of coarse voxel (1, 2, 3) average to its centre
    corners = np.array([[2 + a, 4 + b, 6 + c, 1] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    centre = (COARSE @ [1, 2, 3, 1])[:3]
    assert np.allclose((corners @ affine.T)[:, :3].mean(0), centre)


def test_upsampling_agrees_with_resampling_onto_the_fine_grid() -> None:
    x = np.arange(6, dtype=np.float32)
    ramp = np.broadcast_to(x[:, None, None], (6, 6, 6)).astype(np.float32)
    probs = torch.from_numpy(np.stack([ramp / 5, 1 - ramp / 5]))
    shape, affine = fine_grid((6, 6, 6), COARSE, 2)
    fine = upsample_probabilities(probs, 2)
    reference = field_to_grid(ramp / 5, COARSE, shape, affine)
    inner = (slice(1, -1),) * 3  # away from the edges, where the two pad differently
    assert np.allclose(fine[0].numpy()[inner], reference[inner], atol=1e-5)
    assert torch.allclose(fine.sum(0), torch.ones(shape))


def test_the_factor_must_be_an_integer() -> None:
    assert upsampling_factor(COARSE, 1.0) == 2
    with pytest.raises(ValueError, match="integer multiple"):
        upsampling_factor(COARSE, 0.8)


def test_refiner_image_scales_the_brain_to_one() -> None:
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 200, (10, 10, 10)).astype(np.float32)
    brain = np.zeros(image.shape, bool)
    brain[2:8, 2:8, 2:8] = True
    out = refiner_image(image, brain)
    assert out.min() >= 0 and out.max() == 1
    assert np.isclose(np.percentile(out[brain], 99), 1.0, atol=0.01)
    assert np.allclose(out * np.percentile(image[brain], 99), np.minimum(image, np.percentile(image[brain], 99)), rtol=1e-4)
    assert not refiner_image(image, np.zeros_like(brain)).any()


def test_active_box_covers_the_structures_with_even_sides() -> None:
    probs = torch.zeros(2, 20, 20, 20)
    probs[0] = 1
    probs[0, 5:8, 6:9, 7:12] = 0.2
    probs[1] = 1 - probs[0]
    box = active_box(probs, margin=1, multiple=2)
    assert all((s.stop - s.start) % 2 == 0 for s in box)
    assert box[0].start <= 4 and box[0].stop >= 9 and box[2].start <= 6 and box[2].stop >= 13


def test_an_untrained_refiner_keeps_the_coarse_labels_on_the_t1w_grid() -> None:
    """End to end with an identity refiner: the labels on an oblique 1 mm T1w grid are those
    of resampling the coarse probabilities directly (up to ties at boundaries)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    labels = np.zeros((16, 16, 16), np.int64)
    labels[4:12, 4:12, 4:12] = 1
    labels[6:10, 6:10, 7:11] = 2
    probs = torch.from_numpy(np.eye(3, dtype=np.float32)[labels].transpose(3, 0, 1, 2)) * 0.9 + 0.1 / 3
    t = np.deg2rad(10)
    t1_affine = np.array([[np.cos(t), -np.sin(t), 0, -36], [np.sin(t), np.cos(t), 0, -46],
                          [0, 0, 1, -26], [0, 0, 0, 1]])
    shape = (28, 28, 28)
    intensity = rng.uniform(50, 100, shape).astype(np.float32)
    refiner = Refiner(RefinerConfig(num_classes=3, channels=(4, 8, 8), squeeze=2))
    fine, fine_affine = refine_probabilities(refiner, probs, COARSE, intensity, t1_affine, window=16)
    assert torch.allclose(fine.sum(0), torch.ones(fine.shape[1:]), atol=1e-4)
    via_refiner = posterior_on_grid(fine, fine_affine, shape, t1_affine).labels
    direct = posterior_on_grid(probs, COARSE, shape, t1_affine).labels
    assert (via_refiner == direct).mean() > 0.97
    assert {0, 1, 2} <= set(np.unique(via_refiner))


def test_structures_the_coarse_probabilities_rule_out_stay_out() -> None:
    """A trained refiner's floor must not leak every structure into the box: where the coarse
    probability of a class is 0, so is the refined one (soft volumes stay honest)."""
    torch.manual_seed(0)
    labels = np.zeros((12, 12, 12), np.int64)
    labels[3:9, 3:9, 3:9] = 1
    probs = torch.from_numpy(np.eye(3, dtype=np.float32)[labels].transpose(3, 0, 1, 2))
    refiner = Refiner(RefinerConfig(num_classes=3, channels=(4, 8, 8), squeeze=2))
    torch.nn.init.normal_(refiner.head.weight, std=1.0)
    intensity = np.random.default_rng(0).uniform(0, 1, (24, 24, 24)).astype(np.float32)
    fine, _ = refine_probabilities(refiner, probs, COARSE, intensity, COARSE, window=16)
    assert float(fine[2].max()) == 0.0  # class 2 is nowhere in the coarse probabilities
    assert torch.allclose(fine.sum(0), torch.ones(fine.shape[1:]), atol=1e-4)


def _float32_reference(refiner, probs, intensity, window):  # noqa: ANN001, ANN202
    """The refinement as it was first written: every input channel in float32, stacked, as
    MONAI's input (the coarse grid is the whole box here)."""
    from monai.inferers import sliding_window_inference

    shape, affine = fine_grid(tuple(probs.shape[1:]), COARSE, 2)
    fine = upsample_probabilities(probs, 2)
    image = refiner_image(field_to_grid(intensity, COARSE, shape, affine), (fine[0] < 0.5).numpy())
    stacked = torch.cat([torch.from_numpy(image)[None], fine])[None]

    def predictor(x: torch.Tensor) -> torch.Tensor:
        out = torch.softmax(refiner(x), dim=1) * (x[:, 1:] > refiner.config.prob_floor)
        return out / out.sum(dim=1, keepdim=True).clamp_min(1e-12)

    size = [min(window, int(np.ceil(n / 4) * 4)) for n in shape]
    with torch.no_grad():
        out = sliding_window_inference(stacked, roi_size=size, sw_batch_size=1,
                                       predictor=predictor, overlap=0.25, mode="gaussian",
                                       padding_mode="constant")[0]
    return out / out.sum(dim=0, keepdim=True)


@pytest.mark.parametrize("coarse, window", [(10, 8), (9, 24)])
def test_half_precision_classes_give_the_float32_result(coarse: int, window: int) -> None:
    """The class channels travel in float16 as MONAI's `condition`, cut with the image into
    windows: the result is the all-float32 one (to float16 rounding), with many windows (10³
    coarse, 8³ windows) and with a box smaller than one window (9³ coarse: 18³ fine, padded
    to 20³)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    logits = torch.from_numpy(rng.normal(0, 2, (3, coarse, coarse, coarse)).astype(np.float32))
    probs = torch.softmax(logits, dim=0)
    refiner = Refiner(RefinerConfig(num_classes=3, channels=(4, 8, 8), squeeze=2))
    torch.nn.init.normal_(refiner.head.weight, std=0.5)
    intensity = rng.uniform(0, 100, (2 * coarse,) * 3).astype(np.float32)
    windowed, _ = refine_probabilities(refiner, probs, COARSE, intensity, COARSE, window=window)
    reference = _float32_reference(refiner, probs, intensity, window)
    assert windowed.dtype == torch.float32 and windowed.shape == reference.shape
    assert torch.allclose(windowed, reference, atol=2e-3)
    # and a different window really changes the result near seams: the test can see them
    if window < 2 * coarse:
        other = _float32_reference(refiner, probs, intensity, 2 * coarse)
        assert not torch.allclose(other, reference, atol=2e-3)
