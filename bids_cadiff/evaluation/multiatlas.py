"""Multi-atlas label fusion: the channel chosen by most atlases wins in each voxel.

Pure numpy. The registration and file work that brings each atlas subject's labels onto the
target is :mod:`bids_cadiff.app.multiatlas`, which fuses the results with :func:`majority_vote`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["MULTI_ATLAS", "majority_vote"]

#: The multi-atlas baseline's method name in score tables (cross-validation, model card).
MULTI_ATLAS = "Multi-Atlas"


def majority_vote(label_maps: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-voxel most frequent channel over several label maps.

    Args:
        label_maps: ``(X, Y, Z)`` (or 2D) integer channel maps in ``[0, num_classes)``, same shape.
        num_classes: number of channels.

    Returns:
        int16 map of the same shape; ties go to the lowest channel.

    Example:
        >>> a, b, c = np.array([1, 2, 0]), np.array([1, 0, 2]), np.array([2, 0, 1])
        >>> majority_vote([a, b, c], 3).tolist()
        [1, 0, 0]
    """
    if not label_maps:
        raise ValueError("majority_vote needs at least one label map")
    shape = label_maps[0].shape
    if any(m.shape != shape for m in label_maps):
        raise ValueError(f"label maps differ in shape: {[m.shape for m in label_maps]}")
    best = np.zeros(shape, dtype=np.int16)
    best_count = np.zeros(shape, dtype=np.int32)
    for c in range(num_classes):
        count = np.zeros(shape, dtype=np.int32)
        for m in label_maps:
            count += m == c
        better = count > best_count
        best[better] = c
        best_count[better] = count[better]
    return best
