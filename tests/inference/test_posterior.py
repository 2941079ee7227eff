"""The final posterior on the T1w's own grid, summarised block by block."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_cadiff.inference.posterior import PROBABILITY_SCALE, GridPosterior, temper
from bids_cadiff.inference.refine import RefineSettings, refine_posterior, refine_posterior_chunks
from bids_cadiff.inference.resample import posterior_on_grid

SRC = np.diag([2.0, 2.0, 2.0, 1.0])
SRC[:3, 3] = [3, 4, 5]
SHAPE = (30, 32, 28)


def _probs(seed: int = 0, classes: int = 5) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.normal(size=(classes, 12, 13, 11)).astype(np.float32) * 3).softmax(0)


def test_blocks_fill_labels_confidence_and_soft_counts():
    post = GridPosterior.empty((2, 2, 2), 3, keep_probabilities=True)
    p = np.array([[0.1, 0.6], [0.7, 0.3], [0.2, 0.1]], np.float32)  # two voxels
    post.add(np.array([0, 7]), p)
    assert post.labels.ravel().tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    np.testing.assert_allclose(post.confidence.ravel()[[0, 1, 7]], [0.7, 1.0, 0.6])
    np.testing.assert_allclose(post.soft_counts, [6 + 0.1 + 0.6, 1.0, 0.3], rtol=1e-6)
    assert post.soft_counts.sum() == pytest.approx(8)
    np.testing.assert_array_equal(post.probabilities.reshape(-1, 3)[0], [26, 178, 51])
    np.testing.assert_allclose(post.uncertainty().ravel()[[0, 1, 7]], [0.3, 0.0, 0.4], atol=1e-6)


def test_columns_at_the_grid_edge_are_renormalised_keeping_their_argmax():
    post = GridPosterior.empty((1, 1, 2), 2)
    post.add(np.array([1]), np.array([[0.2], [0.5]], np.float32))  # sums to 0.7
    assert post.labels.ravel().tolist() == [0, 1]
    assert post.confidence.ravel()[1] == pytest.approx(0.5 / 0.7)
    assert post.soft_counts.sum() == pytest.approx(2)


@pytest.mark.parametrize("refine", [False, True])
def test_posterior_on_grid_sums_to_one_per_voxel(refine):
    probs = _probs()
    intensity = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
    post = posterior_on_grid(
        probs, SRC, SHAPE, np.eye(4), intensity=intensity if refine else None,
        settings=RefineSettings() if refine else None, keep_probabilities=True,
    )
    assert post.soft_counts.sum() == pytest.approx(np.prod(SHAPE), rel=1e-6)
    stored = post.probabilities.astype(np.float64) / PROBABILITY_SCALE
    assert np.abs(stored.sum(axis=-1) - 1).max() < 0.1  # uint8 rounding of up to 5 classes
    # argmax and confidence agree with the stored probabilities (to their rounding)
    assert (stored.argmax(-1) == post.labels).mean() > 0.99
    np.testing.assert_allclose(stored.max(-1), post.confidence, atol=1 / PROBABILITY_SCALE)


def test_refine_posterior_chunks_cover_every_column_once_as_refine_posterior():
    rng = np.random.default_rng(2)
    prior = rng.dirichlet(np.ones(4), size=5000).T.astype(np.float32)
    prior[:, :1000] = [[1.0], [0.0], [0.0], [0.0]]  # inactive (background) columns
    x = rng.normal(size=5000).astype(np.float32)
    whole = refine_posterior(prior, x, chunk=700)
    seen = np.zeros(5000, int)
    for cols, post in refine_posterior_chunks(prior, x, chunk=700):
        seen[cols] += 1
        np.testing.assert_allclose(post, whole[:, cols], atol=1e-6)
    assert (seen == 1).all()


def test_temperature_softens_confidence_but_keeps_labels():
    probs = _probs(3)
    sharp = posterior_on_grid(probs, SRC, SHAPE, np.eye(4))
    soft = posterior_on_grid(probs, SRC, SHAPE, np.eye(4), temperature=2.0)
    np.testing.assert_array_equal(sharp.labels, soft.labels)
    inside = sharp.confidence < 1
    assert (soft.confidence[inside] <= sharp.confidence[inside] + 1e-6).all()
    assert soft.confidence[inside].mean() < sharp.confidence[inside].mean() - 0.01
    assert soft.soft_counts.sum() == pytest.approx(np.prod(SHAPE), rel=1e-6)


def _dense_reference(probs: torch.Tensor, src: np.ndarray, shape: tuple[int, int, int],
                     temperature: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every destination voxel resampled (no skipping): labels, confidence, soft counts."""
    idx = np.indices(shape).reshape(3, -1)
    pts = (np.linalg.inv(src) @ np.vstack([idx, np.ones(idx.shape[1])]))[:3].T
    norm = 2.0 * pts / (np.asarray(probs.shape[1:]) - 1) - 1.0
    grid = torch.from_numpy(norm[:, ::-1].astype(np.float32).copy()).view(1, 1, 1, -1, 3)
    s = torch.nn.functional.grid_sample(probs[None], grid, align_corners=True)[0, :, 0, 0].numpy()
    total = s.sum(0)
    s = np.where(total > 0.5, s / np.maximum(total, 1e-6), np.eye(len(s))[:, :1])
    s = temper(s, temperature)
    return s.argmax(0).reshape(shape), s.max(0).reshape(shape), s.sum(1)


def test_voxels_out_of_reach_of_any_structure_are_background_without_resampling():
    """Far from the brain every class but background has (almost) no probability: those
    voxels are not resampled; labels are exactly those of resampling every voxel, confidence
    and soft volumes within the skipped probability."""
    from bids_cadiff.inference.resample import BACKGROUND_EPS, _foreground_samples

    probs = torch.full((4, 16, 15, 14), 1e-5)
    probs[0] = 1 - 3e-5
    probs[:, 5:11, 4:10, 5:9] = _probs(4, classes=4)[:, :6, :6, :4]  # the "brain"
    theta = np.deg2rad(15)
    src = np.eye(4)
    src[:3, :3] = 2.0 * np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    src[:3, 3] = [12.0, 3.0, 2.0]
    shape = (34, 36, 30)
    post = posterior_on_grid(probs, src, shape, np.eye(4), temperature=1.5)
    labels, confidence, soft = _dense_reference(probs, src, shape, 1.5)
    np.testing.assert_array_equal(post.labels, labels)
    assert np.abs(post.confidence - confidence).max() < 10 * BACKGROUND_EPS
    np.testing.assert_allclose(post.soft_counts, soft, atol=np.prod(shape) * 10 * BACKGROUND_EPS)
    assert post.soft_counts.sum() == pytest.approx(np.prod(shape), rel=1e-6)
    sampled = sum(index.size for index, _ in _foreground_samples(probs, src, shape, np.eye(4), 8))
    assert 0 < sampled < 0.3 * np.prod(shape)  # most of the box is never resampled


def test_skipping_keeps_the_refined_labels_of_resampling_every_voxel():
    """The refinement sees the same voxels either way, the model grid's edge included (where
    the zero padding lowers the background's value): its labels are exactly those of
    resampling every voxel (``background_eps < 0``), its confidence within the skipped
    probability."""
    from bids_cadiff.inference.resample import BACKGROUND_EPS

    probs = torch.full((3, 12, 12, 12), 1e-5)
    probs[0] = 1 - 2e-5
    probs[:, 3:9, 3:9, 3:9] = _probs(6, classes=3)[:, :6, :6, :6]
    probs[:, 5:7, 5:7, 5:7] = torch.tensor([0.2, 0.5, 0.3])[:, None, None, None]
    src = np.diag([2.0, 2.0, 2.0, 1.0])
    src[:3, 3] = [3.6, 4.6, 5.4]  # off the destination's voxel centres: partial edge weights
    shape = (28, 28, 28)  # reaches past the grid on every side
    intensity = np.random.default_rng(5).normal(size=shape).astype(np.float32)
    every, skipping = (
        posterior_on_grid(probs, src, shape, np.eye(4), intensity=intensity,
                          settings=RefineSettings(), temperature=1.5, background_eps=eps)
        for eps in (-1.0, BACKGROUND_EPS)
    )
    np.testing.assert_array_equal(skipping.labels, every.labels)
    assert (every.labels > 0).sum() > 100
    assert np.abs(skipping.confidence - every.confidence).max() < 10 * BACKGROUND_EPS
