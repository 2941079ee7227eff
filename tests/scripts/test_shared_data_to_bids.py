"""scripts/shared_data_to_bids.py: the shared data laid out as cadiff-train's inputs."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_cadiff.app.train import find_label_maps, find_training_pairs

from tests.scripts import load_script

def _fake_shared(root: Path) -> Path:
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    for sub in ("sub-01", "sub-02"):
        folder = root / "fstd" / sub
        folder.mkdir(parents=True)
        data = np.zeros((12, 12, 12), np.uint8)
        data[3:9, 3:9, 3:9] = 110
        nib.save(nib.MGHImage(data, affine), folder / "T1.mgz")
        nib.save(nib.MGHImage(data, affine), folder / "brainmask.mgz")
        nib.save(nib.MGHImage((data > 0).astype(np.int32) * 2, affine), folder / "aseg.mgz")
    (root / "fstd" / "sub-03").mkdir()  # no labels: left out
    for folder, name in (("synthseg_label_maps", "training_seg_01"),
                         ("synthseg_label_maps_extra", "fb_01")):
        (root / folder).mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)),
                 root / folder / f"{name}.nii.gz")
        (root / folder / "labels_table.txt").write_text("x\n")
    return root


def test_layout_is_what_cadiff_train_reads(tmp_path: Path):
    shared = _fake_shared(tmp_path / "shared")
    out = tmp_path / "out"
    module = load_script("shared_data_to_bids")
    assert module.main([str(out), "--shared", str(shared)]) == 0
    pairs = find_training_pairs(out / "bids", out / "labels")
    assert [p.subject for p in pairs] == ["01", "02"]
    assert all(p.mask is not None and p.mask.name.endswith("_desc-brain_mask.nii.gz") for p in pairs)
    t1w = nib.load(pairs[0].t1w)
    assert np.allclose(t1w.affine, np.diag([-1.0, 1.0, 1.0, 1.0]))
    assert np.asarray(nib.load(pairs[0].dseg).dataobj).max() == 2
    assert [m.name for m in find_label_maps(out / "label_maps")] == ["fb_01.nii.gz",
                                                                    "training_seg_01.nii.gz"]
    desc = json.loads((out / "labels" / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    before = pairs[0].t1w.stat().st_mtime_ns
    assert module.main([str(out), "--shared", str(shared)]) == 0  # idempotent: files kept
    assert pairs[0].t1w.stat().st_mtime_ns == before
