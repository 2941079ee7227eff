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
