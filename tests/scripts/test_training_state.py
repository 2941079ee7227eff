"""scripts/training_state.py: a run's resumable state kept in one committed folder."""

from __future__ import annotations

from pathlib import Path

from tests.scripts import load_script


def _run(folder: Path, *iterations: int) -> Path:
    (folder / "checkpoints").mkdir(parents=True)
    for i in iterations:
        (folder / "checkpoints" / f"iter-{i:07d}.pt").write_text(f"weights {i}")
        (folder / "checkpoints" / f"iter-{i:07d}_state.pt").write_text(f"state {i}")
    (folder / "train_log.tsv").write_text(f"log up to {max(iterations)}")
    return folder


def test_save_keeps_only_the_latest_state_and_restore_brings_it_back(tmp_path: Path):
    module = load_script("training_state")
    run, saved = _run(tmp_path / "run", 250, 500), tmp_path / "saved"
    (run / "checkpoints" / "iter-0000750.pt").write_text("no state: not resumable")
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
    (run / "model.pt").write_text("a model written by a stop at 500")  # stopped early
    assert "at iteration 500 of 750" in module.unfinished(run)
    assert module.main(["finished", str(run)]) == 1
    (run / "checkpoints" / "iter-0000750.pt").write_text("weights 750")
    assert module.unfinished(run) is None
    assert module.main(["finished", str(run)]) == 0
    other = _run(tmp_path / "fold2", 250)
    assert "no train_config.toml" in module.unfinished(other)
    assert module.main(["finished", str(run), str(other)]) == 1
