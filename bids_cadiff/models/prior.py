"""The distance-field label prior: P(label | atlas coordinate), learned from training label maps.

CA-Diff's distance field gives every brain voxel its coordinate in the atlas's brain-centred
frame (:mod:`bids_cadiff.imaging.distance_field`); the network learns which anatomy lives at
which coordinate. The label prior makes that association explicit: the coordinate cube
[0, 1]³ is cut into ``bins³`` cells, and each cell holds the frequency of every class among
the training voxels whose (registered) distance field falls into it, lightly smoothed. A model
with a prior adds ``log P(label | D0)`` to its logits, so the network learns a correction of
the prior from the image instead of the whole segmentation (``ModelConfig.label_prior_bins``).

Voxels with an all-zero field (outside the atlas's dilated brain mask, or sliding-window
padding) get the background class.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = ["LOG_FLOOR", "build_label_prior", "prior_log_probs"]

#: Smallest probability a cell gives a class (its logarithm floors the logit offset).
PROB_FLOOR = 1e-3
LOG_FLOOR = float(np.log(PROB_FLOOR))


def build_label_prior(
    samples: Iterable[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    bins: int,
    sigma: float = 0.3,
) -> np.ndarray:
    """Count classes per distance-field cell over training label maps.

    Args:
        samples: ``(field, labels)`` pairs: ``field`` ``(3, *S)`` distance field in [0, 1]
            (all zero outside the brain), ``labels`` ``(*S)`` class indices in
            ``[0, num_classes)`` on the same grid.
        num_classes: C, background included.
        bins: cells per axis of the coordinate cube.
        sigma: Gaussian smoothing of each class's counts, in cells (0: none).

    Returns:
        float32 ``(C, bins, bins, bins)`` probabilities summing to 1 over classes in every
        cell, each at least about :data:`PROB_FLOOR`; cells no training voxel reached are
        background.

    Raises:
        ValueError: no voxel inside any field, or labels out of range.
    """
    counts = np.zeros((num_classes, bins, bins, bins), dtype=np.float64)
    for field, labels in samples:
        field = np.asarray(field, dtype=np.float32)
        labels = np.asarray(labels)
        if field.shape[1:] != labels.shape:
            raise ValueError(f"field {field.shape} and labels {labels.shape} differ in shape")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels must be in [0, {num_classes}), got {labels.min()}..{labels.max()}")
        inside = field.sum(axis=0) > 0
        cells = np.clip(np.rint(field[:, inside] * (bins - 1)), 0, bins - 1).astype(np.intp)
        np.add.at(counts, (labels[inside].astype(np.intp), cells[0], cells[1], cells[2]), 1.0)
    if counts.sum() == 0:
        raise ValueError("no training voxel inside a distance field: cannot build a label prior")
    if sigma > 0:
        for c in range(num_classes):
            counts[c] = ndimage.gaussian_filter(counts[c], sigma)
    empty = counts.sum(axis=0) <= 0
    counts[0][empty] = 1.0
    probs = counts / counts.sum(axis=0, keepdims=True)
    probs = np.maximum(probs, PROB_FLOOR)
    return (probs / probs.sum(axis=0, keepdims=True)).astype(np.float32)


def prior_log_probs(log_prior: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """Look up ``log P(label | D0)`` at every voxel (trilinear between cell centres).

    Args:
        log_prior: ``(C, B, B, B)`` log-probabilities (the log of :func:`build_label_prior`).
        distance: ``(N, 3, *S)`` clean distance field in [0, 1], 2D (``S = (H, W)``) or 3D.

    Returns:
        ``(N, C, *S)`` log-probabilities, in ``distance``'s dtype and device; voxels whose
        field is all zero get the background class (log-probability 0, others
        :data:`LOG_FLOOR`).
    """
    n, spatial = distance.shape[0], distance.shape[2:]
    grid = distance.reshape(n, 3, 1, 1, -1).float() if len(spatial) == 2 else distance.float()
    # grid_sample's last grid axis is (W, H, D) = (z, y, x) of the (C, X, Y, Z) prior
    grid = (2.0 * grid - 1.0).flip(1).movedim(1, -1)
    table = log_prior.float().unsqueeze(0).expand(n, -1, -1, -1, -1)
    out = F.grid_sample(table, grid, mode="bilinear", padding_mode="border", align_corners=True)
    out = out.reshape(n, log_prior.shape[0], *spatial)
    outside = (distance.sum(dim=1, keepdim=True) <= 0).expand_as(out)
    background = torch.full_like(out, LOG_FLOOR)
    background[:, 0] = 0.0
    return torch.where(outside, background, out).to(distance.dtype)
