"""Tests for bids_cadiff.registration.ants: fast ones on a 4 mm phantom, slow ones on real heads."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_cadiff.errors import RegistrationError
from bids_cadiff.imaging.distance_field import scaling_radii
from bids_cadiff.imaging.preprocess import resample_to_spacing, to_ras
from bids_cadiff.registration import ants as ants_mod
from bids_cadiff.registration.ants import (
    register_atlas,
    warp_distance_field,
    warp_labels,
)
from bids_cadiff.registration.atlas import AtlasSpec, atlas_distance_field, load_atlas, resolve_atlas
from tests.registration.conftest import SHARED_DATA, make_phantom

logger = logging.getLogger(__name__)

SHIFT = (6.0, -8.0, 5.0)


def _subject(skull: bool = True, **kwargs: float) -> nib.Nifti1Image:
    data, _, affine = make_phantom(skull=skull, shift_mm=SHIFT, **kwargs)
    return nib.Nifti1Image(data, affine)


def _field_at_world(field: np.ndarray, img: nib.Nifti1Image, world: tuple[float, ...]) -> np.ndarray:
    ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(img.affine), world)).astype(int)
    return field[:, ijk[0], ijk[1], ijk[2]]


def test_register_phantom_and_warp_field(phantom_atlas: AtlasSpec, tmp_path: Path) -> None:
    fixed = _subject(scale=1.05, intensity_scale=7.0)
    reg = register_atlas(fixed, phantom_atlas, cache_dir=tmp_path)
    assert not reg.cached and not reg.brain_only
    # NCC inside the brain; 0.54 here: the 4 mm phantom brain is mostly boundary voxels
    assert reg.quality > 0.45, reg
    assert all(p.is_file() for p in reg.forward_transforms)
    atlas_img, field = atlas_distance_field(phantom_atlas)
    warped = warp_distance_field(field, atlas_img, reg, fixed)
    assert warped.shape == (3, *fixed.shape) and warped.dtype == np.float32
    # the atlas AC (world 0) moved by SHIFT
    np.testing.assert_allclose(_field_at_world(warped, fixed, SHIFT), 0.5, atol=0.04)
    left = _field_at_world(warped, fixed, (SHIFT[0] - 30, SHIFT[1], SHIFT[2]))
    right = _field_at_world(warped, fixed, (SHIFT[0] + 30, SHIFT[1], SHIFT[2]))
    assert left[0] < 0.4 < 0.6 < right[0]
    assert np.all(warped[:, 0, 0, 0] == 0.0)  # far outside the brain

    labels = np.zeros(atlas_img.shape, np.int16)
    labels[load_atlas(phantom_atlas).brain_mask] = 17
    labels[: atlas_img.shape[0] // 2][load_atlas(phantom_atlas).brain_mask[: atlas_img.shape[0] // 2]] = 53
    warped_labels = warp_labels(labels, atlas_img, reg, fixed)
    assert warped_labels.dtype == np.int16 and set(np.unique(warped_labels)) == {0, 17, 53}


def test_cache_is_reused(phantom_atlas: AtlasSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fixed = _subject()
    first = register_atlas(fixed, phantom_atlas, cache_dir=tmp_path, type_of_transform="Affine")

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("ANTs should not run again")

    monkeypatch.setattr(ants_mod, "_run_ants", boom)
    again = register_atlas(fixed, phantom_atlas, cache_dir=tmp_path, type_of_transform="Affine")
    assert again.cached and again.forward_transforms == first.forward_transforms
    assert again.quality == pytest.approx(first.quality)
    # only finished entries in the cache folder, no temp dirs
    assert [p.name for p in tmp_path.iterdir()] == [first.forward_transforms[0].parent.name]
    # other parameters: another key (and here, ANTs would have to run)
    with pytest.raises(RegistrationError, match="should not run"):
        register_atlas(fixed, phantom_atlas, cache_dir=tmp_path, resolution_mm=3.0,
                       type_of_transform="Affine")
    # the failed run left nothing behind
    assert len(list(tmp_path.iterdir())) == 1


def test_noise_raises_registration_error(phantom_atlas: AtlasSpec, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    _, _, affine = make_phantom()
    noise = nib.Nifti1Image(rng.uniform(0, 100, _subject().shape).astype(np.float32), affine)
    with pytest.raises(RegistrationError, match="noise.nii.gz.*did not register"):
        register_atlas(noise, phantom_atlas, cache_dir=tmp_path, type_of_transform="Affine",
                       image_path="noise.nii.gz")
    assert list(tmp_path.iterdir()) == []  # failures are not cached


def test_empty_image_raises(phantom_atlas: AtlasSpec) -> None:
    empty = nib.Nifti1Image(np.zeros((10, 11, 12), np.float32), np.eye(4))
    with pytest.raises(RegistrationError, match="no positive voxels"):
        register_atlas(empty, phantom_atlas, cache_dir=None, image_path="empty.nii.gz")


def test_skull_stripped_subject_uses_brain_atlas(phantom_atlas: AtlasSpec) -> None:
    fixed = _subject(skull=False)
    reg = register_atlas(fixed, phantom_atlas, cache_dir=None, type_of_transform="Affine")
    assert reg.brain_only and reg.quality > 0.8
    atlas_img, field = atlas_distance_field(phantom_atlas)
    warped = warp_distance_field(field, atlas_img, reg, fixed)
    np.testing.assert_allclose(_field_at_world(warped, fixed, SHIFT), 0.5, atol=0.04)


def test_a_poor_fit_is_tried_as_the_other_kind_of_image(
    phantom_atlas: AtlasSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog,
) -> None:
    """A head whose field of view cuts it can look skull-stripped (its foreground volume is a
    brain's): when the brain-only fit is poor, the fit with skull is tried and kept if better,
    and it is what the cache holds."""
    from bids_cadiff.registration import ants as ants_module

    monkeypatch.setattr(ants_module, "looks_skull_stripped", lambda *a: True)  # misjudged
    # On this phantom the two fits score NCC ~0.29 (brain only) and ~0.31 (with skull), and
    # multi-threaded ANTs moves each by a few hundredths: the brain-only fit is made clearly
    # poor by scoring it at half, so that the test decides nothing on a coin toss.
    real_register = ants_module._register

    def register(*args, brain_only=None, **kwargs):
        reg = real_register(*args, brain_only=brain_only, **kwargs)
        return replace(reg, quality=reg.quality / 2) if reg.brain_only else reg

    monkeypatch.setattr(ants_module, "_register", register)
    fixed = _subject(skull=True)
    with caplog.at_level("WARNING"):
        reg = register_atlas(fixed, phantom_atlas, cache_dir=tmp_path, type_of_transform="Affine",
                             min_quality=0.2)
    assert not reg.brain_only and reg.quality >= 0.2, reg
    assert "trying it as a head with skull" in caplog.text
    assert [p.parent for p in reg.forward_transforms] == [next(tmp_path.iterdir())]
    assert all(p.is_file() for p in reg.forward_transforms)
    again = register_atlas(fixed, phantom_atlas, cache_dir=tmp_path, type_of_transform="Affine",
                           min_quality=0.2)
    assert again.cached and not again.brain_only and again.quality == reg.quality


# ----------------------------------------------------------------------------- real data

@pytest.mark.slow
def test_skull_on_and_off_give_same_field(prepared_real) -> None:
    """sub-01 T1.mgz (skull) vs brainmask.mgz (skull-stripped) of the same head, each prepared
    and registered as the app does (the model's 2 mm grid, N4): the same atlas field."""
    folder = SHARED_DATA / "fstd" / "sub-01"
    with_skull = prepared_real(folder / "T1.mgz")  # shared with tests/qc/test_real_images.py
    stripped = prepared_real(folder / "brainmask.mgz")
    assert not with_skull.registration.brain_only and stripped.registration.brain_only
    np.testing.assert_allclose(with_skull.affine, stripped.affine)  # one head, one grid
    spec = resolve_atlas(None)
    atlas_img, _ = atlas_distance_field(spec)
    spacing = tuple(float(v) for v in np.linalg.norm(stripped.affine[:3, :3], axis=0))
    mask = resample_to_spacing(to_ras(nib.load(folder / "brainmask.mgz")), spacing,
                               order=0)  # the brain on the model grid, no partial-volume shell
    np.testing.assert_allclose(mask.affine, stripped.affine)
    brain = np.asanyarray(mask.dataobj) > 0
    radii = scaling_radii(load_atlas(spec).brain_mask, atlas_img.affine, spec.origin_world)
    field_a, field_b = with_skull.distance, stripped.distance
    diff_mm = np.abs(field_a - field_b)[:, brain] * (2 * radii[:, None])
    mean_mm = float(diff_mm.mean())
    covered = (field_a[0, brain] > 0) & (field_b[0, brain] > 0)
    logger.info("skull on/off: mean |field difference| inside the brain %.2f mm (x, y, z: %s); "
                "%.1f %% of brain voxels covered by both fields, %.2f mm on those",
                mean_mm, diff_mm.mean(axis=1).round(2), 100 * covered.mean(),
                float(diff_mm[:, covered].mean()))
    # Multi-threaded ANTs SyN is not bit-reproducible. On the 1 mm images: 0.90 mm and 2.05 mm
    # in two runs; the one-stage head registration it replaced gave 9.0 mm. On the app's 2 mm
    # grid: 1.20 mm, 99.6 % of brain voxels covered by both. The bound separates good from that
    # failure.
    assert mean_mm < 2.5
    assert covered.mean() > 0.99
