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
    flat = out.reshape(-1)
    for index, sampled in _sampled_points(stacked, src_affine, dst_shape, dst_affine, slab):
        cover = sampled[1]
        flat[index] = np.where(cover > 0.5, sampled[0] / np.maximum(cover, 1e-6), fill)
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


#: Model-grid voxels whose structures (all classes but background) have at most this much
#: probability count as pure background when resampling the probabilities: a destination voxel
#: whose trilinear neighbourhood holds only such voxels is not sampled and stays background
#: with probability 1 (:func:`posterior_on_grid`). On chris_t1 (head, 0.88 mm, bundled model)
#: that leaves 42 % of the model box's voxels unsampled and every label, refined or not,
#: unchanged. At the bundled model's calibration temperature (1.54), which spreads probability
#: thinly over the scalp and neck, the confidence there rose by at most 0.026 and the soft
#: volumes fell by up to 7 % for the smallest ones (left lateral ventricle 10.9 -> 10.1 ml, its
#: hard volume 9.6 ml; 5.6 ml of each cerebral cortex, 1.8 %): every soft volume moved towards
#: the hard one.
BACKGROUND_EPS = 1e-3


def _foreground_support(probs: torch.Tensor, eps: float) -> np.ndarray:
    """``(X + 1, Y + 1, Z + 1)`` bool: at index ``v + 1``, whether any of the 8 source voxels
    ``v .. v + 1`` (the corners that trilinear interpolation at ``floor(point) = v`` reads) has
    structure probability above ``eps``; ``v`` runs from -1 (the zero padding before the grid)
    to ``n - 1``."""
    fg = (probs[1:].float().sum(dim=0) > eps).float()[None, None]
    padded = F.pad(fg, (1, 1, 1, 1, 1, 1))  # (1, 1, X + 2, Y + 2, Z + 2)
    return F.max_pool3d(padded, 2, stride=1)[0, 0].numpy() > 0


def _sampled_points(
    volume: torch.Tensor,
    src_affine: np.ndarray,
    dst_shape: tuple[int, int, int],
    dst_affine: np.ndarray,
    slab: int,
    support: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Trilinear resampling of ``(C, X, Y, Z)`` onto another grid, ``slab`` destination
    slices (last axis) at a time, of the destination voxels whose interpolation reads the
    source grid (inside :func:`source_box`). With ``support`` (:func:`_foreground_support`),
    only of those that also read a supported source voxel or the zero padding beyond the
    grid.

    Yields:
        ``(flat_index, sampled)``: ``(n,)`` C-order indices into ``dst_shape`` and the
        ``(C, n)`` float32 values there (zero padding outside the source grid).
    """
    n_src = np.asarray(volume.shape[1:], dtype=np.int64)
    dst_to_src = np.linalg.inv(src_affine) @ dst_affine
    vol = volume.float()[None]  # (1, C, X, Y, Z)
    bx, by, bz = source_box(volume.shape[1:], src_affine, dst_shape, dst_affine)
    ii, jj = np.meshgrid(np.arange(bx.start, bx.stop), np.arange(by.start, by.stop), indexing="ij")
    if ii.size == 0:
        return
    linear, shift = dst_to_src[:3, :3], dst_to_src[:3, 3]
    plane = ii[..., None] * linear[:, 0] + jj[..., None] * linear[:, 1] + shift  # (x, y, 3)
    for z0 in range(bz.start, bz.stop, slab):
        kk = np.arange(z0, min(z0 + slab, bz.stop))
        src = plane[:, :, None, :] + kk[:, None] * linear[:, 2]  # (x, y, k, 3) source voxels
        corner = np.floor(src).astype(np.int64) + 1  # first corner read, + 1 (padding at 0)
        need = ((corner >= 0) & (corner <= n_src)).all(axis=-1)
        if support is not None:
            # voxels that also read the zero padding are always sampled: their background
            # value is lowered by it, and the refinement takes them as it always has
            reads_padding = ((corner == 0) | (corner == n_src)).any(axis=-1)
            np.clip(corner, 0, n_src, out=corner)
            need &= reads_padding | support[corner[..., 0], corner[..., 1], corner[..., 2]]
        if not need.any():
            continue
        points = src[need]  # (n, 3)
        # grid_sample wants (x, y, z) = (last, middle, first) axes, normalised to [-1, 1]
        norm = 2.0 * points / np.maximum(n_src - 1, 1) - 1.0
        grid = torch.from_numpy(norm[:, ::-1].astype(np.float32).copy()).view(1, 1, 1, -1, 3)
        sampled = F.grid_sample(
            vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True
        )[0, :, 0, 0]  # (C, n)
        x, y, k = np.nonzero(need)
        index = np.ravel_multi_index((x + bx.start, y + by.start, kk[k]), dst_shape)
        yield index, sampled.numpy()


def _foreground_samples(
    probs: torch.Tensor,
    src_affine: np.ndarray,
    dst_shape: tuple[int, int, int],
    dst_affine: np.ndarray,
    slab: int,
    eps: float = BACKGROUND_EPS,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`_sampled_points` of ``(C, X, Y, Z)`` probabilities, of only the destination
    voxels whose interpolation reads a source voxel with structure probability above ``eps``
    (or the zero padding beyond the source grid); ``eps < 0``: of every voxel."""
    support = _foreground_support(probs, eps) if eps >= 0 else None
    return _sampled_points(probs, src_affine, dst_shape, dst_affine, slab, support)


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
    background_eps: float = BACKGROUND_EPS,
) -> GridPosterior:
    """The final class probabilities on another grid, summarised (:class:`GridPosterior`).

    Without ``settings``: the trilinearly resampled probabilities (whose argmax is
    :func:`probabilities_to_grid`). With ``settings`` and ``intensity``: the refined posterior
    (whose argmax is :func:`refined_labels_on_grid`). Voxels whose interpolation reads no
    source voxel with structure probability above :data:`BACKGROUND_EPS` (nor the zero padding
    beyond the source grid) are not resampled: background with probability 1.

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
        background_eps: see :data:`BACKGROUND_EPS`; negative: resample every voxel the
            source grid reaches (the baseline of ``benchmarks/participant.py``).
    """
    if settings is not None and intensity is None:
        raise ValueError("the refinement needs the image's intensities")
    out = GridPosterior.empty(dst_shape, int(probs.shape[0]), keep_probabilities=keep_probabilities)
    columns, where = [], []
    for index, sampled in _foreground_samples(
        probs, src_affine, dst_shape, dst_affine, slab, background_eps
    ):
        inside = sampled.sum(axis=0) > 0.5
        active = np.zeros_like(inside) if settings is None else inside & (
            sampled[0] < settings.active_threshold
        )
        for mask, refine in ((inside & ~active, False), (active, True)):
            if not mask.any():
                continue
            if refine:
                # torch converts with the CPU's F16C instructions; numpy's astype is
                # ~20 times slower on the many subnormal half-precision values here
                columns.append(torch.from_numpy(sampled[:, mask]).half().numpy())
                where.append(index[mask])
            else:
                out.add(index[mask], temper(sampled[:, mask], temperature))
    if columns:
        assert settings is not None and intensity is not None
        prior = np.concatenate(columns, axis=1)
        index = np.concatenate(where)
        del columns
        values = np.asarray(intensity, dtype=np.float32).ravel()[index]
        for cols, post in refine_posterior_chunks(prior, values, settings):
            out.add(index[cols], temper(post, temperature))
    return out
