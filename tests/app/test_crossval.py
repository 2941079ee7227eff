"""Cross-validation: folds, and the Table I / II outputs on a tiny dataset."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from bids_cadiff.app.crossval import MULTI_ATLAS, Variant, make_folds, run_crossval
from bids_cadiff.errors import UsageError
from tests.training.synthetic import make_labelled_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_folds_cover_every_subject_once():
    subjects = [f"{i:02d}" for i in range(8)]
    folds = make_folds(subjects, 3, seed=1)
    assert sorted(s for f in folds for s in f) == subjects
    assert sorted(len(f) for f in folds) == [2, 3, 3]
    assert folds == make_folds(list(reversed(subjects)), 3, seed=1)
    with pytest.raises(UsageError, match="cannot make 3 folds"):
        make_folds(["01", "02"], 3)


@pytest.mark.slow
def test_crossval_writes_tables_with_multiatlas_row(tmp_path: Path):
    bids, labels, atlas = make_labelled_dataset(tmp_path)
    base = {
        "data": {"registration": "none", "voxel_size": 4.0, "labels": "dseg", "atlas": str(atlas)},
        "model": {"channels": [8, 16], "time_embed_dim": 16},
        "diffusion": {"timesteps": 50, "sampling_steps": 2},
        "training": {"patch_size": 16, "batch_size": 2, "iterations": 2, "checkpoint_every": 2,
                     "lr": 1e-3},
    }
    ablation = Variant("table2_diffusion", {"model": {"mode": "diffusion", "taca": False},
                                            "diffusion": {"consistency_loss": False}})
    out = tmp_path / "cv"

    def run() -> dict[str, pd.DataFrame]:
        return run_crossval(base, bids_dir=bids, labels_dir=labels, output_dir=out,
                            variants=[ablation], device="cpu", progress=False)

    tables = run()
    table1 = pd.read_csv(out / "table1.tsv", sep="\t")
    table2 = pd.read_csv(out / "table2.tsv", sep="\t")
    assert table1["method"].tolist() == tables["table1"]["method"].tolist()
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
    run()
    assert (out / "CA-Diff/fold-0/model.pt").stat().st_mtime_ns == stamp
