"""Multi-atlas baseline (app/multiatlas.py) with ``registration="none"`` on synthetic heads."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_cadiff.app import multiatlas
from bids_cadiff.app.multiatlas import multiatlas_segment, propagate_labels
from bids_cadiff.app.train import resolve_labels
from bids_cadiff.errors import RegistrationError
from tests.training.synthetic import make_labelled_dataset


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[list[Path], list[Path], Path]:
    bids, labels, _ = make_labelled_dataset(tmp_path)
    subjects = ("01", "02", "03")
    t1ws = [bids / f"sub-{s}/anat/sub-{s}_T1w.nii.gz" for s in subjects]
    dsegs = [labels / f"sub-{s}/anat/sub-{s}_desc-manual_dseg.nii.gz" for s in subjects]
    return t1ws, dsegs, labels


def test_propagate_without_registration_is_a_world_coordinate_copy(dataset):
    t1ws, dsegs, _ = dataset
    target = nib.load(str(t1ws[0]))
    values = propagate_labels(target, t1ws[1], dsegs[1], registration="none")
    own = np.asanyarray(nib.load(str(dsegs[1])).dataobj)
    assert values.dtype == np.int32 and np.array_equal(values, own)  # same grid in this dataset


def test_segment_votes_over_atlases(dataset):
    t1ws, dsegs, labels = dataset
    table, merge = resolve_labels("dseg", labels)
    target = nib.load(str(t1ws[0]))

    def channels_of(path: Path) -> np.ndarray:
        return table.value_to_index(np.asanyarray(nib.load(str(path)).dataobj))

    # One atlas subject, given twice: the vote is its own labels (same grid in this dataset).
    same, affine = multiatlas_segment(
        t1ws[0], [(t1ws[1], dsegs[1])] * 2, table=table, merge=merge, registration="none"
    )
    assert same.shape == target.shape and same.dtype == np.int16
    assert np.allclose(affine, target.affine)
    assert np.array_equal(same, channels_of(dsegs[1]))
    # Two different subjects: a rough segmentation of the third (jittered synthetic heads).
    channels, _ = multiatlas_segment(
        t1ws[0], list(zip(t1ws[1:], dsegs[1:])), table=table, merge=merge, registration="none"
    )
    truth = channels_of(dsegs[0])
    brain = truth > 0
    assert (channels[brain] == truth[brain]).mean() > 0.4


def test_failed_atlases_are_skipped_until_none_is_left(dataset, monkeypatch):
    t1ws, dsegs, labels = dataset
    table, merge = resolve_labels("dseg", labels)
    real = multiatlas.propagate_labels

    def flaky(target, t1w, lab, **kwargs):
        if t1w == t1ws[1]:
            raise RegistrationError(t1w, "did not register")
        return real(target, t1w, lab, **kwargs)

    monkeypatch.setattr(multiatlas, "propagate_labels", flaky)
    channels, _ = multiatlas_segment(t1ws[0], list(zip(t1ws[1:], dsegs[1:])), table=table,
                                     merge=merge, registration="none")
    assert channels.any()
    with pytest.raises(RegistrationError, match="no atlas subject could be registered"):
        multiatlas_segment(t1ws[0], [(t1ws[1], dsegs[1])], table=table, merge=merge,
                           registration="none")
