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


def test_model_card_crossval_scores_are_three_folds_of_the_fstd_subjects():
    """The pooled cross-validation behind the card's accuracy tables (scripts/crossval_summary.py)."""
    scores = pd.read_csv(DATA / "model_card_crossval.tsv", sep="\t")
    assert sorted(scores["fold"].unique()) == ["fold1", "fold2", "fold3"]
    subjects = scores.groupby("method")["subject"].unique().map(sorted)
    six = ["sub-01", "sub-02", "sub-03", "sub-04", "sub-06", "sub-07"]
    assert subjects["CA-Diff (skull off)"] == six and subjects["Multi-Atlas"] == six
    assert subjects["CA-Diff (skull on)"] == [s for s in six if s != "sub-03"]  # no T1.mgz
    assert scores.groupby(["method", "subject"])["structure"].nunique().eq(32).all()
    card = (DATA / "model_card.md").read_text()
    mean = scores.groupby(["method", "subject"])["dice"].mean().groupby("method").mean()
    assert f"{mean['CA-Diff (skull off)']:.3f}" in card and f"{mean['Multi-Atlas']:.3f}" in card
