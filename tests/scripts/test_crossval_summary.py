"""The cross-validation pooling of scripts/crossval_summary.py, on hand-made fold tables."""

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "crossval_summary.py"
spec = importlib.util.spec_from_file_location("crossval_summary", SCRIPT)
crossval_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(crossval_summary)


def fold(path: Path, subjects: dict[str, list[float]], method: str = "A") -> Path:
    rows = [{"method": method, "subject": s, "structure": f"S{i}", "dice": d, "nsd": d / 2, "hd95": 1.0}
            for s, dices in subjects.items() for i, d in enumerate(dices)]
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def test_pooled_class_average_is_over_subjects_of_all_folds(tmp_path, capsys):
    f1 = fold(tmp_path / "fold1.tsv", {"sub-01": [0.8, 0.6], "sub-02": [0.6, 0.6]})
    f2 = fold(tmp_path / "fold2.tsv", {"sub-03": [1.0, 0.8]})
    pooled = crossval_summary.pool([f1, f2])
    assert sorted(pooled["fold"].unique()) == ["fold1", "fold2"]
    summary = crossval_summary.class_average(pooled).loc["A"]
    # subject class averages 0.7, 0.6, 0.9
    assert summary["dice_mean"] == pytest.approx(0.7333333)
    assert summary["dice_std"] == pytest.approx(pd.Series([0.7, 0.6, 0.9]).std())
    assert summary["nsd_mean"] == pytest.approx(0.7333333 / 2)
    assert (summary["subjects"], summary["folds"]) == (3, 2)
    structures = crossval_summary.per_structure(pooled, ["S1", "S0"])
    assert list(structures.index) == ["S1", "S0"]
    assert structures.loc["S0", ("dice", "mean", "A")] == pytest.approx(0.8)
    out = tmp_path / "pooled.tsv"
    assert crossval_summary.main([str(f1), str(f2), "--out", str(out)]) == 0
    assert len(pd.read_csv(out, sep="\t")) == 6
    assert "Class average" in capsys.readouterr().out


def test_a_subject_in_two_folds_and_a_foreign_table_are_errors(tmp_path):
    f1 = fold(tmp_path / "fold1.tsv", {"sub-01": [0.8]})
    f2 = fold(tmp_path / "fold2.tsv", {"sub-01": [0.7]})
    with pytest.raises(ValueError, match="A sub-01 in fold1, fold2"):
        crossval_summary.pool([f1, f2])
    with pytest.raises(ValueError, match="share a name"):
        crossval_summary.pool([f1, f1])
    (tmp_path / "x").mkdir()
    dup = fold(tmp_path / "x" / "fold3.tsv", {"sub-03": [0.5]})
    pd.concat([pd.read_csv(dup, sep="\t")] * 2).to_csv(dup, sep="\t", index=False)
    with pytest.raises(ValueError, match="fold3: A sub-03 S0 is scored more than once"):
        crossval_summary.pool([dup])
    bad = tmp_path / "bad.tsv"
    pd.DataFrame({"x": [1]}).to_csv(bad, sep="\t", index=False)
    with pytest.raises(ValueError, match="bad.tsv: missing columns"):
        crossval_summary.pool([bad])
