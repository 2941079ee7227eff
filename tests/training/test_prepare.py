"""Prepared arrays: cached by content, labels on the model grid, label mapping."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bids_cadiff.labels import ASEG_MERGE, SYNTHSEG32
from bids_cadiff.registration.atlas import resolve_atlas
from bids_cadiff.training import prepare
from bids_cadiff.training.prepare import (
    PrepareSettings,
    labels_to_index,
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
