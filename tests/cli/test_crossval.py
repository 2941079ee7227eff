"""``cadiff-crossval``: --set parsing, what main passes to the app, exit codes.

The cross-validation itself: tests/app/test_crossval.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from bids_cadiff.app import crossval as app_crossval
from bids_cadiff.cli.crossval import main, parse_set
from bids_cadiff.errors import UsageError


def test_parse_set():
    assert parse_set(["training.iterations=3", "data.labels=dseg", "model.channels=[8, 16]"]) == {
        "training": {"iterations": 3}, "data": {"labels": "dseg"}, "model": {"channels": [8, 16]}}
    with pytest.raises(UsageError, match="TABLE.KEY=VALUE"):
        parse_set(["iterations=3"])


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    bids, labels = tmp_path / "bids", tmp_path / "labels"
    bids.mkdir()
    labels.mkdir()
    return bids, labels


def test_main_passes_recipes_and_prints_table2(folders, tmp_path: Path, monkeypatch, capsys):
    bids, labels = folders
    ablation = tmp_path / "table2_diffusion.toml"
    ablation.write_text('[model]\nmode = "diffusion"\n')
    calls: list[dict[str, Any]] = []

    def fake_run_crossval(base, **kwargs):
        calls.append({"base": base, **kwargs})
        return {"table2": pd.DataFrame({"method": ["CA-Diff", "table2_diffusion"]})}

    monkeypatch.setattr(app_crossval, "run_crossval", fake_run_crossval)
    code = main([str(bids), str(labels), str(tmp_path / "cv"), "--set", "training.iterations=2",
                 "--ablation", str(ablation), "--folds", "2", "--no-multiatlas", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    (call,) = calls
    assert call["base"] == {"training": {"iterations": 2}}
    assert [(v.name, v.recipe) for v in call["variants"]] == [
        ("table2_diffusion", {"model": {"mode": "diffusion"}})]
    assert call["folds"] == 2 and call["multiatlas"] is False and call["progress"] is False
    assert call["output_dir"] == tmp_path / "cv"
    assert "table2_diffusion" in captured.out


@pytest.mark.parametrize(
    ("raised", "code", "where"),
    [(UsageError("bad recipe"), 2, "cadiff-crossval: error: bad recipe"),
     (KeyboardInterrupt(), 130, "interrupted; rerun the same command to continue"),
     (RuntimeError("boom"), 1, "cadiff-crossval failed unexpectedly")],
)
def test_errors_map_to_exit_codes(folders, tmp_path: Path, monkeypatch, capsys, raised, code,
                                  where):
    bids, labels = folders

    def fail(base, **kwargs):
        raise raised

    monkeypatch.setattr(app_crossval, "run_crossval", fail)
    assert main([str(bids), str(labels), str(tmp_path / "cv")]) == code
    assert where in capsys.readouterr().err


def test_bad_set_is_one_usage_line(folders, tmp_path: Path, capsys):
    bids, labels = folders
    assert main([str(bids), str(labels), str(tmp_path / "cv"), "--set", "iterations=3"]) == 2
    err = capsys.readouterr().err
    assert "TABLE.KEY=VALUE" in err and len(err.strip().splitlines()) == 1
