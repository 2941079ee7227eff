"""The anatomical distance field of CA-Diff (paper section II.B), built in atlas space.

For every voxel of the atlas brain, the field holds its 3-D position in a brain-centred
coordinate system: origin at the anterior commissure (AC), axes along RAS world x, y, z, and
``x = 0`` the midline plane through the AC (so ``x < 0`` is the left hemisphere).

Scaling (the paper only says "rescaled to between 0 and 1"; this is our choice). With
``c = world - origin_world`` (mm, RAS) for each voxel and, per axis,
``R_axis = max |c_axis|`` over the *undilated* brain mask,

    ``field[axis] = clip(0.5 + c_axis / (2 * R_axis), 0, 1)``

so the AC is 0.5 on every axis, the scaling is symmetric about the AC (a point ``d`` mm left of
the AC and one ``d`` mm right of it are equally far from 0.5), the brain's farthest voxel on each
axis maps to 0 or 1, and voxels of the dilation margin beyond it clip to 0/1.
Channel 0 is x (0 = far left, 1 = far right), 1 is y (0 = posterior, 1 = anterior),
2 is z (0 = inferior, 1 = superior). Voxels outside the dilated brain mask are 0.

The mask is dilated (default 4 mm) so that a slightly imperfect registration, or linear
interpolation at the brain edge, still finds field values rather than zeros at the subject's
brain boundary.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["build_distance_field", "scaling_radii"]


def _world_coordinates(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """RAS world coordinates of every voxel: ``(3, X, Y, Z)`` float64."""
    grid = np.indices(shape, dtype=np.float64).reshape(3, -1)
    world = affine[:3, :3] @ grid + affine[:3, 3:4]
    return world.reshape(3, *shape)


def _dilate(mask: np.ndarray, affine: np.ndarray, dilate_mm: float) -> np.ndarray:
    """Dilate a mask by ``dilate_mm`` (Euclidean, voxel size aware)."""
    if dilate_mm <= 0:
        return mask
    spacing = np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))
    outside_distance = ndimage.distance_transform_edt(~mask, sampling=spacing)
    return outside_distance <= dilate_mm


def scaling_radii(
    brain_mask: np.ndarray, affine: np.ndarray, origin_world: tuple[float, float, float]
) -> np.ndarray:
    """``R_axis = max |world - origin|`` over the brain mask, per RAS axis: ``(3,)`` mm."""
    mask = np.asarray(brain_mask, dtype=bool)
    idx = np.nonzero(mask)
    voxels = np.stack(idx).astype(np.float64)
    world = np.asarray(affine, float)[:3, :3] @ voxels + np.asarray(affine, float)[:3, 3:4]
    rel = world - np.asarray(origin_world, float)[:, None]
    return np.abs(rel).max(axis=1)


def build_distance_field(
    brain_mask: np.ndarray,
    affine: np.ndarray,
    origin_world: tuple[float, float, float] = (0.0, 0.0, 0.0),
    dilate_mm: float = 4.0,
) -> np.ndarray:
    """Build the atlas distance field.

    Args:
        brain_mask: boolean ``(X, Y, Z)`` brain mask on the atlas grid.
        affine: ``(4, 4)`` voxel-to-RAS-world affine of that grid (mm).
        origin_world: RAS world position of the anterior commissure (MNI/Colin27: ``(0, 0, 0)``).
        dilate_mm: margin added around the brain mask, filled with (clipped) field values.

    Returns:
        float32 ``(3, X, Y, Z)`` in ``[0, 1]``: scaled x (R), y (A), z (S) relative to the AC
        as described in the module docstring; 0 outside the dilated mask.

    Raises:
        ValueError: empty mask, or a mask whose shape is not 3-D.
    """
    mask = np.asarray(brain_mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"brain_mask must be (X, Y, Z), got shape {mask.shape}")
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be (4, 4), got {affine.shape}")
    if not mask.any():
        raise ValueError("brain_mask is empty: cannot scale the distance field")
    radii = scaling_radii(mask, affine, origin_world)
    radii = np.where(radii > 0, radii, 1.0)
    dilated = _dilate(mask, affine, dilate_mm)
    rel = _world_coordinates(mask.shape, affine) - np.asarray(origin_world, float)[:, None, None, None]
    field = np.clip(0.5 + rel / (2.0 * radii[:, None, None, None]), 0.0, 1.0)
    field *= dilated[None]
    return field.astype(np.float32)
