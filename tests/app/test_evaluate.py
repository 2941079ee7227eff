"""Scoring folders of label maps (app/evaluate.py) on tiny BIDS derivatives datasets."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_cadiff.app.evaluate import run_evaluation
from bids_cadiff.errors import UsageError
from bids_cadiff.labels import ASEG_MERGE, SYNTHSEG32
from tests.evaluation.synthetic import (
    AFFINE,
    SUB02_PRED,
    derivatives_dataset,
    make_pred_ref_dirs,
    ref_map,
    save_dseg,
)


@pytest.fixture()
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    return make_pred_ref_dirs(tmp_path)


def _run(pred_dir: Path, ref_dir: Path, output: Path | None = None):
    return run_evaluation(pred_dir=pred_dir, ref_dir=ref_dir, table=SYNTHSEG32, merge=ASEG_MERGE,
                          nsd_tolerance_mm=1.0, output=output)


def test_scores_and_tables(dirs: tuple[Path, Path], tmp_path: Path,
                           caplog: pytest.LogCaptureFixture) -> None:
    pred_dir, ref_dir = dirs
    out = tmp_path / "eval" / "scores.tsv"
    with caplog.at_level(logging.INFO, logger="bids_cadiff"):
        result = _run(pred_dir, ref_dir, out)
    assert result.failed == 0 and len(result.images) == 2
    assert "1000" in caplog.text  # the dropped reference value is logged

    scores = pd.read_csv(out, sep="\t", keep_default_na=False)
    assert list(scores.columns) == [
        "participant_id", "session_id", "structure", "label", "dice", "nsd", "hd95",
    ]
    assert len(scores) == 2 * (len(SYNTHSEG32) - 1)
    assert set(scores["participant_id"]) == {"sub-01", "sub-02"}
    assert set(scores.loc[scores.participant_id == "sub-01", "session_id"]) == {"n/a"}
    wm1 = scores[(scores.participant_id == "sub-01") & (scores.structure == "L-WM")].iloc[0]
    # See tests/evaluation/test_metrics.py::test_shifted_cubes_anisotropic: same cubes, spacing.
    assert wm1["label"] == 2
    assert float(wm1["dice"]) == pytest.approx(0.75)
    assert float(wm1["nsd"]) == pytest.approx(5 / 7, rel=1e-5)
    assert float(wm1["hd95"]) == pytest.approx(2.0)
    sub2 = scores[scores.participant_id == "sub-02"].set_index("structure")
    assert float(sub2.loc["L-HI", "dice"]) == 1.0 and float(sub2.loc["L-HI", "hd95"]) == 0.0
    assert sub2.loc["R-WM", "dice"] == "n/a"  # in neither map

    summary = pd.read_csv(tmp_path / "eval" / "scores_summary.tsv", sep="\t")
    wm = summary.set_index("structure").loc["L-WM"]
    assert wm["n"] == 2
    assert wm["dice_mean"] == pytest.approx((0.75 + 1.0) / 2)
    assert wm["hd95_mean"] == pytest.approx(1.0)
    assert summary["structure"].iloc[-1] == "mean"
    # One row per structure of the table, even those in no image (n = 0), then the average.
    assert len(summary) == len(SYNTHSEG32)
    assert summary.set_index("structure").loc["R-WM", "n"] == 0
    assert result.summary is not None
    assert result.summary["structure"].tolist() == summary["structure"].tolist()


def test_grid_mismatch_fails_that_pair_only(dirs: tuple[Path, Path], tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    pred_dir, ref_dir = dirs
    bad = save_dseg(pred_dir / SUB02_PRED, ref_map(), affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    out = tmp_path / "scores.tsv"
    result = _run(pred_dir, ref_dir, out)
    assert result.failed == 1 and len(result.images) == 1
    assert "affine differs from reference" in caplog.text
    assert "sub-02_ses-1_dseg.nii.gz" in caplog.text and bad.name in caplog.text
    assert set(pd.read_csv(out, sep="\t")["participant_id"]) == {"sub-01"}


def test_non_integer_label_map_fails_that_pair(dirs: tuple[Path, Path],
                                               caplog: pytest.LogCaptureFixture) -> None:
    pred_dir, ref_dir = dirs
    nib.save(nib.Nifti1Image(ref_map().astype(np.float32) + 0.5, AFFINE), str(pred_dir / SUB02_PRED))
    result = _run(pred_dir, ref_dir)
    assert result.failed == 1 and "non-integer values" in caplog.text


def test_no_pair_is_a_usage_error(tmp_path: Path) -> None:
    empty = derivatives_dataset(tmp_path / "empty", "empty")
    with pytest.raises(UsageError, match="no prediction in"):
        _run(empty, empty)
