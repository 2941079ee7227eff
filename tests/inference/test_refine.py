"""The intensity refinement: a coarse spatial prior and fine intensities → a sharper posterior."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_cadiff.inference.refine import RefineSettings, refine_posterior
from bids_cadiff.inference.resample import (
    field_to_grid,
    probabilities_to_grid,
    refined_labels_on_grid,
)


def blurred_two_tissue(n: int = 400, boundary: int = 200, offset: int = 25, seed: int = 0):
    """1-D line: background, then tissue 1 up to ``boundary``, then tissue 2; the prior puts
    the 1/2 boundary ``offset`` voxels too far and blurs it, as a coarse grid does."""
    rng = np.random.default_rng(seed)
    pos = np.arange(n)
    truth = np.where(pos < boundary, 1, 2)
    truth[:20] = 0
    x = np.choose(truth, [0.1, 1.0, 2.0]) + rng.normal(0, 0.08, n)
    p1 = 1 / (1 + np.exp((pos - boundary - offset) / 15.0))
    bg = np.where(pos < 20, 0.9, 0.01)
    prior = np.stack([bg, (1 - bg) * p1, (1 - bg) * (1 - p1)]).astype(np.float32)
    return prior, x.astype(np.float32), truth


def test_refinement_moves_a_misplaced_boundary_to_the_intensity_edge():
    prior, x, truth = blurred_two_tissue()
    before = int((prior.argmax(0) != truth).sum())
    post = refine_posterior(prior, x)
    after = int((post.argmax(0) != truth).sum())
    assert before >= 20 and after <= 2
    np.testing.assert_allclose(post.sum(0), prior.sum(0), rtol=1e-5)


def test_refinement_is_invariant_to_intensity_scale_and_deterministic():
    prior, x, _ = blurred_two_tissue()
    a = refine_posterior(prior, x)
    np.testing.assert_allclose(refine_posterior(prior, x * 1000.0 + 5.0), a, atol=1e-4)
    np.testing.assert_array_equal(refine_posterior(prior, x), a)


def test_confident_background_and_zero_iterations_are_left_alone():
    prior, x, _ = blurred_two_tissue()
    prior[:, :10] = [[1.0], [0.0], [0.0]]
    post = refine_posterior(prior, x)
    np.testing.assert_array_equal(post[:, :10], prior[:, :10])
    np.testing.assert_array_equal(refine_posterior(prior, x, RefineSettings(iterations=0)), prior)


def test_subsampled_fit_gives_the_same_labels():
    prior, x, _ = blurred_two_tissue(n=4000, boundary=2000, offset=100)
    full = refine_posterior(prior, x).argmax(0)
    sub = refine_posterior(prior, x, max_fit_voxels=500, chunk=777).argmax(0)
    assert (full != sub).mean() < 0.005


@pytest.mark.parametrize(
    "kwargs", [{"iterations": -1}, {"prior_weight": 0}, {"background_components": 0},
               {"min_std_fraction": 1.5}, {"active_threshold": 0}],
)
def test_invalid_settings(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RefineSettings(**kwargs)


def test_shape_errors():
    with pytest.raises(ValueError, match="prior"):
        refine_posterior(np.ones((1, 5)), np.ones(5))
    with pytest.raises(ValueError, match="intensity"):
        refine_posterior(np.ones((3, 5)) / 3, np.ones(4))


def cube_case(seed: int = 0):
    """A 2 mm grid with a coarse prior of a cube, and a 1 mm image of the true cube."""
    rng = np.random.default_rng(seed)
    fine = np.zeros((40, 40, 40), dtype=np.float32)
    truth = np.zeros(fine.shape, dtype=np.int16)
    truth[9:31, 11:29, 10:30] = 1
    fine[truth == 1] = 100.0
    fine += rng.normal(0, 4, fine.shape).astype(np.float32)
    fine_affine = np.eye(4)
    coarse_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    coarse_affine[:3, 3] = 0.5  # 2 mm voxel centres between the 1 mm ones
    onehot = np.zeros((2, 20, 20, 20), dtype=np.float32)
    onehot[1, 4:16, 5:15, 5:15] = 1  # the coarse guess: off by a voxel or two
    onehot[0] = 1 - onehot[1]
    return torch.from_numpy(onehot), coarse_affine, fine, fine_affine, truth


def test_refined_labels_on_grid_beat_the_plain_argmax():
    probs, coarse_affine, fine, fine_affine, truth = cube_case()
    plain = probabilities_to_grid(probs, coarse_affine, fine.shape, fine_affine)
    refined = refined_labels_on_grid(probs, coarse_affine, fine, fine_affine, RefineSettings())
    assert refined.shape == plain.shape == truth.shape and refined.dtype == np.int16

    def dice(a):
        return 2 * ((a == 1) & (truth == 1)).sum() / ((a == 1).sum() + (truth == 1).sum())

    assert dice(plain) < 0.93 and dice(refined) > 0.99


def test_field_to_grid_interpolates_and_fills_outside():
    field = np.arange(8, dtype=np.float32).reshape(2, 2, 2) + 1
    src = np.diag([2.0, 2.0, 2.0, 1.0])
    out = field_to_grid(field, src, (5, 5, 5), np.eye(4), fill=-1.0)
    assert out[0, 0, 0] == pytest.approx(1.0)
    assert out[2, 2, 2] == pytest.approx(field[1, 1, 1])
    assert out[1, 0, 0] == pytest.approx((field[0, 0, 0] + field[1, 0, 0]) / 2)
    assert out[4, 4, 4] == -1.0


def test_chunked_posterior_is_the_whole_posterior_also_from_half_precision():
    from bids_cadiff.inference.refine import refine_posterior_chunks

    prior, x, _ = blurred_two_tissue(n=3000, boundary=1500, offset=60)
    want = refine_posterior(prior, x).argmax(0)
    labels = np.full(3000, -1)
    for cols, post in refine_posterior_chunks(prior, x, chunk=500):
        labels[cols] = post.argmax(0)
    np.testing.assert_array_equal(labels, want)
    half = refine_posterior(prior.astype(np.float16), x).argmax(0)
    assert (half != want).mean() < 0.002


def test_resampling_is_confined_to_the_box_the_source_reaches():
    from bids_cadiff.inference.resample import source_box

    probs, coarse_affine, fine, fine_affine, truth = cube_case()
    # the same coarse grid inside a larger destination, shifted: same labels, moved
    big = np.zeros((70, 60, 50), np.float32)
    big[10:50, 5:45, 3:43] = fine
    shifted = fine_affine.copy()
    shifted[:3, 3] = [-10, -5, -3]
    box = source_box(tuple(probs.shape[1:]), coarse_affine, big.shape, shifted)
    assert box[0].start <= 10 and box[0].stop >= 50 and box[0].stop < 70
    plain = probabilities_to_grid(probs, coarse_affine, big.shape, shifted)
    np.testing.assert_array_equal(
        plain[10:50, 5:45, 3:43], probabilities_to_grid(probs, coarse_affine, fine.shape, fine_affine))
    assert plain.sum() == plain[10:50, 5:45, 3:43].sum()
    refined = refined_labels_on_grid(probs, coarse_affine, big, shifted, RefineSettings())
    np.testing.assert_array_equal(
        refined[10:50, 5:45, 3:43],
        refined_labels_on_grid(probs, coarse_affine, fine, fine_affine, RefineSettings()))


@pytest.mark.parametrize("ratio", [2.0, 5.0, 6.0])
def test_source_box_keeps_every_voxel_the_full_grid_would_label(ratio):
    """Against the full destination grid (no box): coarse voxels much larger than the fine
    ones, and an oblique (rotated) source grid."""
    from bids_cadiff.inference import resample

    probs = torch.zeros(2, 5, 4, 6)
    probs[1] = 1.0  # foreground everywhere on the source grid
    theta = np.deg2rad(20)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    src = np.eye(4)
    src[:3, :3] = rot * ratio
    src[:3, 3] = [40.0, 35.0, 20.0]
    dst_shape = (90, 90, 60)
    boxed = probabilities_to_grid(probs, src, dst_shape, np.eye(4))
    full_box = (slice(0, 90), slice(0, 90), slice(0, 60))
    original = resample.source_box
    try:
        resample.source_box = lambda *a: full_box
        full = probabilities_to_grid(probs, src, dst_shape, np.eye(4))
    finally:
        resample.source_box = original
    assert full.sum() > 0
    np.testing.assert_array_equal(boxed, full)


def test_a_class_without_mass_keeps_its_prior_and_a_weaker_prior_trusts_the_image_more():
    prior, x, truth = blurred_two_tissue()
    with_empty = np.concatenate([prior, np.zeros((1, prior.shape[1]), np.float32)])
    post = refine_posterior(with_empty, x)
    assert np.isfinite(post).all() and post[3].max() < 1e-5
    np.testing.assert_array_equal(post[:3].argmax(0), refine_posterior(prior, x).argmax(0))
    # a prior that is sure of the wrong boundary: at full weight it holds some voxels, at
    # weight 0.3 the intensities take them back
    sure = prior.copy()
    sure[1:, 200:225] = [[0.999], [0.001]]
    sure[1:] *= (1 - sure[0])
    full = (refine_posterior(sure, x).argmax(0) != truth).sum()
    weak = (refine_posterior(sure, x, RefineSettings(prior_weight=0.3)).argmax(0) != truth).sum()
    assert weak < full


def test_non_finite_intensities_are_refused():
    prior, x, _ = blurred_two_tissue()
    x[5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        refine_posterior(prior, x)
