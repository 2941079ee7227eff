"""scripts/training_state.py: a run's resumable state kept in one committed folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from bids_cadiff.inference.checkpoint import ModelMetadata, read_checkpoint, save_checkpoint
from bids_cadiff.labels import SYNTHSEG32, LabelTable
from bids_cadiff.models.config import DiffusionConfig, ModelConfig
from bids_cadiff.models.diffusion import CADiff
from tests.scripts import load_script

TABLE = LabelTable(SYNTHSEG32.entries[:3])


def _checkpoint(path: Path, iteration: int, prior: bool = True) -> str:
    """A real (tiny) checkpoint whose weights depend on ``iteration``; its content hash."""
    torch.manual_seed(iteration)
    model = CADiff(ModelConfig(spatial_dims=3, num_classes=3, channels=(4, 8), time_embed_dim=16,
                               label_prior_bins=4 if prior else 0),
                   DiffusionConfig(sampling_steps=3, similarity="dice"))
    if prior:
        torch.manual_seed(0)  # the same prior at every iteration, as in training
        model.set_label_prior(torch.softmax(torch.randn(3, 4, 4, 4), dim=0))
    meta = ModelMetadata(name="tiny", labels=TABLE, normalization={"method": "percentile"},
                         voxel_size=(2.0, 2.0, 2.0), patch_size=(16, 16, 16))
    return save_checkpoint(path, model, meta)


def _run(folder: Path, *iterations: int, prior: bool = True) -> Path:
    (folder / "checkpoints").mkdir(parents=True)
    for i in iterations:
        _checkpoint(folder / "checkpoints" / f"iter-{i:07d}.pt", i, prior)
        (folder / "checkpoints" / f"iter-{i:07d}_state.pt").write_text(f"state {i}")
    (folder / "train_log.tsv").write_text(f"log up to {max(iterations)}")
    return folder


def test_save_keeps_only_the_latest_state_and_restore_brings_it_back(tmp_path: Path):
    module = load_script("training_state")
    run, saved = _run(tmp_path / "run", 250, 500), tmp_path / "saved"
    _checkpoint(run / "checkpoints" / "iter-0000750.pt", 750)  # no state: not resumable
    module.main(["save", str(run), str(saved)])
    assert sorted(p.name for p in (saved / "checkpoints").iterdir()) == [
        "iter-0000500.pt", "iter-0000500_state.pt"]
    _run(tmp_path / "later", 1000)
    module.main(["save", str(tmp_path / "later"), str(saved)])  # overwritten in one place
    assert sorted(p.name for p in (saved / "checkpoints").iterdir()) == [
        "iter-0001000.pt", "iter-0001000_state.pt"]
    assert (saved / "train_log.tsv").read_text() == "log up to 1000"
    fresh = tmp_path / "fresh"  # a clone without the work folder
    assert module.restore(saved, fresh)
    assert (fresh / "checkpoints" / "iter-0001000_state.pt").read_text() == "state 1000"
    assert (fresh / "train_log.tsv").read_text() == "log up to 1000"
    ahead = _run(tmp_path / "ahead", 1250)  # a run further on is left alone
    assert not module.restore(saved, ahead)
    assert not (ahead / "checkpoints" / "iter-0001000.pt").exists()
    assert not module.restore(tmp_path / "nothing", fresh)


def test_finished_needs_every_iteration_of_the_recipe_and_the_final_model(tmp_path: Path):
    module = load_script("training_state")
    run = _run(tmp_path / "fold1", 250, 500)
    (run / "train_config.toml").write_text("[training]\niterations = 750\n")
    _checkpoint(run / "model.pt", 500)  # written by a stop at 500
    assert "at iteration 500 of 750" in module.unfinished(run)
    assert module.main(["finished", str(run)]) == 1
    _checkpoint(run / "checkpoints" / "iter-0000750.pt", 750)
    assert "model.pt is not the final checkpoint" in module.unfinished(run)  # still the stop's
    shutil.copyfile(run / "checkpoints" / "iter-0000750.pt", run / "model.pt")
    assert module.unfinished(run) is None
    assert module.main(["finished", str(run)]) == 0
    other = _run(tmp_path / "fold2", 250)
    assert "no train_config.toml" in module.unfinished(other)
    assert module.main(["finished", str(run), str(other)]) == 1


def test_the_label_prior_is_kept_once_and_put_back_exactly(tmp_path: Path):
    module = load_script("training_state")
    saved = tmp_path / "saved"
    module.main(["save", str(_run(tmp_path / "a", 500)), str(saved)])
    kept = saved / "checkpoints" / "iter-0000500.pt"
    assert "label_prior" not in torch.load(kept, weights_only=True)["state_dict"]
    prior_bytes = (saved / "label_prior.pt").read_bytes()
    module.main(["save", str(_run(tmp_path / "b", 1000)), str(saved)])
    assert (saved / "label_prior.pt").read_bytes() == prior_bytes  # one blob for git
    original = read_checkpoint(tmp_path / "b" / "checkpoints" / "iter-0001000.pt")
    fresh = tmp_path / "fresh"
    assert module.restore(saved, fresh)
    back = read_checkpoint(fresh / "checkpoints" / "iter-0001000.pt")  # verified content hash
    assert back["sha256"] == original["sha256"]
    assert torch.equal(back["state_dict"]["label_prior"], original["state_dict"]["label_prior"])

    (saved / "label_prior.pt").unlink()  # a prior lost or from elsewhere: refused by name
    with pytest.raises(SystemExit, match="label_prior.pt is missing"):
        module.restore(saved, tmp_path / "broken")
    assert not list((tmp_path / "broken").rglob("iter-*.pt"))
    torch.save(torch.zeros(3, 4, 4, 4), saved / "label_prior.pt")  # another run's: by hash
    with pytest.raises(SystemExit, match="not the checkpoint that was saved"):
        module.restore(saved, tmp_path / "broken")
    assert not [p for p in (tmp_path / "broken").rglob("*") if p.is_file()]

    plain = tmp_path / "plain_saved"  # a model without a prior is kept whole
    module.main(["save", str(_run(tmp_path / "c", 250, prior=False)), str(plain)])
    assert not (plain / "label_prior.pt").exists()
    read_checkpoint(plain / "checkpoints" / "iter-0000250.pt")
    assert module.restore(plain, tmp_path / "plain_run")
    read_checkpoint(tmp_path / "plain_run" / "checkpoints" / "iter-0000250.pt")


def test_a_refiner_stage_travels_and_finishes_the_run(tmp_path: Path):
    """The refiner's files are saved and restored; a model.pt that is the final checkpoint plus
    a refiner counts as the final model, and a recipe with [refiner] needs that refiner."""
    from bids_cadiff.inference.checkpoint import store_refiner
    from bids_cadiff.models.refiner import Refiner, RefinerConfig

    module = load_script("training_state")
    run = _run(tmp_path / "fold1", 500)
    (run / "train_config.toml").write_text("[training]\niterations = 500\n[refiner]\niterations = 9\n")
    (run / "refiner").mkdir()
    (run / "refiner" / "refiner_state.pt").write_text("refiner state")
    saved = tmp_path / "saved"
    module.main(["save", str(run), str(saved)])
    assert (saved / "refiner" / "refiner_state.pt").read_text() == "refiner state"
    fresh = tmp_path / "fresh"
    assert module.restore(saved, fresh)
    assert (fresh / "refiner" / "refiner_state.pt").read_text() == "refiner state"

    shutil.copyfile(run / "checkpoints" / "iter-0000500.pt", run / "model.pt")
    assert "has none yet" in module.unfinished(run)
    store_refiner(run / "model.pt", run / "model.pt",
                  Refiner(RefinerConfig(num_classes=3, channels=(4, 8, 8))), {})
    assert module.unfinished(run) is None  # the network is the final checkpoint's
    _checkpoint(run / "other.pt", 250)
    store_refiner(run / "other.pt", run / "model.pt",
                  Refiner(RefinerConfig(num_classes=3, channels=(4, 8, 8))), {})
    assert "is not the final checkpoint" in module.unfinished(run)
