"""Unusual but valid T1w files go through the participant level (issue #15, item 4): other data
types, scaled intensities, an uncompressed ``.nii``, an oblique grid, thick slices and a cut
field of view each give a label map on the T1w's own grid, with QC that includes the coverage
check. Phantoms and a tiny model; the accuracy on real images is measured by
``benchmarks/unusual_images.py`` (docs/reproducibility.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from bids_cadiff.cli.run import main
from tests.registration.conftest import make_phantom


def _oblique(data: np.ndarray, affine: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """The same head on a grid rotated ``degrees`` about the x axis (about the grid's centre)."""
    a = math.radians(degrees)
    rotation = np.eye(4)
    rotation[1:3, 1:3] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    centre = affine @ np.r_[(np.array(data.shape) - 1) / 2, 1]
    move = np.eye(4)
    move[:3, 3] = centre[:3]
    new = move @ rotation @ np.linalg.inv(move) @ affine
    matrix = np.linalg.inv(affine) @ new
    out = ndimage.affine_transform(data, matrix[:3, :3], matrix[:3, 3], order=1)
    return out.astype(np.float32), new


def _resampled(data: np.ndarray, affine: np.ndarray, zooms: tuple[float, float, float]
               ) -> tuple[np.ndarray, np.ndarray]:
    """The same head on a grid of voxel size ``zooms`` covering the same field of view."""
    old = np.sqrt((affine[:3, :3] ** 2).sum(0))
    shape = tuple(int(n * o // z) for n, o, z in zip(data.shape, old, zooms))
    new = affine.copy()
    new[:3, :3] = affine[:3, :3] / old * np.asarray(zooms)
    matrix = np.linalg.inv(affine) @ new
    out = ndimage.affine_transform(data, matrix[:3, :3], matrix[:3, 3], output_shape=shape,
                                   order=1)
    return out.astype(np.float32), new


def _variants() -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """Unusual T1w files of a phantom head (its 4 mm grid stands for 1 mm). Other data types
    and scalings are read the same way (``tests/io/test_nifti.py``); one of them goes through
    here too."""
    head, _, affine = make_phantom(skull=False, shift_mm=(-2, 3, 0), scale=0.95)
    cut = head.shape[2] // 3
    return {
        "int16nii": (np.round(head * 1e2).astype(np.int16), affine, ".nii"),
        "oblique": (*_oblique(head, affine, 20.0), ".nii.gz"),
        "thick": (*_resampled(head, affine, (2.0, 2.0, 6.0)), ".nii.gz"),
        "cut": (np.ascontiguousarray(head[:, :, cut:]),
                affine @ np.r_[np.c_[np.eye(3), [0, 0, cut]], [[0, 0, 0, 1]]], ".nii.gz"),
    }


@pytest.mark.slow
def test_unusual_files_give_labels_on_their_own_grid(fast_app_inputs, tmp_path: Path) -> None:
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(
        json.dumps({"Name": "unusual", "BIDSVersion": "1.10.0"}))
    variants = _variants()
    for name, (data, affine, suffix) in variants.items():
        path = bids / f"sub-{name}" / "anat" / f"sub-{name}_T1w{suffix}"
        path.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(data, affine), path)
        assert nib.load(path).get_data_dtype() == data.dtype

    out = tmp_path / "out"
    code = main([
        str(bids), str(out), "participant", "--model", str(fast_app_inputs["model"]),
        "--atlas", str(fast_app_inputs["atlas"]), "-w", str(tmp_path / "work"),
        "--skip-bids-validation", "--steps", "2", "--no-reports", "--omp-nthreads", "1",
        "--skip-orientation-check",
    ])
    assert code == 0
    for name, (data, affine, suffix) in variants.items():
        dseg = out / f"sub-{name}" / "anat" / f"sub-{name}_desc-cadiff_dseg.nii.gz"
        labels = nib.load(dseg)
        assert labels.shape == data.shape, name
        assert np.allclose(labels.affine, affine, atol=1e-4), name
        assert np.asarray(labels.dataobj).any(), name
        sidecar = json.loads(dseg.with_name(dseg.name.replace(".nii.gz", ".json")).read_text())
        checks = [c["Check"] for c in sidecar["QC"]["Checks"]]
        assert "coverage" in checks and "resolution" in checks, name
        assert "orientation" not in checks and "orientation" not in sidecar["StageSeconds"]
    assert not list((out / "logs").glob("*error.json"))
