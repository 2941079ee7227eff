"""Class probabilities on the model grid → a label map on the input image's own grid (plain
argmax, or refined by the image's intensities: :mod:`bids_cadiff.inference.refine`)."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from bids_cadiff.inference.posterior import GridPosterior, temper
from bids_cadiff.inference.refine import RefineSettings, refine_posterior_chunks


def source_box(
    src_shape: tuple[int, ...],
    src_affine: np.ndarray,
    dst_shape: tuple[int, int, int],
    dst_affine: np.ndarray,
) -> tuple[slice, slice, slice]:
    """The destination voxels the source grid can reach.

    Trilinear sampling with zero padding reaches up to one source voxel beyond the grid's
    outermost centres, so the box is that of the corners ``-1`` and ``n`` (source voxels) in
    destination voxels, one voxel wider, clipped to the destination.

    Args:
        src_shape: ``(X, Y, Z[, ...])`` of the source grid (only the first three are used).
        src_affine, dst_affine: ``(4, 4)`` voxel-to-world matrices.
        dst_shape: ``(X', Y', Z')`` of the destination grid.

    Returns:
        three slices of the destination grid (empty where the grids do not meet).
    """
    corners = np.array(np.meshgrid(*[[-1, n] for n in src_shape[:3]], indexing="ij"))
    corners = np.concatenate([corners.reshape(3, -1), np.ones((1, 8))])
    dst = (np.linalg.inv(dst_affine) @ src_affine @ corners)[:3]
    lo = np.clip(np.floor(dst.min(axis=1)).astype(int) - 1, 0, dst_shape)
    hi = np.clip(np.ceil(dst.max(axis=1)).astype(int) + 2, 0, dst_shape)
    return tuple(slice(int(a), int(max(a, b))) for a, b in zip(lo, hi))  # type: ignore[return-value]


def _resampled_slabs(
    volume: torch.Tensor,
    src_affine: np.ndarray,
    dst_shape: tuple[int, int, int],
    dst_affine: np.ndarray,
    slab: int,
) -> Iterator[tuple[tuple[slice, slice, np.ndarray], torch.Tensor]]:
    """Trilinear resampling of ``(C, X, Y, Z)`` onto another grid, inside the destination box
    the source reaches (:func:`source_box`; everything outside it is zero), ``slab``
    destination slices (last axis) at a time: yields ``(index, (C, x, y, k) tensor)``, where
    ``index`` (two slices and the slice numbers) says which destination voxels they are."""
    src_shape = np.asarray(volume.shape[1:], dtype=np.float64)
    dst_to_src = np.linalg.inv(src_affine) @ dst_affine
    vol = volume.float()[None]  # (1, C, X, Y, Z)
    bx, by, bz = source_box(volume.shape[1:], src_affine, dst_shape, dst_affine)
    ii, jj = np.meshgrid(np.arange(bx.start, bx.stop), np.arange(by.start, by.stop), indexing="ij")
    if ii.size == 0:
        return
    for z0 in range(bz.start, bz.stop, slab):
        kk = np.arange(z0, min(z0 + slab, bz.stop))
        pts = np.stack(
            [
                np.broadcast_to(ii[..., None], (*ii.shape, len(kk))),
                np.broadcast_to(jj[..., None], (*jj.shape, len(kk))),
                np.broadcast_to(kk, (*ii.shape, len(kk))),
                np.ones((*ii.shape, len(kk))),
            ],
            axis=-1,
        )
        src = pts @ dst_to_src.T  # (x, y, k, 4) in source voxel coordinates
        # grid_sample wants (x, y, z) = (last, middle, first) axes, normalised to [-1, 1]
        norm = 2.0 * src[..., :3] / np.maximum(src_shape - 1, 1) - 1.0
        grid = torch.from_numpy(norm[..., ::-1].astype(np.float32).copy())[None]
        sampled = F.grid_sample(
            vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True
        )[0]  # (C, x, y, k)
        yield (bx, by, kk), sampled


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
    return posterior_on_grid(probs, src_affine, dst_shape, dst_affine, slab=slab).labels


def field_to_grid(
    field: np.ndarray,
    src_affine: np.ndarray,
    dst_shape: tuple[int, int, int],
    dst_affine: np.ndarray,
    *,
    fill: float = 0.0,
    slab: int = 16,
) -> np.ndarray:
    """Trilinearly resample a scalar field ``(X, Y, Z)`` onto another grid.

    Returns:
        ``(X', Y', Z')`` float32; ``fill`` where the destination lies outside the source grid.
    """
    src = torch.from_numpy(np.asarray(field, dtype=np.float32))
    stacked = torch.stack([src, torch.ones_like(src)])  # second channel: coverage
    out = np.full(dst_shape, fill, dtype=np.float32)
    for (bx, by, kk), sampled in _resampled_slabs(stacked, src_affine, dst_shape, dst_affine, slab):
        cover = sampled[1].numpy()
        values = sampled[0].numpy() / np.maximum(cover, 1e-6)
        out[bx, by, kk] = np.where(cover > 0.5, values, fill)
    return out


def refined_labels_on_grid(
    probs: torch.Tensor,
    src_affine: np.ndarray,
    intensity: np.ndarray,
    dst_affine: np.ndarray,
    settings: RefineSettings,
    *,
    slab: int = 8,
) -> np.ndarray:
    """Labels on the image's own grid from the model's probabilities refined by its intensities.

    The probabilities are resampled onto the grid of ``intensity`` (as in
    :func:`probabilities_to_grid`); where the background probability is below
    ``settings.active_threshold`` they become the prior of
    :func:`~bids_cadiff.inference.refine.refine_posterior`, whose argmax is the label.

    Args:
        probs: ``(C, X, Y, Z)`` probabilities on the grid ``src_affine``.
        src_affine: ``(4, 4)`` voxel-to-world matrix of ``probs``.
        intensity: ``(X', Y', Z')`` bias-corrected image on the destination grid.
        dst_affine: ``(4, 4)`` voxel-to-world matrix of ``intensity``.
        settings: the refinement's settings.

    Returns:
        ``(X', Y', Z')`` int16 channel indices; 0 (background) outside the source grid.
    """
    dst_shape = tuple(int(n) for n in intensity.shape)
    return posterior_on_grid(
        probs, src_affine, dst_shape, dst_affine, intensity=intensity, settings=settings, slab=slab
    ).labels


def posterior_on_grid(
    probs: torch.Tensor,
    src_affine: np.ndarray,
    dst_shape: tuple[int, int, int],
    dst_affine: np.ndarray,
    *,
    intensity: np.ndarray | None = None,
    settings: RefineSettings | None = None,
    keep_probabilities: bool = False,
    temperature: float = 1.0,
    slab: int = 8,
) -> GridPosterior:
    """The final class probabilities on another grid, summarised (:class:`GridPosterior`).

    Without ``settings``: the trilinearly resampled probabilities (whose argmax is
    :func:`probabilities_to_grid`). With ``settings`` and ``intensity``: the refined posterior
    (whose argmax is :func:`refined_labels_on_grid`).

    Args:
        probs: ``(C, X, Y, Z)`` probabilities on the grid ``src_affine``.
        src_affine, dst_affine: ``(4, 4)`` voxel-to-world matrices.
        dst_shape: ``(X', Y', Z')`` of the destination grid.
        intensity: ``(X', Y', Z')`` bias-corrected image (needed with ``settings``).
        settings: the refinement's settings, or ``None``.
        keep_probabilities: keep the ``(X', Y', Z', C)`` probabilities (uint8).
        temperature: the final probabilities are ∝ p^(1/temperature)
            (:func:`~bids_cadiff.inference.posterior.temper`; the model's calibration).
        slab: destination slices per resampling step.
    """
    if settings is not None and intensity is None:
        raise ValueError("the refinement needs the image's intensities")
    out = GridPosterior.empty(dst_shape, int(probs.shape[0]), keep_probabilities=keep_probabilities)
    columns, where = [], []
    for (bx, by, kk), sampled in _resampled_slabs(probs, src_affine, dst_shape, dst_affine, slab):
        inside = (sampled.sum(dim=0) > 0.5).numpy()
        active = np.zeros_like(inside) if settings is None else inside & (
            sampled[0].numpy() < settings.active_threshold
        )
        for mask, refine in ((inside & ~active, False), (active, True)):
            if not mask.any():
                continue
            x, y, k = np.nonzero(mask)
            index = np.ravel_multi_index((x + bx.start, y + by.start, kk[k]), dst_shape)
            if refine:
                columns.append(sampled[:, torch.from_numpy(mask)].half().numpy())
                where.append(index)
            else:
                out.add(index, temper(sampled[:, torch.from_numpy(mask)].numpy(), temperature))
    if columns:
        assert settings is not None and intensity is not None
        prior = np.concatenate(columns, axis=1)
        index = np.concatenate(where)
        del columns
        values = np.asarray(intensity, dtype=np.float32).ravel()[index]
        for cols, post in refine_posterior_chunks(prior, values, settings):
            out.add(index[cols], temper(post, temperature))
    return out
