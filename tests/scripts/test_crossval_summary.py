"""The command line of scripts/crossval_summary.py (the tables: tests/evaluation/test_crossval.py)."""

import pandas as pd
import pytest

from tests.evaluation.test_crossval import fold  # the hand-made fold tables
from tests.scripts import load_script

crossval_summary = load_script("crossval_summary")


def test_main_prints_the_tables_and_writes_the_pooled_scores(tmp_path, capsys):
    f1 = fold(tmp_path / "fold1.tsv", {"sub-01": [0.8, 0.6], "sub-02": [0.6, 0.6]})
    f2 = fold(tmp_path / "fold2.tsv", {"sub-03": [1.0, 0.8]})
    out = tmp_path / "pooled.tsv"
    assert crossval_summary.main([str(f1), str(f2), "--out", str(out)]) == 0
    pooled = pd.read_csv(out, sep="\t")
    assert len(pooled) == 6 and set(pooled["fold"]) == {"fold1", "fold2"}
    printed = capsys.readouterr().out
    assert "Class average" in printed and "0.733" in printed


def test_main_names_a_missing_fold_file(tmp_path):
    with pytest.raises(SystemExit, match="fold9.tsv does not exist.*--out"):
        crossval_summary.main([str(tmp_path / "fold9.tsv")])


def test_main_markdown_picks_the_methods(tmp_path, capsys):
    f1 = fold(tmp_path / "fold1.tsv", {"sub-01": [0.8, 0.6]})
    assert crossval_summary.main([str(f1), "--markdown", "--methods", "A"]) == 0
    printed = capsys.readouterr().out
    assert "| A | 1 | 1 | 0.700 | 0.350 |" in printed and "| S1 | 0.600 | 0.300 |" in printed


def test_main_pairs_with_the_baseline(tmp_path, capsys):
    f1 = fold(tmp_path / "fold1.tsv", {"sub-01": [0.8, 0.6]})
    f2 = fold(tmp_path / "fold2.tsv", {"sub-01": [0.6, 0.6]}, method="M")
    assert crossval_summary.main([str(f1), str(f2), "--baseline", "M"]) == 0
    printed = capsys.readouterr().out
    assert "Paired with M on the same test subjects" in printed
    assert crossval_summary.main([str(f1), "--markdown", "--methods", "A"]) == 0
    assert "subjects higher" not in capsys.readouterr().out  # default Multi-Atlas absent
