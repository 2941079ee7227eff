"""Prepared arrays: cached by content, labels on the model grid, label mapping."""

from __future__ import annotations

import fcntl
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from bids_cadiff.labels import ASEG_MERGE, SYNTHSEG32
from bids_cadiff.registration.atlas import resolve_atlas
from bids_cadiff.training import prepare
from bids_cadiff.training.prepare import (
    EntryBusy,
    PrepareSettings,
    labels_to_index,
    prepare_in_turn,
    prepare_label_map,
    prepare_training_image,
    split_by_hemisphere,
)
from tests.training.synthetic import make_labelled_dataset


def test_prepare_caches_on_content(tmp_path: Path, monkeypatch):
    bids, labels, atlas = make_labelled_dataset(tmp_path, ("01",))
    t1w = bids / "sub-01/anat/sub-01_T1w.nii.gz"
    dseg = labels / "sub-01/anat/sub-01_desc-manual_dseg.nii.gz"
    settings = PrepareSettings(atlas=resolve_atlas(atlas), voxel_size=(4.0, 4.0, 4.0),
                               registration="none")
    first = prepare_training_image(t1w, dseg, settings=settings, work_dir=tmp_path / "work")
    assert first.image.shape == first.label_values.shape == first.distance.shape[1:]
    assert 0.0 <= first.image.min() and first.image.max() <= 1.0
    assert first.distance.max() > 0.5 and set(np.unique(first.label_values)) >= {0, 2, 41}
    calls = []
    monkeypatch.setattr(prepare, "default_prepare", lambda *a, **k: calls.append(1))
    again = prepare_training_image(t1w, dseg, settings=settings, work_dir=tmp_path / "work")
    assert not calls and np.array_equal(again.image, first.image) and again.key == first.key
    coarser = PrepareSettings(atlas=settings.atlas, voxel_size=(5.0, 5.0, 5.0), registration="none")
    assert prepare.cache_key(t1w, dseg, coarser) != first.key
    assert len(list((tmp_path / "work/prepared").glob("*.npz"))) == 1
    assert not list((tmp_path / "work/prepared").glob(".tmp*"))


def test_wm_hypointensities_go_to_the_nearest_white_matter():
    values = np.zeros((9, 3, 3), np.int32)
    values[:4] = 2
    values[5:] = 41
    values[1, 1, 1] = values[7, 1, 1] = 77
    split = split_by_hemisphere(values)
    assert split[1, 1, 1] == 2 and split[7, 1, 1] == 41
    index = labels_to_index(values, SYNTHSEG32, ASEG_MERGE)
    assert index[7, 1, 1] == SYNTHSEG32.values.index(41) and index.dtype == np.int16
    values[4, 1, 1] = 251  # corpus callosum: cerebral white matter by side, with the affine
    with_affine = labels_to_index(values, SYNTHSEG32, ASEG_MERGE, np.eye(4))
    assert with_affine[7, 1, 1] == SYNTHSEG32.values.index(41)
    assert with_affine[4, 1, 1] in (SYNTHSEG32.values.index(2), SYNTHSEG32.values.index(41))


def _settings(atlas: Path) -> PrepareSettings:
    return PrepareSettings(atlas=resolve_atlas(atlas), voxel_size=(4.0, 4.0, 4.0),
                           registration="none")


def test_a_mask_file_gives_the_skull_stripped_input(tmp_path: Path):
    bids, labels, atlas = make_labelled_dataset(tmp_path, ("01",))
    t1w = bids / "sub-01/anat/sub-01_T1w.nii.gz"
    dseg = labels / "sub-01/anat/sub-01_desc-manual_dseg.nii.gz"
    img = nib.load(dseg)
    box = np.zeros(img.shape, np.uint8)
    box[4:16, 4:18, 4:14] = 1  # a mask unlike the labels, so its use is visible
    mask_path = tmp_path / "sub-01_desc-brain_mask.nii.gz"
    nib.save(nib.Nifti1Image(box, img.affine), mask_path)
    settings = _settings(atlas)
    with_mask = prepare_training_image(t1w, dseg, settings=settings, work_dir=tmp_path / "w",
                                       mask_path=mask_path)
    assert with_mask.real and with_mask.mask is not None and with_mask.image_brain is not None
    np.testing.assert_array_equal(with_mask.mask, box > 0)
    assert not with_mask.image_brain[~with_mask.mask].any()
    # the app's normalisation of the masked, N4-corrected image: spans [0, 1] inside the mask
    inside = with_mask.image_brain[with_mask.mask]
    assert inside.max() == pytest.approx(1.0) and inside.min() >= 0.0
    without = prepare_training_image(t1w, dseg, settings=settings, work_dir=tmp_path / "w")
    assert without.key != with_mask.key  # the mask is part of the cache key
    np.testing.assert_array_equal(without.mask, ndimage.binary_fill_holes(without.label_values > 0))
    cached = prepare_training_image(t1w, dseg, settings=settings, work_dir=tmp_path / "w",
                                    mask_path=mask_path)
    np.testing.assert_array_equal(cached.image_brain, with_mask.image_brain)
    np.testing.assert_array_equal(cached.mask, with_mask.mask)


def test_label_maps_without_images(tmp_path: Path, monkeypatch):
    _, labels, atlas = make_labelled_dataset(tmp_path, ("01",))
    img = nib.load(labels / "sub-01/anat/sub-01_desc-manual_dseg.nii.gz")
    values = np.asarray(img.dataobj).astype(np.int16)
    # an older SynthSeg map: both hemispheres carry left codes
    left_only = np.select([values == 41, values == 42, values == 43], [2, 3, 4], values)
    path = tmp_path / "old_01.nii.gz"
    nib.save(nib.Nifti1Image(left_only.astype(np.int16), img.affine), path)
    settings = _settings(atlas)
    plain = prepare_label_map(path, settings=settings, work_dir=tmp_path / "w")
    split = prepare_label_map(path, settings=settings, work_dir=tmp_path / "w", split_midline=True)
    assert not plain.real and not split.real and plain.key != split.key
    assert not np.isin(plain.label_values, [41, 42, 43]).any()
    assert np.isin(split.label_values, [41, 42, 43]).any()
    # the split follows the mid-sagittal plane: it gives back the original right codes
    original = prepare_training_image(
        tmp_path / "old_01.nii.gz", labels / "sub-01/anat/sub-01_desc-manual_dseg.nii.gz",
        settings=settings, work_dir=tmp_path / "w2").label_values
    agree = (split.label_values == original)[original > 0].mean()
    assert agree > 0.95
    assert split.distance.max() > 0.5 and split.mask.any()
    calls = []
    monkeypatch.setattr(prepare, "default_prepare", lambda *a, **k: calls.append(1))
    again = prepare_label_map(path, settings=settings, work_dir=tmp_path / "w", split_midline=True)
    assert not calls and not again.real
    np.testing.assert_array_equal(again.label_values, split.label_values)


def test_runs_sharing_a_work_dir_share_out_the_preparing(tmp_path: Path):
    """An entry another process is preparing is put off: the rest is prepared meanwhile, then
    the run waits for that process's lock and reads (or, as here, makes) the entry."""
    bids, labels, atlas = make_labelled_dataset(tmp_path, ("01", "02"))
    settings, work = _settings(atlas), tmp_path / "w"
    pairs = [(bids / f"sub-{s}/anat/sub-{s}_T1w.nii.gz",
              labels / f"sub-{s}/anat/sub-{s}_desc-manual_dseg.nii.gz") for s in ("01", "02")]
    first = work / "prepared" / f"{prepare.cache_key(*pairs[0], settings)}.npz"
    first.parent.mkdir(parents=True)
    order: list[tuple[str, bool]] = []

    def prepare_one(pair: tuple[Path, Path], wait: bool) -> prepare.PreparedTrainingImage:
        order.append((pair[0].name, wait))
        return prepare_training_image(*pair, settings=settings, work_dir=work, wait=wait)

    with open(first.with_suffix(".lock"), "a") as other:  # another process is on sub-01
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(EntryBusy):
            prepare_one(pairs[0], False)
        assert not first.exists()
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(prepare_in_turn, pairs, prepare_one, desc="preparing",
                                 unit="image", progress=False)
            deadline = time.monotonic() + 60
            while not list(first.parent.glob("*.npz")) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)
            # sub-02 is prepared while sub-01 is put off, and the run waits for sub-01's lock
            assert len(list(first.parent.glob("*.npz"))) == 1 and not first.exists()
            assert not future.done()
            fcntl.flock(other, fcntl.LOCK_UN)
            result = future.result(timeout=60)
    assert [item.t1w_path for item in result] == [t1w for t1w, _ in pairs]  # in task order
    assert first.is_file() and result[0].key == first.stem
    assert order[1:] == [("sub-01_T1w.nii.gz", False), ("sub-02_T1w.nii.gz", False),
                         ("sub-01_T1w.nii.gz", True)]
    # alone, nothing is put off and every entry comes from the cache
    again = prepare_in_turn(pairs, prepare_one, desc="preparing", unit="image", progress=False)
    assert [item.key for item in again] == [item.key for item in result]
