"""Pooling fold tables and summarising them per method, on hand-made fold tables."""

from pathlib import Path

import pandas as pd
import pytest

from bids_cadiff.evaluation.crossval import class_average, markdown, paired, per_structure, pool, render


def fold(path: Path, subjects: dict[str, list[float]], method: str = "A") -> Path:
    rows = [{"method": method, "subject": s, "structure": f"S{i}", "dice": d, "nsd": d / 2, "hd95": 1.0}
            for s, dices in subjects.items() for i, d in enumerate(dices)]
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def test_pooled_class_average_is_over_subjects_of_all_folds(tmp_path):
    f1 = fold(tmp_path / "fold1.tsv", {"sub-01": [0.8, 0.6], "sub-02": [0.6, 0.6]})
    f2 = fold(tmp_path / "fold2.tsv", {"sub-03": [1.0, 0.8]})
    pooled = pool([f1, f2])
    assert sorted(pooled["fold"].unique()) == ["fold1", "fold2"]
    summary = class_average(pooled).loc["A"]
    # subject class averages 0.7, 0.6, 0.9
    assert summary["dice_mean"] == pytest.approx(0.7333333)
    assert summary["dice_std"] == pytest.approx(pd.Series([0.7, 0.6, 0.9]).std())
    assert summary["nsd_mean"] == pytest.approx(0.7333333 / 2)
    assert (summary["subjects"], summary["folds"]) == (3, 2)
    structures = per_structure(pooled, ["S1", "S0"])
    assert list(structures.index) == ["S1", "S0"]
    assert structures.loc["S0", ("dice", "mean", "A")] == pytest.approx(0.8)


def test_one_fold_frame_summarised_without_a_fold_count():
    """What evaluate_default_model.py prints: one fold, two methods, no ``fold`` column."""
    rows = [{"method": m, "subject": s, "structure": st, "dice": d, "nsd": d, "hd95": 2.0}
            for m, offset in (("A", 0.0), ("B", 0.1))
            for s, base in (("sub-01", 0.5), ("sub-02", 0.7))
            for st, d in (("L-WM", base + offset), ("3V", base + offset - 0.2))]
    frame = pd.DataFrame(rows)
    table = class_average(frame)
    assert list(table.index) == ["A", "B"] and "folds" not in table
    assert table.loc["B", "dice_mean"] == pytest.approx(0.6)  # subjects 0.5 and 0.7
    assert table.loc["B", "subjects"] == 2
    text = render(frame, ["L-WM", "3V"])
    assert text.index("Class average") < text.index("Per structure")
    assert text.index("L-WM") < text.rindex("3V")


def test_a_subject_in_two_folds_and_a_foreign_table_are_errors(tmp_path):
    f1 = fold(tmp_path / "fold1.tsv", {"sub-01": [0.8]})
    f2 = fold(tmp_path / "fold2.tsv", {"sub-01": [0.7]})
    with pytest.raises(ValueError, match="A sub-01 in fold1, fold2"):
        pool([f1, f2])
    with pytest.raises(ValueError, match="share a name"):
        pool([f1, f1])
    (tmp_path / "x").mkdir()
    dup = fold(tmp_path / "x" / "fold3.tsv", {"sub-03": [0.5]})
    pd.concat([pd.read_csv(dup, sep="\t")] * 2).to_csv(dup, sep="\t", index=False)
    with pytest.raises(ValueError, match="fold3: A sub-03 S0 is scored more than once"):
        pool([dup])
    bad = tmp_path / "bad.tsv"
    pd.DataFrame({"x": [1]}).to_csv(bad, sep="\t", index=False)
    with pytest.raises(ValueError, match="bad.tsv: missing columns"):
        pool([bad])


def test_markdown_cells_are_mean_and_std_over_subjects(tmp_path):
    f1 = fold(tmp_path / "fold1.tsv", {"sub-01": [0.8, 0.6], "sub-02": [0.6, 0.6]})
    f2 = fold(tmp_path / "fold2.tsv", {"sub-03": [1.0, 0.8]}, method="B")
    text = markdown(pool([f1, f2]), order=["S0", "S1"], methods=["B", "A"])
    lines = text.splitlines()
    assert lines[0] == "| method | subjects | folds | Dice | NSD |"
    assert lines[2] == "| B | 1 | 1 | 0.900 | 0.450 |"  # one subject: no std
    assert lines[3] == "| A | 2 | 1 | 0.650 ± 0.071 | 0.325 ± 0.035 |"
    assert lines[5] == "| structure | Dice B | Dice A | NSD B | NSD A |"
    assert lines[7] == "| S0 | 1.000 | 0.700 ± 0.141 | 0.500 | 0.350 ± 0.071 |"
    with pytest.raises(ValueError, match=r"methods \['C'\] are not in the scores"):
        markdown(pool([f1]), methods=["C"])


def _two_methods(tmp_path: Path) -> pd.DataFrame:
    """Method A on sub-01..03, baseline B on sub-01, sub-02 and sub-04 (shared: sub-01, sub-02)."""
    a = fold(tmp_path / "a.tsv", {"sub-01": [0.8, 0.6], "sub-02": [0.5, 0.5], "sub-03": [1.0, 1.0]})
    b = fold(tmp_path / "b.tsv", {"sub-01": [0.6, 0.6], "sub-02": [0.4, 0.8], "sub-04": [0.1, 0.1]},
             method="B")
    return pd.concat([pd.read_csv(a, sep="\t"), pd.read_csv(b, sep="\t")], ignore_index=True)


def test_paired_compares_on_the_shared_subjects_only(tmp_path):
    row = paired(_two_methods(tmp_path), "B").loc["A"]
    # class averages A 0.7, 0.5; B 0.6, 0.6 -> differences +0.1, -0.1 (sub-03, sub-04 unshared)
    assert row["subjects"] == 2 and row["baseline_dice"] == pytest.approx(0.6)
    assert row["dice_diff_mean"] == pytest.approx(0.0)
    assert row["dice_diff_std"] == pytest.approx(pd.Series([0.1, -0.1]).std())
    assert row["dice_wins"] == 1 and row["nsd_wins"] == 1
    # structure means over sub-01, sub-02: A S0 0.65 vs B 0.5 (higher), S1 0.55 vs 0.7
    assert row["structures_dice_higher"] == 1
    with pytest.raises(ValueError, match="baseline 'C' is not in the scores"):
        paired(_two_methods(tmp_path), "C")


def test_paired_tables_in_render_and_markdown(tmp_path):
    scores = _two_methods(tmp_path)
    text = render(scores, baseline="B")
    assert text.index("Class average") < text.index("Paired with B") < text.index("Per structure")
    assert "Paired with" not in render(scores, baseline="Z")  # absent baseline: no section
    assert "Paired with" not in render(scores[scores["method"] == "B"], baseline="B")  # nothing to pair
    lines = markdown(scores, methods=["A", "B"], baseline="B").splitlines()
    assert lines[7] == "| A | 2 | 0.600 | +0.000 ± 0.141 | 1 of 2 | +0.000 ± 0.071 | 1 of 2 | 1 |"
    assert lines[9].startswith("| structure |")


def _variants_table(rows):
    """rows: (method, subject, [dice per structure])."""
    out = []
    for method, subject, dice in rows:
        for k, d in enumerate(dice):
            out.append({"method": method, "subject": subject, "structure": f"S{k}",
                        "dice": d, "nsd": d})
    return pd.DataFrame(out)


def test_nested_fold_chooses_on_training_subjects_only():
    from bids_cadiff.evaluation.crossval import SELECTED, nested_fold, select_variant

    scores = _variants_table([
        # on the training subjects the refinement is better...
        ("CA-Diff (skull on)", "sub-03", [0.6, 0.6]), ("CA-Diff + em (skull on)", "sub-03", [0.8, 0.8]),
        ("CA-Diff (skull off)", "sub-03", [0.7, 0.7]), ("CA-Diff + em (skull off)", "sub-03", [0.7, 0.8]),
        # ...on the test subject it is worse: the choice must not look there
        ("CA-Diff (skull on)", "sub-01", [0.9, 0.9]), ("CA-Diff + em (skull on)", "sub-01", [0.5, 0.5]),
        ("Multi-Atlas", "sub-01", [0.7, 0.7]),
    ])
    assert select_variant(scores, ["CA-Diff", "CA-Diff + em"], ["sub-03"]) == "CA-Diff + em"
    assert select_variant(scores, ["CA-Diff", "CA-Diff + em"], ["sub-01"]) == "CA-Diff"
    kept, chosen = nested_fold(scores, ["CA-Diff", "CA-Diff + em"], ["sub-01"])
    assert chosen == "CA-Diff + em"
    assert set(kept["subject"]) == {"sub-01"}
    assert set(kept["method"]) == {"CA-Diff (skull on)", "CA-Diff + em (skull on)",
                                   f"{SELECTED} (skull on)"}
    picked = kept[kept["method"] == f"{SELECTED} (skull on)"]["dice"].tolist()
    assert picked == [0.5, 0.5]
    with pytest.raises(ValueError, match="besides"):
        nested_fold(scores[scores["subject"] == "sub-01"], ["CA-Diff"], ["sub-01"])
    with pytest.raises(ValueError, match="no scores of 'CA-Diff \\+ tta'"):
        select_variant(scores, ["CA-Diff + tta"], ["sub-03"])
