"""The bundled QC reference on a real head (shared data): quiet on a good registration and
good labels, firing on the same registration moved by 8 mm and on deliberately wrong labels."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_cadiff.labels import SYNTHSEG32, aseg_to_table_values
from bids_cadiff.qc.flags import load_reference, qc_flags
from bids_cadiff.qc.structures import structure_rows

SUBJECT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fstd" / "sub-01"

pytestmark = pytest.mark.skipif(
    not (SUBJECT / "T1.mgz").is_file(),
    reason=f"needs the project's shared data ({SUBJECT}): not on this machine",
)


def _flags(rows, ncc: float = 0.6) -> dict:
    return qc_flags(rows, registration_ncc=ncc, brain_only=False, brain_uncertainty=0.1,
                    reference=load_reference())


@pytest.mark.slow
def test_registration_check_passes_the_real_registration_and_catches_it_moved(prepared_real):
    from bids_cadiff.registration.ants import registration_ncc
    from bids_cadiff.registration.atlas import resolve_atlas

    atlas = resolve_atlas(None)
    prepared = prepared_real(SUBJECT / "T1.mgz")  # registered once, shared with test_ants.py
    grid = nib.Nifti1Image(prepared.corrected, prepared.affine)
    good = prepared.registration.quality
    assert registration_ncc(grid, atlas, prepared.registration) == pytest.approx(good, abs=1e-6)
    assert _flags([], good)["Status"] == "pass"
    moved = registration_ncc(grid, atlas, prepared.registration, shift_mm=8.0)
    qc = _flags([], moved)
    assert [f["Check"] for f in qc["Flags"]] == ["registration"], (good, moved)


def test_good_labels_pass_and_wrong_labels_fail():
    aseg = nib.load(SUBJECT / "aseg.mgz")
    labels = aseg_to_table_values(np.asarray(aseg.dataobj), aseg.affine, SYNTHSEG32)
    unc = np.zeros(labels.shape, np.float32)
    voxel = float(np.prod(aseg.header.get_zooms()[:3]))
    qc = _flags(structure_rows(labels, unc, SYNTHSEG32, voxel))
    assert qc["Status"] == "pass", qc["Flags"]

    wrong = labels.copy()
    wrong[wrong == 17] = 0  # left hippocampus gone
    wrong[wrong == 10] = 2  # left thalamus labelled white matter
    wrong[wrong == 12] = 51  # left putamen labelled right: R-PU in two pieces, too big
    qc = _flags(structure_rows(wrong, unc, SYNTHSEG32, voxel))
    found = {(f["Check"], f["Structure"]) for f in qc["Flags"]}
    assert {("missing", "L-HI"), ("missing", "L-TH"), ("missing", "L-PU"),
            ("pieces", "R-PU"), ("volume", "R-PU")} <= found, found
    assert qc["Status"] == "fail"
