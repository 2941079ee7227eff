"""scripts/train_default_model.py: a training state knows its training maps, and a state made
with another --holdout is refused on resume and on export (the label prior is rebuilt from the
current maps at export, so a mismatch would leak held-out subjects into it)."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_default_model.py"
spec = importlib.util.spec_from_file_location("train_default_model", SCRIPT)
train_default_model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_default_model)

MAPS = [Path(f"/prep/{n}.npz") for n in ("fstd-sub-03", "fstd-sub-04", "synthseg-training_seg_01")]


def test_state_with_the_same_maps_is_accepted():
    state = {"training_items": sorted(p.stem for p in MAPS)}
    train_default_model._check_training_items(state, list(reversed(MAPS)), Path("s.pt"))


def test_state_from_another_holdout_is_refused():
    state = {"training_items": sorted(p.stem for p in MAPS) + ["fstd-sub-01"]}
    with pytest.raises(RuntimeError, match=r"s\.pt.*only in the state: \['fstd-sub-01'\]"):
        train_default_model._check_training_items(state, MAPS, Path("s.pt"))


def test_state_without_the_record_is_refused_unless_accepted(caplog):
    with pytest.raises(RuntimeError, match="does not record its training maps.*--accept-unrecorded"):
        train_default_model._check_training_items({}, MAPS, Path("s.pt"))
    train_default_model._check_training_items({}, MAPS, Path("s.pt"), accept_unrecorded=True)
    assert "taken as trained on this run's 3 maps" in caplog.text


def test_export_refuses_a_state_trained_on_other_maps(tmp_path):
    import argparse

    torch.save({"model": {}, "training_items": ["fstd-sub-01"], "csf_to_background": False},
               tmp_path / "train_state.pt")
    args = argparse.Namespace(holdout="")
    with pytest.raises(RuntimeError, match="only in this run"):
        train_default_model.export(tmp_path, tmp_path / "out.pt", MAPS, 1, args)
