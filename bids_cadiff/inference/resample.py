"""Class probabilities on the model grid → a label map on the input image's own grid."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def probabilities_to_grid(
    probs: torch.Tensor,
    src_affine: np.ndarray,
    dst_shape: tuple[int, int, int],
    dst_affine: np.ndarray,
    *,
    slab: int = 8,
) -> np.ndarray:
    """Trilinearly resample class probabilities onto another grid and take the argmax there.

    Resampling the probabilities (not the labels) keeps boundaries smooth when the model grid
    is coarser than the input. Works slab by slab along the last destination axis, so memory
    stays at ``C × X' × Y' × slab`` floats.

    Args:
        probs: ``(C, X, Y, Z)`` probabilities on the grid ``src_affine`` (channel 0:
            background).
        src_affine: ``(4, 4)`` voxel-to-world matrix of ``probs``.
        dst_shape: ``(X', Y', Z')`` of the destination grid.
        dst_affine: ``(4, 4)`` voxel-to-world matrix of the destination grid.
        slab: destination slices per step.

    Returns:
        ``(X', Y', Z')`` int16 channel indices; 0 (background) outside the source grid.
    """
    src_shape = np.asarray(probs.shape[1:], dtype=np.float64)
    dst_to_src = np.linalg.inv(src_affine) @ dst_affine
    vol = probs.float()[None]  # (1, C, X, Y, Z)
    out = np.zeros(dst_shape, dtype=np.int16)
    ii, jj = np.meshgrid(np.arange(dst_shape[0]), np.arange(dst_shape[1]), indexing="ij")
    for z0 in range(0, dst_shape[2], slab):
        kk = np.arange(z0, min(z0 + slab, dst_shape[2]))
        pts = np.stack(
            [
                np.broadcast_to(ii[..., None], (*ii.shape, len(kk))),
                np.broadcast_to(jj[..., None], (*jj.shape, len(kk))),
                np.broadcast_to(kk, (*ii.shape, len(kk))),
                np.ones((*ii.shape, len(kk))),
            ],
            axis=-1,
        )
        src = pts @ dst_to_src.T  # (X', Y', k, 4) in source voxel coordinates
        # grid_sample wants (x, y, z) = (last, middle, first) axes, normalised to [-1, 1]
        norm = 2.0 * src[..., :3] / np.maximum(src_shape - 1, 1) - 1.0
        grid = torch.from_numpy(norm[..., ::-1].astype(np.float32).copy())[None]
        sampled = F.grid_sample(
            vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True
        )[0]  # (C, X', Y', k)
        labels = sampled.argmax(dim=0)
        inside = sampled.sum(dim=0) > 0.5
        out[..., kk] = torch.where(inside, labels, 0).numpy().astype(np.int16)
    return out
