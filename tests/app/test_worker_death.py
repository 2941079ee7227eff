"""Images run in worker processes (``--nprocs 2``): an image whose worker dies (the OOM killer,
a crash in a native library) or that is bad fails alone; the images that ran beside it in the
same pool are finished, not lost with it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_cadiff.io.faults import ENV
from tests.app.conftest import assert_complete


@pytest.mark.slow
def test_a_dying_worker_and_a_bad_image_fail_alone(fast_app_inputs, tmp_path: Path) -> None:
    bids = tmp_path / "bids"
    for sub in ("01", "02"):  # two of the eight phantoms
        shutil.copytree(fast_app_inputs["bids"] / f"sub-{sub}", bids / f"sub-{sub}")
    shutil.copy(fast_app_inputs["bids"] / "dataset_description.json", bids)
    good = nib.load(bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    bad = nib.Nifti1Image(np.asarray(good.dataobj), np.diag([4.0, 4.0, 8.0, 1.0]))
    (bids / "sub-04" / "anat").mkdir(parents=True)
    nib.save(bad, bids / "sub-04" / "anat" / "sub-04_T1w.nii.gz")  # 8 mm: implausible

    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bids_cadiff.cli.run", str(bids), str(out), "participant",
         "--model", str(fast_app_inputs["model"]), "--atlas", str(fast_app_inputs["atlas"]),
         "-w", str(tmp_path / "work"), "--skip-bids-validation", "--steps", "2",
         "--no-reports", "--nprocs", "2", "--omp-nthreads", "1", "--skip-orientation-check"],
        env={**os.environ, ENV: "write:sub-02_desc-cadiff_dseg.nii.gz"},
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    anat = out / "sub-01" / "anat"
    assert (anat / "sub-01_desc-cadiff_dseg.json").is_file(), proc.stderr[-3000:]
    for path in anat.iterdir():
        assert_complete(path)
    assert not (out / "sub-02" / "anat" / "sub-02_desc-cadiff_dseg.json").exists()
    errors = {p.name.split("_")[0]: json.loads(p.read_text())["Error"]
              for p in (out / "logs").glob("*error.json")}
    assert set(errors) == {"sub-02", "sub-04"}
    assert errors["sub-02"] == "worker process died"
    assert "voxel size 4 x 4 x 8 mm, outside the plausible" in errors["sub-04"]
    assert "running them again one at a time" in proc.stderr
