"""``cadiff-evaluate`` end to end on tiny label maps laid out as BIDS derivatives."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_cadiff.cli.evaluate import build_parser, main
from bids_cadiff.labels import SYNTHSEG32

SHAPE = (9, 10, 11)
AFFINE = np.diag([0.5, 1.0, 2.0, 1.0])


@pytest.fixture(autouse=True)
def _drop_log_handler() -> Iterator[None]:
    """main() installs a stderr handler on the package logger; remove it after each test."""
    yield
    pkg = logging.getLogger("bids_cadiff")
    for handler in list(pkg.handlers):
        if getattr(handler, "_bids_cadiff", False):
            pkg.removeHandler(handler)
    pkg.propagate = True
    pkg.setLevel(logging.NOTSET)


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.int16), affine), str(path))
    return path


def _dataset(root: Path, name: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": name, "BIDSVersion": "1.9.0", "DatasetType": "derivative"})
    )
    return root


def _ref_map() -> np.ndarray:
    ref = np.zeros(SHAPE, dtype=np.int16)
    ref[2:6, 2:6, 2:6] = 2  # Left-Cerebral-White-Matter (L-WM)
    ref[6:8, 1:8, 1:9] = 17  # Left-Hippocampus (L-HI)
    return ref


@pytest.fixture()
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """sub-01: L-WM shifted one voxel along axis 2 (Dice 0.75, HD95 2 mm); sub-02 ses-1:
    perfect, but the reference carries aseg values 31 (merged to background by ASEG_MERGE)
    and 1000 (not in the table: background)."""
    pred_dir = _dataset(tmp_path / "cadiff", "CA-Diff")
    ref_dir = _dataset(tmp_path / "freesurfer", "aseg")
    ref1 = _ref_map()
    pred1 = ref1.copy()
    pred1[2:6, 2:6, 2:6] = 0
    pred1[2:6, 2:6, 3:7] = 2
    _save(pred_dir / "sub-01/anat/sub-01_desc-cadiff_dseg.nii.gz", pred1)
    _save(ref_dir / "sub-01/anat/sub-01_desc-aseg_dseg.nii.gz", ref1)
    ref2 = _ref_map()
    pred2 = ref2.copy()
    ref2[0, 0, 0] = 31
    ref2[0, 0, 1] = 1000
    _save(pred_dir / "sub-02/ses-1/anat/sub-02_ses-1_desc-cadiff_dseg.nii.gz", pred2)
    _save(ref_dir / "sub-02/ses-1/anat/sub-02_ses-1_dseg.nii.gz", ref2)
    return pred_dir, ref_dir


def test_parser_defaults(dirs: tuple[Path, Path]) -> None:
    pred_dir, ref_dir = dirs
    args = build_parser().parse_args([str(pred_dir), str(ref_dir)])
    assert args.pred_dir == pred_dir and args.ref_dir == ref_dir
    assert args.labels_table[0] is SYNTHSEG32
    assert args.nsd_tolerance == 1.0 and args.output is None and args.verbose == 0


def test_end_to_end(dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pred_dir, ref_dir = dirs
    out = tmp_path / "eval" / "scores.tsv"
    code = main([str(pred_dir), str(ref_dir), "--output", str(out), "--nsd-tolerance", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # stdout: the summary table only.
    assert "2 image(s), NSD tolerance 1 mm" in captured.out
    header = captured.out.splitlines()[1].split()
    assert header[:4] == ["structure", "label", "n", "dice_mean"]
    assert any(line.startswith("L-WM") for line in captured.out.splitlines())
    assert captured.out.rstrip().splitlines()[-1].startswith("mean")

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
    assert "1000" in captured.err  # the dropped reference value is logged

    summary = pd.read_csv(tmp_path / "eval" / "scores_summary.tsv", sep="\t")
    wm = summary.set_index("structure").loc["L-WM"]
    assert wm["n"] == 2
    assert wm["dice_mean"] == pytest.approx((0.75 + 1.0) / 2)
    assert wm["hd95_mean"] == pytest.approx(1.0)
    assert summary["structure"].iloc[-1] == "mean"
    # One row per structure of the table, even those in no image (n = 0), then the average.
    assert len(summary) == len(SYNTHSEG32)
    assert summary.set_index("structure").loc["R-WM", "n"] == 0


def test_grid_mismatch_fails_that_pair_only(
    dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pred_dir, ref_dir = dirs
    bad = pred_dir / "sub-02/ses-1/anat/sub-02_ses-1_desc-cadiff_dseg.nii.gz"
    _save(bad, _ref_map(), affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    out = tmp_path / "scores.tsv"
    code = main([str(pred_dir), str(ref_dir), "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    assert "affine differs from reference" in captured.err
    assert "sub-02_ses-1_dseg.nii.gz" in captured.err and bad.name in captured.err
    scores = pd.read_csv(out, sep="\t")
    assert set(scores["participant_id"]) == {"sub-01"}


def test_custom_label_table(
    dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pred_dir, ref_dir = dirs
    table = tmp_path / "dseg.tsv"
    table.write_text("index\tname\n17\tHippocampus\n")
    code = main([str(pred_dir), str(ref_dir), "--labels-table", str(table)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = [line.split()[0] for line in captured.out.splitlines()[2:]]
    assert rows == ["Hippocampus", "mean"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--nsd-tolerance", "-1"], "NSD tolerance must be"),
        (["--labels-table", "nonesuch"], "neither a built-in table"),
        (["--output", "scores.csv"], "must end in .tsv"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_usage_errors(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    pred_dir, ref_dir = dirs
    assert main([str(pred_dir), str(ref_dir), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_missing_folder_and_no_pairs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = _dataset(tmp_path / "empty", "empty")
    assert main([str(tmp_path / "absent"), str(empty)]) == 2
    assert "prediction folder does not exist" in capsys.readouterr().err
    assert main([str(empty), str(empty)]) == 2
    err = capsys.readouterr().err
    assert "no prediction in" in err and len(err.strip().splitlines()) == 1
