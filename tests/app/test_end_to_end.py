"""The real pipeline on a raw scanner T1w (../shared/data/raw_t1/chris_t1.nii.gz, skull on)
laid out as a BIDS dataset, with the bundled default model and Colin27."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_cadiff.app.participant import DEFAULT_MODEL
from bids_cadiff.cli.run import main

REPO = Path(__file__).resolve().parents[2]
CHRIS = REPO.parent / "shared" / "data" / "raw_t1" / "chris_t1.nii.gz"
COLIN = Path("/usr/share/mricron/templates/ch2.nii.gz")


@pytest.mark.slow
def test_chris_t1_end_to_end(tmp_path, validator_exe):
    if not CHRIS.is_file():
        pytest.skip(f"{CHRIS} is absent (the project's shared data is not beside the repo)")
    if not COLIN.is_file():
        pytest.skip("Colin27 is absent: apt-get install mricron-data")
    if not DEFAULT_MODEL.is_file():
        pytest.skip(f"no bundled default model at {DEFAULT_MODEL}")
    bids, out, work = tmp_path / "bids", tmp_path / "derivatives" / "cadiff", tmp_path / "work"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_demo_dataset.py"), str(bids), "--t1w",
         str(CHRIS)], check=True,
    )
    assert main([str(bids), str(out), "participant", "-w", str(work)]) == 0  # input validated

    t1 = nib.load(bids / "sub-demo" / "anat" / "sub-demo_T1w.nii.gz")
    seg = nib.load(out / "sub-demo" / "anat" / "sub-demo_desc-cadiff_dseg.nii.gz")
    assert seg.shape == t1.shape
    np.testing.assert_allclose(seg.affine, t1.affine, atol=1e-5)
    labels = np.asarray(seg.dataobj)
    sidecar = json.loads(
        (out / "sub-demo" / "anat" / "sub-demo_desc-cadiff_dseg.json").read_text()
    )
    assert sidecar["Registration"]["Value"] > 0.4
    assert sidecar["Model"]["Name"] == "cadiff-default"
    assert sidecar["LabelPrior"]["Cells"] == [48, 48, 48]

    # anatomically plausible: brain volume, hemispheres on their sides, structures present
    volumes = dict(zip(*[line.split("\t") for line in
                         (out / "sub-demo/anat/sub-demo_desc-cadiff_volumes.tsv").read_text().splitlines()]))
    assert 800_000 < float(volumes["TotalBrain"]) < 1_900_000
    present = set(np.unique(labels).tolist())
    # WM, cortex, cerebellum, brain stem, and the subcortical structures and ventricles
    assert {2, 3, 41, 42, 8, 47, 16, 10, 49, 11, 50, 12, 51, 4, 43, 17, 53} <= present
    thalamus_mm3 = [float(volumes[k]) for k in ("L-TH", "R-TH")]
    assert all(4_000 < v < 12_000 for v in thalamus_mm3), thalamus_mm3
    world_x = {}
    for value in (2, 41, 10, 49):
        idx = np.argwhere(labels == value)[::50]
        world_x[value] = (nib.affines.apply_affine(seg.affine, idx)[:, 0]).mean()
    assert world_x[2] < world_x[41]  # left WM on the left (RAS x smaller)
    assert world_x[10] < world_x[49]  # left thalamus on the left

    _field_looks_right(bids / "sub-demo" / "anat" / "sub-demo_T1w.nii.gz", work)

    proc = subprocess.run([str(validator_exe), str(out), "--format", "json", "--no-color"],
                          capture_output=True, text=True, timeout=300)
    issues = json.loads(proc.stdout)["issues"]["issues"]
    assert [i for i in issues if i["severity"] == "error"] == []

    assert main([str(bids), str(out), "group"]) == 0
    rows = (out / "group" / "desc-cadiff_volumes.tsv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("sub-demo")


def _field_looks_right(t1w: Path, work: Path) -> None:
    """The atlas field the run used (its registration, from the work dir's cache) lies in the
    head the right way round: the atlas centre (0.5, 0.5, 0.5) deep in the middle of the brain,
    each coordinate growing left to right, back to front, bottom to top."""
    from bids_cadiff.app.participant import load_model, prepare_for_model
    from bids_cadiff.io.nifti import load_t1w
    from bids_cadiff.registration.atlas import resolve_atlas

    meta = load_model(None).metadata
    prepared = prepare_for_model(load_t1w(t1w), meta, atlas=resolve_atlas(None),
                                 cache_dir=work / "registration")
    assert prepared.registration.cached  # the run's own registration, not a new one
    assert prepared.registration.quality > 0.4
    warped, zooms = prepared.distance, np.asarray(meta.voxel_size, dtype=float)
    inside = warped[0] > 0
    brain_ml = inside.sum() * float(np.prod(zooms)) / 1000
    assert 1100 < brain_ml < 2300, brain_ml
    dist = np.where(inside, ((warped - 0.5) ** 2).sum(axis=0), np.inf)
    ac = np.unravel_index(np.argmin(dist), dist.shape)
    assert dist[ac] < 1e-3
    centre = np.argwhere(inside).mean(axis=0)
    assert np.linalg.norm((np.asarray(ac) - centre) * zooms) < 25
    step = np.rint(20 / zooms).astype(int)  # 20 mm either side
    for axis in range(3):  # the model grid is RAS
        lo, hi = list(ac), list(ac)
        lo[axis] -= step[axis]
        hi[axis] += step[axis]
        assert warped[(axis, *lo)] < 0.5 < warped[(axis, *hi)]
