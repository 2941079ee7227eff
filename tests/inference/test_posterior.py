"""The final posterior on the T1w's own grid, summarised block by block."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_cadiff.inference.posterior import PROBABILITY_SCALE, GridPosterior
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
