"""Tests for bids_cadiff.imaging.distance_field."""

from __future__ import annotations

import numpy as np
import pytest

from bids_cadiff.imaging.distance_field import build_distance_field

SHAPE = (21, 25, 19)


def _grid(spacing: float = 2.0) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """RAS affine with world (0, 0, 0) at voxel ``ac``, and a box brain mask around it."""
    ac = (10, 14, 7)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -np.asarray(ac) * spacing
    mask = np.zeros(SHAPE, dtype=bool)
    mask[4:17, 5:23, 2:16] = True  # x -6..+6, y -9..+8, z -5..+8 voxels from the AC
    return mask, affine, ac


def test_ac_is_half_and_field_is_symmetric() -> None:
    mask, affine, ac = _grid()
    field = build_distance_field(mask, affine, dilate_mm=0.0)
    assert field.shape == (3, *SHAPE) and field.dtype == np.float32
    np.testing.assert_allclose(field[:, ac[0], ac[1], ac[2]], 0.5)
    # R = max |c| over the mask: x 12 mm, y 18 mm, z 16 mm
    left, right = field[0, ac[0] - 6, ac[1], ac[2]], field[0, ac[0] + 6, ac[1], ac[2]]
    np.testing.assert_allclose([left, right], [0.0, 1.0])
    np.testing.assert_allclose(field[0, ac[0] - 3, ac[1], ac[2]], 0.25)
    np.testing.assert_allclose(field[1, ac[0], ac[1] + 8, ac[2]], 0.5 + 16 / 36, rtol=1e-6)
    np.testing.assert_allclose(field[1, ac[0], ac[1] - 9, ac[2]], 0.0, atol=1e-7)
    np.testing.assert_allclose(field[2, ac[0], ac[1], ac[2] + 8], 1.0)
    np.testing.assert_allclose(field[2, ac[0], ac[1], ac[2] - 5], 0.5 - 10 / 32)
    # mirror symmetry about the midline for x, equality for y and z
    for d in range(1, 7):
        a = field[:, ac[0] - d, ac[1] + 2, ac[2] + 1]
        b = field[:, ac[0] + d, ac[1] + 2, ac[2] + 1]
        np.testing.assert_allclose(a[0] + b[0], 1.0, rtol=1e-6)
        np.testing.assert_allclose(a[1:], b[1:])
    assert np.all(field[:, ~mask] == 0.0)
    assert field.min() >= 0.0 and field.max() <= 1.0


def test_left_is_below_half_in_ras() -> None:
    mask, affine, ac = _grid()
    field = build_distance_field(mask, affine)
    assert field[0, ac[0] - 2, ac[1], ac[2]] < 0.5 < field[0, ac[0] + 2, ac[1], ac[2]]
    assert field[1, ac[0], ac[1] - 2, ac[2]] < 0.5 < field[1, ac[0], ac[1] + 2, ac[2]]
    assert field[2, ac[0], ac[1], ac[2] - 2] < 0.5 < field[2, ac[0], ac[1], ac[2] + 2]


def test_dilation_adds_clipped_margin() -> None:
    mask, affine, ac = _grid()
    field = build_distance_field(mask, affine, dilate_mm=4.0)
    # two voxels (4 mm) beyond the right edge: inside the dilated mask, clipped to 1
    assert field[0, ac[0] + 8, ac[1], ac[2]] == 1.0
    assert field[1, ac[0] + 8, ac[1], ac[2]] == pytest.approx(0.5)
    # three voxels beyond: outside
    assert np.all(field[:, ac[0] + 9, ac[1], ac[2]] == 0.0)


def test_origin_and_flipped_axis_affine() -> None:
    mask, affine, ac = _grid()
    flipped = affine.copy()
    flipped[0, 0] = -2.0  # LAS voxel order: voxel x grows to the left
    flipped[0, 3] = ac[0] * 2.0
    field = build_distance_field(mask, flipped, dilate_mm=0.0)
    # voxel ac[0] + 3 is now 6 mm LEFT of the AC
    np.testing.assert_allclose(field[0, ac[0] + 3, ac[1], ac[2]], 0.25)
    shifted = build_distance_field(mask, affine, origin_world=(2.0, 0.0, 0.0), dilate_mm=0.0)
    np.testing.assert_allclose(shifted[0, ac[0] + 1, ac[1], ac[2]], 0.5)


def test_rejects_empty_or_bad_inputs() -> None:
    with pytest.raises(ValueError, match="empty"):
        build_distance_field(np.zeros(SHAPE, bool), np.eye(4))
    with pytest.raises(ValueError, match="X, Y, Z"):
        build_distance_field(np.ones((3, 3), bool), np.eye(4))
