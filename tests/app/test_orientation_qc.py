"""The participant level with a lying header: the T1w is still segmented (as for every QC
flag), but fails QC with an ``orientation`` flag naming the orientation its voxels appear to
have; the same head with a correct header passes the check. Synthetic heads, a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_cadiff.cli.run import main
from bids_cadiff.registration.orientation import CANDIDATES, flip_header
from tests.registration.test_orientation import _head


@pytest.mark.slow
def test_a_lying_header_fails_qc_and_a_true_one_passes(phantom_app_inputs, tmp_path: Path,
                                                       caplog) -> None:
    atlas_dir = tmp_path / "atlas"
    atlas_dir.mkdir()
    data, brain, affine = _head()
    nib.save(nib.Nifti1Image(data, affine), atlas_dir / "head.nii.gz")
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), atlas_dir / "head_brain.nii.gz")

    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(
        json.dumps({"Name": "orientation", "BIDSVersion": "1.10.0"}))
    subject, _, subject_affine = _head(shift=(3.0, -5.0, 2.0), scale=0.95)
    lie = flip_header(subject_affine, subject.shape, CANDIDATES["Rotate180SI"])
    for label, aff in (("01", subject_affine), ("02", lie)):
        (bids / f"sub-{label}" / "anat").mkdir(parents=True)
        nib.save(nib.Nifti1Image(subject * 40, aff),
                 bids / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz")

    out = tmp_path / "out"
    code = main([
        str(bids), str(out), "participant", "--model", str(phantom_app_inputs["model"]),
        "--atlas", str(atlas_dir / "head.nii.gz"), "-w", str(tmp_path / "work"),
        "--skip-bids-validation", "--steps", "2", "--no-reports",
    ])
    assert code == 0  # a QC failure is not a processing failure

    def sidecar(label: str) -> dict:
        path = out / f"sub-{label}" / "anat" / f"sub-{label}_desc-cadiff_dseg.json"
        assert path.with_suffix(".nii.gz").is_file()  # segmented either way
        return json.loads(path.read_text())

    good, bad = sidecar("01"), sidecar("02")
    assert all(f["Check"] != "orientation" for f in good["QC"]["Flags"])
    assert "orientation" in [c["Check"] for c in good["QC"]["Checks"]]
    assert good["Orientation"]["Flagged"] is False and good["Orientation"]["HeaderCodes"] == "RAS"
    assert "orientation" in good["StageSeconds"]

    assert bad["QC"]["Status"] == "fail"
    [flag] = [f for f in bad["QC"]["Flags"] if f["Check"] == "orientation"]
    assert "the voxels look like LAS (or RAS" in flag["Reason"]
    assert "the header says LPS" in flag["Reason"]
    assert bad["Orientation"]["Flagged"] is True
    assert bad["Orientation"]["Apparent"] == ["LAS", "RAS"]
    assert "the voxels look like LAS" in caplog.text  # and the log says it too
