"""--reproducible: the same input, seed and threads give bit-identical outputs, also from fresh
work dirs (each run in its own process: ITK reads its thread count once per process)."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest


def _run(inputs, out, work, *extra: str) -> None:
    cmd = [sys.executable, "-m", "bids_cadiff.cli.run", str(inputs["bids"]), str(out),
           "participant", "--participant-label", "01", "--model", str(inputs["model"]),
           "--atlas", str(inputs["atlas"]), "-w", str(work), "--skip-bids-validation",
           "--steps", "2", "--nprocs", "2", "--omp-nthreads", "2", "--no-reports", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_fresh_work_dirs_give_bit_identical_outputs(phantom_app_inputs, tmp_path):
    for name in ("a", "b"):
        _run(phantom_app_inputs, tmp_path / f"out_{name}", tmp_path / f"work_{name}",
             "--reproducible")
    anat = "sub-01/anat/sub-01"
    for suffix in ("_desc-cadiff_dseg.nii.gz", "_label-uncertainty_desc-cadiff_probseg.nii.gz"):
        a = np.asarray(nib.load(tmp_path / "out_a" / f"{anat}{suffix}").dataobj)
        b = np.asarray(nib.load(tmp_path / "out_b" / f"{anat}{suffix}").dataobj)
        np.testing.assert_array_equal(a, b)
    qc = [(tmp_path / f"out_{n}" / f"{anat}_desc-cadiff_qc.tsv").read_text() for n in "ab"]
    assert qc[0] == qc[1]
    sidecars = [json.loads((tmp_path / f"out_{n}" / f"{anat}_desc-cadiff_dseg.json").read_text())
                for n in "ab"]
    assert sidecars[0]["Registration"] == sidecars[1]["Registration"]
