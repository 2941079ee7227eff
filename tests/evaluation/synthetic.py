"""Tiny predicted and reference label maps laid out as two BIDS derivatives datasets.

``make_pred_ref_dirs(root)`` writes:

* sub-01: L-WM shifted one voxel along axis 2 in the prediction (Dice 0.75, HD95 2 mm with
  voxels of 0.5 x 1 x 2 mm; see tests/evaluation/test_metrics.py::test_shifted_cubes_anisotropic);
* sub-02 ses-1: a perfect prediction, but the reference carries aseg values 31 (merged to
  background by ASEG_MERGE) and 1000 (not in the table: background).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (9, 10, 11)
AFFINE = np.diag([0.5, 1.0, 2.0, 1.0])
#: The sub-02 ses-1 prediction (its reference has the same name without ``desc-cadiff``).
SUB02_PRED = "sub-02/ses-1/anat/sub-02_ses-1_desc-cadiff_dseg.nii.gz"


def save_dseg(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    """Write ``data`` as an int16 label map."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.int16), affine), str(path))
    return path


def derivatives_dataset(root: Path, name: str) -> Path:
    """An empty derivatives dataset (``dataset_description.json`` only)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": name, "BIDSVersion": "1.9.0", "DatasetType": "derivative"})
    )
    return root


def ref_map() -> np.ndarray:
    """Left-Cerebral-White-Matter (2, L-WM) cube and a Left-Hippocampus (17, L-HI) slab."""
    ref = np.zeros(SHAPE, dtype=np.int16)
    ref[2:6, 2:6, 2:6] = 2
    ref[6:8, 1:8, 1:9] = 17
    return ref


def make_pred_ref_dirs(root: Path) -> tuple[Path, Path]:
    """Write the prediction and reference datasets (see the module docstring)."""
    pred_dir = derivatives_dataset(root / "cadiff", "CA-Diff")
    ref_dir = derivatives_dataset(root / "freesurfer", "aseg")
    ref1 = ref_map()
    pred1 = ref1.copy()
    pred1[2:6, 2:6, 2:6] = 0
    pred1[2:6, 2:6, 3:7] = 2
    save_dseg(pred_dir / "sub-01/anat/sub-01_desc-cadiff_dseg.nii.gz", pred1)
    save_dseg(ref_dir / "sub-01/anat/sub-01_desc-aseg_dseg.nii.gz", ref1)
    ref2 = ref_map()
    pred2 = ref2.copy()
    ref2[0, 0, 0] = 31
    ref2[0, 0, 1] = 1000
    save_dseg(pred_dir / SUB02_PRED, pred2)
    save_dseg(ref_dir / "sub-02/ses-1/anat/sub-02_ses-1_dseg.nii.gz", ref2)
    return pred_dir, ref_dir
