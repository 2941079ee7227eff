"""Tests for bids_cadiff.imaging.preprocess on small generated volumes."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from bids_cadiff.imaging.preprocess import (
    ants_to_nib,
    foreground_mask,
    looks_skull_stripped,
    n4_bias_correct,
    nib_to_ants,
    normalise_intensity,
    resample_to_reference,
    resample_to_spacing,
    to_ras,
)

SHAPE = (9, 10, 11)


def _oblique_lia_affine() -> np.ndarray:
    """LIA orientation (as FreeSurfer .mgz) with a small rotation and anisotropic voxels."""
    lia = np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])
    angle = np.deg2rad(7)
    rot = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ lia @ np.diag([1.1, 0.9, 1.3])
    affine[:3, 3] = [12.5, -7.0, 30.25]
    return affine


def _world(img: nib.Nifti1Image, ijk: tuple[int, int, int]) -> np.ndarray:
    return nib.affines.apply_affine(img.affine, ijk)


def test_to_ras_reorients_without_moving_voxels() -> None:
    data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    img = nib.Nifti1Image(data, _oblique_lia_affine())
    ras = to_ras(img)
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    ras_data = np.asanyarray(ras.dataobj)
    # every value keeps its world position
    for ijk in [(0, 0, 0), (8, 9, 10), (3, 7, 2)]:
        value = data[ijk]
        new_ijk = tuple(int(v) for v in np.argwhere(ras_data == value)[0])
        np.testing.assert_allclose(_world(ras, new_ijk), _world(img, ijk), atol=1e-5)


def test_to_ras_round_trip_back_to_original_orientation() -> None:
    data = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    img = nib.Nifti1Image(data, _oblique_lia_affine())
    ras = to_ras(img)
    back = ras.as_reoriented(
        nib.orientations.ornt_transform(
            nib.orientations.io_orientation(ras.affine), nib.orientations.io_orientation(img.affine)
        )
    )
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), data)
    np.testing.assert_allclose(back.affine, img.affine, atol=1e-6)


def test_to_ras_squeezes_singleton_4th_axis_and_rejects_4d() -> None:
    img = nib.Nifti1Image(np.zeros((*SHAPE, 1), np.float32), np.eye(4))
    assert to_ras(img).shape == SHAPE
    with pytest.raises(ValueError, match="3-D"):
        to_ras(nib.Nifti1Image(np.zeros((*SHAPE, 2), np.float32), np.eye(4)))


def test_resample_to_spacing_keeps_field_of_view() -> None:
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-4.0, -5.0, -6.0]
    data = np.zeros((8, 10, 12), np.float32)
    data[2:6, 3:7, 4:8] = 1.0
    out = resample_to_spacing(nib.Nifti1Image(data, affine), 2.0, order=1)
    assert out.shape == (4, 5, 6)
    np.testing.assert_allclose(out.header.get_zooms()[:3], (2.0, 2.0, 2.0))
    # grid corners (voxel edges) coincide
    corner_in = nib.affines.apply_affine(affine, (-0.5, -0.5, -0.5))
    corner_out = nib.affines.apply_affine(out.affine, (-0.5, -0.5, -0.5))
    np.testing.assert_allclose(corner_out, corner_in)
    # the object's centre of mass stays in place (world)
    com = lambda img: nib.affines.apply_affine(  # noqa: E731
        img.affine, np.argwhere(np.asanyarray(img.dataobj) > 0.5).mean(axis=0)
    )
    np.testing.assert_allclose(com(out), com(nib.Nifti1Image(data, affine)), atol=0.6)
    labels = resample_to_spacing(nib.Nifti1Image(data.astype(np.int16), affine), 2.0, order=0)
    assert set(np.unique(np.asanyarray(labels.dataobj))) <= {0, 1}


def test_resample_to_reference_round_trip_labels_and_channels() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat(np.repeat(np.repeat(rng.integers(0, 5, (4, 5, 6)), 2, 0), 2, 1), 2, 2)
    labels = labels.astype(np.int16)  # (8, 10, 12) in 2x2x2 blocks
    fine = np.diag([1.0, 1.0, 1.0, 1.0])
    # coarse voxel (i, j, k) is the centre of fine block (2i..2i+1, ...): world 2i + 0.5
    coarse = nib.Nifti1Image(labels[::2, ::2, ::2], np.array(
        [[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 2, 0.5], [0, 0, 0, 1.0]]))
    back = resample_to_reference(np.asanyarray(coarse.dataobj), coarse.affine, labels.shape, fine, order=0)
    assert back.dtype == np.int16
    np.testing.assert_array_equal(back, labels)
    probs = np.stack([labels == k for k in range(2)]).astype(np.float32)[:, ::2, ::2, ::2]
    back_probs = resample_to_reference(probs, coarse.affine, labels.shape, fine, order=1)
    assert back_probs.shape == (2, *labels.shape) and back_probs.dtype == np.float32


def test_normalise_intensity_is_scale_invariant() -> None:
    rng = np.random.default_rng(2)
    head = np.zeros((15, 17, 13), np.float32)
    head[2:13, 3:14, 2:11] = rng.gamma(4.0, 25.0, (11, 11, 9))
    raw = head * 37.3  # scanner units
    fs_like = head * (110.0 / np.percentile(head[head > 0], 80))  # FreeSurfer-like scale
    a, b = normalise_intensity(raw), normalise_intensity(fs_like)
    assert a.dtype == np.float32 and a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.all(a[head == 0] == 0.0)
    assert normalise_intensity(np.full((3, 3, 3), 5.0)).max() == 0.0


def test_normalise_intensity_with_mask_and_bad_percentiles() -> None:
    data = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    mask = data >= 13
    out = normalise_intensity(data, lower_percentile=0, upper_percentile=100, mask=mask)
    assert out[data <= 13].max() == 0.0 and out.max() == 1.0
    with pytest.raises(ValueError, match="percentile"):
        normalise_intensity(data, lower_percentile=60, upper_percentile=40)


def test_nib_ants_round_trip_keeps_geometry() -> None:
    data = np.random.default_rng(3).random(SHAPE).astype(np.float32)
    img = nib.Nifti1Image(data, _oblique_lia_affine())
    image = nib_to_ants(img)
    # ANTs physical point (LPS) of voxel (2, 3, 4) equals nibabel's RAS point with x, y negated
    point = np.asarray(image.origin) + (
        np.asarray(image.direction) * np.asarray(image.spacing)
    ) @ np.array([2.0, 3.0, 4.0])
    ras = nib.affines.apply_affine(img.affine, (2, 3, 4))
    np.testing.assert_allclose(point, ras * np.array([-1, -1, 1]), atol=1e-4)
    back = ants_to_nib(image)
    np.testing.assert_allclose(back.affine, img.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), data)


def test_n4_reduces_multiplicative_bias() -> None:
    shape = (33, 35, 31)
    idx = np.indices(shape, dtype=np.float32)
    centre = (np.asarray(shape, np.float32) - 1)[:, None, None, None] / 2
    r = np.sqrt((((idx - centre) / (centre * 0.8)) ** 2).sum(axis=0))
    rng = np.random.default_rng(4)
    truth = np.where(r < 1, 100.0, 0.0).astype(np.float32)
    truth[(r < 0.5)] = 150.0
    truth *= (r < 1) * (1 + 0.02 * rng.standard_normal(shape)).astype(np.float32)
    bias = np.exp(0.4 * (idx[0] - centre[0]) / shape[0] + 0.3 * (idx[2] - centre[2]) / shape[2])
    biased = (truth * bias).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    corrected = np.asanyarray(n4_bias_correct(nib.Nifti1Image(biased, affine)).dataobj)
    assert corrected.shape == shape

    def cv(img: np.ndarray) -> float:  # spread within the uniform outer shell
        shell = img[(r > 0.6) & (r < 0.9)]
        return float(shell.std() / shell.mean())

    assert cv(corrected) < 0.6 * cv(biased)


def test_foreground_and_skull_stripped_heuristic() -> None:
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    idx = np.indices((41, 51, 41), dtype=np.float32) * 4 - np.array([80, 100, 80])[:, None, None, None]
    r_brain = (idx[0] / 65) ** 2 + (idx[1] / 82) ** 2 + (idx[2] / 60) ** 2
    r_head = (idx[0] / 80) ** 2 + (idx[1] / 99) ** 2 + (idx[2] / 80) ** 2
    brain = np.where(r_brain <= 1, 100.0, 0.0)
    head = np.where(r_head <= 1, 60.0, 0.0)
    head[r_brain <= 1] = 100.0
    assert foreground_mask(brain).sum() == (r_brain <= 1).sum()
    assert looks_skull_stripped(brain, affine)
    assert not looks_skull_stripped(head, affine)


def test_bias_field_recovers_a_smooth_multiplicative_field():
    from bids_cadiff.imaging.preprocess import bias_field

    x = np.linspace(-1, 1, 30)
    field = np.exp(0.2 * x)[:, None, None] * np.ones((30, 24, 20), np.float32)
    after = np.zeros((30, 24, 20), np.float32)
    after[3:-3, 3:-3, 3:-3] = 100.0
    before = after * field
    got = bias_field(before, after)
    inside = after > 0
    np.testing.assert_allclose(got[inside][:, None], field[inside][:, None], rtol=0.03)
    assert got[0, 0, 0] == 1.0  # far from any defined voxel
    with pytest.raises(ValueError, match="shapes"):
        bias_field(before, after[:-1])
    np.testing.assert_array_equal(bias_field(after, np.zeros_like(after)), np.ones_like(after))
