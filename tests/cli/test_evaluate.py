"""``cadiff-evaluate``: parser, exit codes and stdout (the scoring: tests/app/test_evaluate.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from bids_cadiff.cli.evaluate import build_parser, main
from bids_cadiff.labels import SYNTHSEG32
from tests.evaluation.synthetic import (
    SUB02_PRED,
    derivatives_dataset,
    make_pred_ref_dirs,
    ref_map,
    save_dseg,
)


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


@pytest.fixture()
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    return make_pred_ref_dirs(tmp_path)


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
    assert not any(line.startswith("R-WM") for line in captured.out.splitlines())  # n = 0
    assert captured.out.rstrip().splitlines()[-1].startswith("mean")
    assert out.is_file() and (tmp_path / "eval" / "scores_summary.tsv").is_file()
    assert "1000" in captured.err  # the dropped reference value is logged


def test_failed_pair_is_exit_1(
    dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pred_dir, ref_dir = dirs
    save_dseg(pred_dir / SUB02_PRED, ref_map(), affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    code = main([str(pred_dir), str(ref_dir), "--output", str(tmp_path / "scores.tsv")])
    captured = capsys.readouterr()
    assert code == 1
    assert "1 image(s)" in captured.out
    assert "affine differs from reference" in captured.err
    assert "1 pair(s) could not be scored" in captured.err


def test_label_table_from_tsv(
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
    # A table without the columns is a usage error, in one line.
    table.write_text("label\tcolour\n17\t#ffffff\n")
    assert main([str(pred_dir), str(ref_dir), "--labels-table", str(table)]) == 2
    err = capsys.readouterr().err
    assert "needs an 'index' (or 'value') column" in err and len(err.strip().splitlines()) == 1


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
    empty = derivatives_dataset(tmp_path / "empty", "empty")
    assert main([str(tmp_path / "absent"), str(empty)]) == 2
    assert "prediction folder does not exist" in capsys.readouterr().err
    assert main([str(empty), str(empty)]) == 2
    err = capsys.readouterr().err
    assert "no prediction in" in err and len(err.strip().splitlines()) == 1
