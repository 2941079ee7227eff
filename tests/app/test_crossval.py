"""Cross-validation: folds, majority voting, and the Table I / II outputs on a tiny dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bids_cadiff.app.crossval import MULTI_ATLAS, make_folds
from bids_cadiff.cli.crossval import main, parse_set
from bids_cadiff.errors import UsageError
from bids_cadiff.evaluation.multiatlas import majority_vote
from tests.training.synthetic import make_labelled_dataset


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_folds_cover_every_subject_once():
    subjects = [f"{i:02d}" for i in range(8)]
    folds = make_folds(subjects, 3, seed=1)
    assert sorted(s for f in folds for s in f) == subjects
    assert sorted(len(f) for f in folds) == [2, 3, 3]
    assert folds == make_folds(list(reversed(subjects)), 3, seed=1)
    with pytest.raises(UsageError, match="cannot make 3 folds"):
        make_folds(["01", "02"], 3)


def test_majority_vote_prefers_the_most_frequent_then_lowest():
    maps = [np.array([[1, 2], [0, 3]]), np.array([[1, 2], [3, 0]]), np.array([[2, 1], [3, 1]])]
    assert majority_vote(maps, 4).tolist() == [[1, 2], [3, 0]]


def test_parse_set():
    assert parse_set(["training.iterations=3", "data.labels=dseg", "model.channels=[8, 16]"]) == {
        "training": {"iterations": 3}, "data": {"labels": "dseg"}, "model": {"channels": [8, 16]}}
    with pytest.raises(UsageError, match="TABLE.KEY=VALUE"):
        parse_set(["iterations=3"])


@pytest.mark.slow
def test_crossval_writes_tables_with_multiatlas_row(tmp_path: Path):
    bids, labels, atlas = make_labelled_dataset(tmp_path)
    ablation = tmp_path / "table2_diffusion.toml"
    ablation.write_text('[model]\nmode = "diffusion"\ntaca = false\n'
                        '[diffusion]\nconsistency_loss = false\n')
    sets = ['data.registration="none"', "data.voxel_size=4.0", 'data.labels="dseg"',
            f'data.atlas="{atlas}"', "model.channels=[8, 16]", "model.time_embed_dim=16",
            "diffusion.timesteps=50", "diffusion.sampling_steps=2", "training.patch_size=16",
            "training.batch_size=2", "training.iterations=2", "training.checkpoint_every=2",
            "training.lr=1e-3"]
    out = tmp_path / "cv"
    argv = [str(bids), str(labels), str(out), "--set", *sets, "--ablation", str(ablation),
            "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    table1 = pd.read_csv(out / "table1.tsv", sep="\t")
    table2 = pd.read_csv(out / "table2.tsv", sep="\t")
    assert table1["method"].tolist() == ["CA-Diff", MULTI_ATLAS]
    assert table2["method"].tolist() == ["CA-Diff", "table2_diffusion", MULTI_ATLAS]
    assert (table1["n_folds"] == 3).all()
    assert table2.loc[1, "mode"] == "diffusion" and table2.loc[0, "taca"] in (True, "True")
    # With identical synthetic geometry, label propagation is a strong baseline.
    assert table1.loc[1, "dice_mean"] > 0.3
    assert set(pd.read_csv(out / "folds.tsv", sep="\t")["fold"]) == {0, 1, 2}
    scores = pd.read_csv(out / "scores.tsv", sep="\t")
    assert {"method", "fold", "participant_id", "structure", "dice", "nsd"} <= set(scores.columns)
    # A rerun finds every fold trained and only re-scores.
    stamp = (out / "CA-Diff/fold-0/model.pt").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "CA-Diff/fold-0/model.pt").stat().st_mtime_ns == stamp
