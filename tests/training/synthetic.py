"""A tiny labelled BIDS dataset: T1w heads, a derivatives folder of ``*_dseg`` maps, an atlas.

Volumes are 20 x 22 x 18 voxels of 4 mm (the smallest the app's T1w checks accept), centred on
world (0, 0, 0) like an MNI-space head, so that ``--registration none`` (the atlas field
resampled by world coordinates) gives a meaningful field. Label values are FreeSurfer's:
2/41 left/right white matter, 3/42 cortex, 4/43 lateral ventricles, 77 WM hypointensities.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

SHAPE = (20, 22, 18)
VOXEL = 4.0
#: dseg.tsv rows (index, name).
DSEG_VALUES = {
    2: "Left-Cerebral-White-Matter", 3: "Left-Cerebral-Cortex", 4: "Left-Lateral-Ventricle",
    41: "Right-Cerebral-White-Matter", 42: "Right-Cerebral-Cortex",
    43: "Right-Lateral-Ventricle", 77: "WM-hypointensities",
}


def _affine(shape: Sequence[int] = SHAPE, voxel: float = VOXEL) -> np.ndarray:
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = -voxel * (np.asarray(shape) - 1) / 2.0
    return affine


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def head(seed: int, shape: Sequence[int] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """``(t1w float32, labels int16)`` of a jittered two-hemisphere 'brain'."""
    rng = np.random.default_rng(seed)
    centre = (np.asarray(shape) - 1) / 2.0 + rng.uniform(-0.7, 0.7, 3)
    radii = np.asarray(shape) * np.array([0.36, 0.38, 0.36]) * rng.uniform(0.93, 1.07)
    grid = np.indices(shape).astype(float)
    rel = [(g - c) / r for g, c, r in zip(grid, centre, radii)]
    r2 = sum(x**2 for x in rel)
    left = grid[0] < centre[0]
    labels = np.zeros(shape, np.int16)
    labels[r2 <= 1.0] = np.where(left, 3, 42)[r2 <= 1.0]
    labels[r2 <= 0.6] = np.where(left, 2, 41)[r2 <= 0.6]
    vent = ((rel[0] * 3 + np.where(left, 1.0, -1.0)) ** 2 + (rel[1] * 2) ** 2 + (rel[2] * 3) ** 2) <= 1.0
    labels[vent & (r2 <= 0.6)] = np.where(left, 4, 43)[vent & (r2 <= 0.6)]
    labels[(np.abs(rel[0] + 0.35) < 0.08) & (np.abs(rel[1]) < 0.1) & (np.abs(rel[2]) < 0.1)] = 77
    intensity = {0: 30.0, 2: 110.0, 41: 110.0, 3: 70.0, 42: 70.0, 4: 20.0, 43: 20.0, 77: 80.0}
    image = np.zeros(shape, np.float32)
    for value, level in intensity.items():
        image[labels == value] = level
    scalp = (r2 > 1.15) & (r2 <= 1.6)
    image[scalp] = 90.0
    image[r2 > 1.6] = 0.0
    image += rng.normal(0.0, 4.0, shape).astype(np.float32)
    return np.clip(image, 0, None) * 10.0, labels


def make_atlas(path: Path) -> Path:
    """A brain-extracted 'atlas' (name says brain) centred on world (0, 0, 0), 4 mm."""
    shape = (24, 26, 22)
    grid = np.indices(shape).astype(float)
    c = (np.asarray(shape) - 1) / 2.0
    r2 = sum(((g - ci) / (0.36 * n)) ** 2 for g, ci, n in zip(grid, c, shape))
    data = np.where(r2 <= 1.0, 100.0, 0.0).astype(np.float32)
    data[r2 <= 0.6] = 150.0
    return _save(data, _affine(shape), path)


def make_labelled_dataset(
    root: Path, subjects: Sequence[str] = ("01", "02", "03"), *, with_session: bool = False
) -> tuple[Path, Path, Path]:
    """Write ``root/bids``, ``root/labels`` and ``root/atlas_brain.nii.gz``; return the three."""
    bids, labels = root / "bids", root / "labels"
    bids.mkdir(parents=True, exist_ok=True)
    (bids / "dataset_description.json").write_text(json.dumps(
        {"Name": "synthetic", "BIDSVersion": "1.10.0", "DatasetType": "raw"}))
    (labels).mkdir(parents=True, exist_ok=True)
    (labels / "dataset_description.json").write_text(json.dumps(
        {"Name": "synthetic labels", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
         "GeneratedBy": [{"Name": "manual"}]}))
    (labels / "dseg.tsv").write_text(
        "index\tname\n" + "".join(f"{v}\t{n}\n" for v, n in DSEG_VALUES.items())
    )
    for i, sub in enumerate(subjects):
        image, lab = head(seed=100 + i)
        ses = "_ses-1" if with_session else ""
        sdir = f"sub-{sub}/ses-1/anat" if with_session else f"sub-{sub}/anat"
        _save(image, _affine(), bids / sdir / f"sub-{sub}{ses}_T1w.nii.gz")
        _save(lab, _affine(), labels / sdir / f"sub-{sub}{ses}_desc-manual_dseg.nii.gz")
    return bids, labels, make_atlas(root / "atlas_brain.nii.gz")


#: A tiny model and schedule for tests (seconds per run on one CPU).
TINY_ARGS = [
    "--registration", "none", "--voxel-size", "4", "--labels", "dseg",
    "--channels", "8", "16", "--time-embed-dim", "16", "--timesteps", "50",
    "--sampling-steps", "2", "--patch-size", "16", "--batch-size", "2",
    "--lr", "1e-3", "--no-progress",
]
