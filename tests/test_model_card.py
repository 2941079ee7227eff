"""The bundled model's card ships in the package and describes the weights it ships with."""

from importlib import resources

import pandas as pd

from bids_cadiff.app.participant import DEFAULT_MODEL
from bids_cadiff.inference.checkpoint import load_checkpoint

DATA = resources.files("bids_cadiff") / "data"


def test_model_card_names_the_bundled_weights():
    card = (DATA / "model_card.md").read_text()
    loaded = load_checkpoint(DEFAULT_MODEL)
    assert loaded.metadata.sha256 in card, "model card and bundled weights are out of step"
    assert "@@" not in card  # no unfilled placeholder
    for entry in loaded.metadata.labels.entries[1:]:
        assert f"| {entry.value} | {entry.name} | {entry.abbreviation} |" in card


def test_model_card_scores_cover_every_structure_and_method():
    scores = pd.read_csv(DATA / "model_card_scores.tsv", sep="\t")
    assert {"method", "subject", "structure", "dice", "nsd"} <= set(scores.columns)
    assert scores.groupby("method")["structure"].nunique().eq(32).all()
    assert "Multi-Atlas" in set(scores["method"])
    assert scores["dice"].between(0, 1).all()


def test_model_card_crossval_scores_are_three_folds_of_seven_fstd_subjects():
    """The nested cross-validation behind the card's accuracy tables (scripts/crossval_nested.py,
    then scripts/crossval_summary.py)."""
    scores = pd.read_csv(DATA / "model_card_crossval.tsv", sep="\t")
    assert sorted(scores["fold"].unique()) == ["fold1", "fold2", "fold3"]
    subjects = scores.groupby("method")["subject"].unique().map(sorted)
    seven = [f"sub-0{k}" for k in range(1, 8)]
    chosen = "CA-Diff + variant chosen on training subjects"
    for method in (f"{chosen} (skull off)", f"{chosen} (skull on)", "CA-Diff (skull off)",
                   "CA-Diff (skull on)", "Multi-Atlas"):
        assert subjects[method] == seven, method
    folds = scores.groupby("subject")["fold"].unique().map(list)
    assert folds["sub-05"] == ["fold3"] and folds["sub-01"] == ["fold1"]
    assert scores.groupby(["method", "subject"])["structure"].nunique().eq(32).all()
    card = (DATA / "model_card.md").read_text()
    mean = scores.groupby(["method", "subject"])["dice"].mean().groupby("method").mean()
    for method in (f"{chosen} (skull off)", f"{chosen} (skull on)", "Multi-Atlas"):
        assert f"{mean[method]:.3f}" in card, method
