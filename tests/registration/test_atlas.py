"""Tests for bids_cadiff.registration.atlas."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_cadiff.errors import UsageError
from bids_cadiff.registration import atlas as atlas_mod
from bids_cadiff.registration.atlas import (
    AtlasSpec,
    atlas_distance_field,
    load_atlas,
    resolve_atlas,
)
from tests.registration.conftest import make_phantom


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_explicit_atlas_with_bet_sibling(tmp_path: Path) -> None:
    data, brain, affine = make_phantom(skull=True)
    t1 = _save(tmp_path / "head.nii.gz", data, affine)
    _save(tmp_path / "headbet.nii.gz", data * brain, affine)
    spec = resolve_atlas(t1)
    assert spec.name == "custom" and spec.has_skull
    assert spec.brain_mask_path == tmp_path / "headbet.nii.gz"
    loaded = load_atlas(spec)
    np.testing.assert_array_equal(loaded.brain_mask, brain)
    assert not loaded.brain_mask.flags.writeable


def test_explicit_brain_extracted_atlas_uses_threshold(tmp_path: Path) -> None:
    data, brain, affine = make_phantom(skull=False)
    spec = resolve_atlas(_save(tmp_path / "template.nii.gz", data, affine))
    assert spec.brain_mask_path is None and not spec.has_skull
    assert "threshold" in spec.brain_mask_source
    mask = load_atlas(spec).brain_mask
    assert abs(int(mask.sum()) - int(brain.sum())) < 0.02 * brain.sum()


def test_explicit_with_skull_and_no_mask_is_refused(tmp_path: Path) -> None:
    data, _, affine = make_phantom(skull=True)
    with pytest.raises(UsageError, match="head_brain.nii.gz"):
        resolve_atlas(_save(tmp_path / "head.nii.gz", data, affine))


def test_explicit_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        resolve_atlas(tmp_path / "nope.nii.gz")


def test_default_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    colin = tmp_path / "colin"
    colin.mkdir()
    data, brain, affine = make_phantom(skull=True)
    _save(colin / "ch2.nii.gz", data, affine)
    _save(colin / "ch2bet.nii.gz", data * brain, affine)
    spec = resolve_atlas(None, colin27_dir=colin)
    assert spec.name == "Colin27" and spec.brain_mask_path == colin / "ch2bet.nii.gz"

    empty = tmp_path / "empty"
    empty.mkdir()
    if atlas_mod._nilearn_mni_path() is not None:
        assert resolve_atlas(None, colin27_dir=empty).name == "MNI152NLin2009"
    monkeypatch.setattr(atlas_mod, "_nilearn_mni_path", lambda: None)
    with pytest.raises(UsageError, match="apt-get install mricron-data"):
        resolve_atlas(None, colin27_dir=empty)


def test_distance_field_cached_per_spec(phantom_atlas: AtlasSpec) -> None:
    image, field = atlas_distance_field(phantom_atlas)
    again = atlas_distance_field(phantom_atlas)
    assert again[1] is field and again[0] is image
    assert field.shape == (3, *image.shape) and field.dtype == np.float32
    assert not field.flags.writeable
    centre = tuple((np.asarray(image.shape) - 1) // 2)
    np.testing.assert_allclose(field[(slice(None), *centre)], 0.5, atol=1e-6)


def test_real_colin27_and_mni_load() -> None:
    spec = resolve_atlas(None)
    loaded = load_atlas(spec)
    assert loaded.t1.shape == loaded.brain_mask.shape
    voxel_ml = abs(np.linalg.det(loaded.t1.affine[:3, :3])) / 1000
    assert 1000 < loaded.brain_mask.sum() * voxel_ml < 2200
