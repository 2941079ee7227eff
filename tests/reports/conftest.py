"""A small fake derivatives dataset for the report tests, written with the derivatives writers.

Images (entity prefixes):

* ``sub-01_ses-1``, ``sub-01_ses-2_run-1``: finished, QC pass, all four figures, QC tables.
* ``sub-01_ses-2_run-2``: failed (error record only; its message holds HTML).
* ``sub-02`` ... ``sub-07``: finished; ``sub-04`` fails QC (a registration flag and a volume
  flag on R-HI); ``sub-03`` was made by an older version (no QC, no QC table, dseg figure
  only); ``sub-05`` has an outlying left hippocampus (L-HI) volume.
* ``sub-08``: failed, no outputs.

Only ``sub-01`` and ``sub-04`` have figures (written by :func:`write_figures` from 40^3
volumes); the group table has one row per finished image and a ``qc`` column.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_cadiff.bidsio import derivatives as deriv
from bids_cadiff.labels import SYNTHSEG32
from bids_cadiff.reports.figures import write_figures

STRUCTURES = ("L-WM", "R-WM", "L-HI", "R-HI", "L-LV")
TYPICAL = {"L-WM": 220000.0, "R-WM": 221000.0, "L-HI": 4100.0, "R-HI": 4200.0, "L-LV": 9000.0}
FINISHED = {
    "sub-01_ses-1": {"subject": "01", "session": "1"},
    "sub-01_ses-2_run-1": {"subject": "01", "session": "2", "run": "1"},
    "sub-02": {"subject": "02"},
    "sub-03": {"subject": "03"},
    "sub-04": {"subject": "04"},
    "sub-05": {"subject": "05"},
    "sub-06": {"subject": "06"},
    "sub-07": {"subject": "07"},
}
FAILED = {
    "sub-01_ses-2_run-2": {"subject": "01", "session": "2", "run": "2"},
    "sub-08": {"subject": "08"},
}
WITH_FIGURES = ("sub-01_ses-1", "sub-01_ses-2_run-1", "sub-04")
OUTLIER = ("sub-05", "L-HI")
ERROR_MESSAGE = "registration diverged: <script>alert('x')</script> & gave up"


@dataclass(frozen=True)
class FakeDerivatives:
    root: Path


def synthetic_volumes(shape: tuple[int, int, int] = (40, 40, 40)):
    """A T1w-like sphere with two hemispheres and a 'hippocampus' cube; RAS affine, 1.2 mm."""
    idx = np.indices(shape).astype(np.float32)
    centre = (np.array(shape, np.float32) - 1) / 2
    radius = np.sqrt(((idx - centre[:, None, None, None]) ** 2).sum(0))
    t1 = np.where(radius < 15, 100.0, 5.0).astype(np.float32)
    labels = np.zeros(shape, np.int16)
    labels[radius < 14] = 2
    labels[(radius < 14) & (idx[0] > centre[0])] = 41
    labels[16:22, 16:22, 16:22] = 17
    uncertainty = np.clip(1 - np.abs(radius - 14) / 2, 0, 1).astype(np.float32)
    atlas_mask = radius < 14.5
    affine = np.diag([1.2, 1.2, 1.2, 1.0])
    return nib.Nifti1Image(t1, affine), labels, uncertainty, atlas_mask


def _sidecar(prefix: str, *, old: bool = False) -> dict:
    fields = deriv.dseg_sidecar(
        sources=[f"bids:raw:{prefix.split('_')[0]}/anat/{prefix}_T1w.nii.gz"],
        model_name="cadiff-synthseg32", model_version="0.9.0", model_sha256="ab" * 32,
        steps=10, seed=42, device="cpu", run_time_s=61.5, atlas="colin27",
        registration={"Metric": "MI", "Value": 0.41, "ForegroundDice": 0.93,
                      "BrainOnlyAtlas": True, "ResolutionMM": 2.0, "Transform": "Affine"},
    )
    if old:
        return fields
    fields.update({
        "ModelVoxelSizeMM": [1.0, 1.0, 1.0], "LabelPrior": "atlas", "Refinement": "em",
        "StageSeconds": {"registration": 12.5, "sampling": 40.25, "writing": 1.5},
        "GeneratedBy": [{"Name": "bids_cadiff", "Version": "0.9.0"}],
        "Uncertainty": {"Samples": 4, "Measure": "1 - max probability", "BrainMean": 0.05},
        "QC": {"Status": "pass", "Flags": [],
               "Checks": [{"Check": "registration", "Threshold": "ForegroundDice >= 0.8",
                           "ChosenOn": "training set"}]},
    })
    return fields


def _qc_rows(volumes: dict[str, float], flagged: str | None) -> str:
    lines = ["index\tname\tabbreviation\tvolume_mm3\tvolume_soft_mm3\tvolume_sd_mm3\t"
             "uncertainty\tvolume_fraction\toutside_largest_piece\tflags"]
    by_abbrev = {e.abbreviation: e for e in SYNTHSEG32.entries}
    for abbrev in STRUCTURES:
        e = by_abbrev[abbrev]
        flag = "volume" if abbrev == flagged else "n/a"
        lines.append(f"{e.value}\t{e.name}\t{abbrev}\t{volumes[abbrev]:.1f}\t"
                     f"{volumes[abbrev] * 1.01:.1f}\tn/a\t0.04\t0.0123\t0\t{flag}")
    return "\n".join(lines) + "\n"


def build_derivatives(root: Path) -> FakeDerivatives:
    deriv.init_derivatives(root, root.parent / "raw", SYNTHSEG32)
    t1, labels, uncertainty, atlas_mask = synthetic_volumes()
    group_rows = []
    for i, (prefix, entities) in enumerate(FINISHED.items()):
        # head size varies (normalising by TotalBrain removes it); structures vary by +-2 %
        head_size = 0.9 + 0.2 * ((3 * i) % 8) / 7
        volumes = {s: head_size * TYPICAL[s] * (1 + 0.02 * (((i * 3 + j * 5) % 8) - 3.5) / 3.5)
                   for j, s in enumerate(STRUCTURES)}
        if prefix == OUTLIER[0]:
            volumes[OUTLIER[1]] *= 1.8
        # the structures not listed here (cortex...) make up most of TotalBrain
        volumes[deriv.TOTAL_BRAIN] = head_size * 1.2e6 + sum(
            v for k, v in volumes.items() if k != "L-LV")
        fields = _sidecar(prefix, old=prefix == "sub-03")
        flagged = None
        if prefix == "sub-04":
            flagged = "R-HI"
            fields["QC"] = {"Status": "fail", "Flags": [
                {"Check": "registration", "Structure": None, "Value": 0.61,
                 "Threshold": "ForegroundDice >= 0.8", "Reason": "atlas <b>misplaced</b>"},
                {"Check": "volume", "Structure": "R-HI", "Value": 3.4,
                 "Threshold": "|z| <= 3", "Reason": "R-HI volume far from the training set"},
            ], "Checks": []}
            fields["Registration"]["ForegroundDice"] = 0.61
        deriv.write_dseg_sidecar(deriv.dseg_sidecar_path(root, entities), fields)
        if prefix != "sub-03":
            path = deriv.qc_table_path(root, entities)
            path.write_text(_qc_rows(volumes, flagged), encoding="utf-8")
        if prefix in WITH_FIGURES:
            write_figures(root, entities, t1, labels, SYNTHSEG32, uncertainty, atlas_mask)
        elif prefix == "sub-03":
            write_figures(root, entities, t1, labels, SYNTHSEG32)
            deriv.figure_path(root, entities, "contours").unlink()
        row = dict(deriv.entity_columns(entities))
        row.update(volumes)
        row["qc"] = {"sub-03": "n/a", "sub-04": "fail (registration, volume)"}.get(prefix, "pass")
        group_rows.append(row)
    columns = ["participant_id", "session_id", "run", *STRUCTURES, deriv.TOTAL_BRAIN, "qc"]
    deriv.write_group_volumes(root, group_rows, columns, SYNTHSEG32)
    for prefix, entities in FAILED.items():
        path = deriv.error_record_path(root, entities)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "Source": f"bids:raw:{prefix.split('_')[0]}/anat/{prefix}_T1w.nii.gz",
            "Error": ERROR_MESSAGE, "Time": "2026-01-02T03:04:05+00:00",
        }), encoding="utf-8")
    return FakeDerivatives(root)


@pytest.fixture(scope="session")
def fake_derivatives(tmp_path_factory) -> FakeDerivatives:
    """The dataset described above, built once: tests only add reports to it (others copy it)."""
    return build_derivatives(tmp_path_factory.mktemp("derivatives") / "out")
