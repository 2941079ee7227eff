"""The refiner's training loop: it learns, resumes exactly, stops on time with a state."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from bids_cadiff.models.refiner import RefinerConfig
from bids_cadiff.training.refiner_data import CoarseSimulation, RefinerPatches, RefinerVolume
from bids_cadiff.training.refiner_loop import (
    REFINER_FILE,
    REFINER_STATE,
    RefinerStop,
    RefinerTraining,
    load_refiner,
    train_refiner,
)

CONFIG = RefinerConfig(num_classes=3, channels=(4, 8, 8), squeeze=2)


def _dataset() -> RefinerPatches:
    index = np.zeros((24, 24, 24), np.int16)
    index[6:18, 6:18, 6:18] = 1
    index[9:15, 9:15, 9:15] = 2
    image = np.choose(index, [0.0, 0.6, 1.0]).astype(np.float32)
    vol = RefinerVolume(index=index, image=image, stripped=image, name="toy")
    return RefinerPatches([vol], [], num_classes=3, patch=16, length=10**6,
                          sim=CoarseSimulation(deformation=3.0), seed=1)


def _settings(iterations: int) -> RefinerTraining:
    return RefinerTraining(iterations=iterations, patch=16, lr=3e-3, warmup=2, checkpoint_every=3,
                           log_every=3)


def test_a_trained_refiner_is_saved_and_loads(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    path = train_refiner(_dataset(), CONFIG, _settings(6), tmp_path, subjects=["toy"], progress=False)
    assert path == tmp_path / REFINER_FILE
    model, meta = load_refiner(path)
    assert meta["iteration"] == 6 and meta["subjects"] == ["toy"]
    assert meta["simulation"]["deformation"] == 3.0
    assert model.head.weight.abs().sum() > 0  # it moved from the identity


def test_resuming_gives_the_weights_of_an_uninterrupted_run(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    whole = train_refiner(_dataset(), CONFIG, _settings(6), tmp_path / "a", subjects=["toy"],
                          progress=False)
    assert train_refiner(_dataset(), CONFIG, _settings(6), tmp_path / "b", subjects=["toy"],
                         time_limit=0.0, progress=False) == RefinerStop(iteration=1, signal=None)
    state = torch.load(tmp_path / "b" / REFINER_STATE, weights_only=True)
    assert state["iteration"] == 1
    resumed = train_refiner(_dataset(), CONFIG, _settings(6), tmp_path / "b", subjects=["toy"],
                            progress=False)
    assert resumed is not None and whole is not None
    a, b = load_refiner(whole)[0].state_dict(), load_refiner(resumed)[0].state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_state_from_other_settings_is_refused(tmp_path: Path) -> None:
    train_refiner(_dataset(), CONFIG, _settings(6), tmp_path, subjects=["toy"], time_limit=0.0,
                  progress=False)
    with pytest.raises(ValueError, match="other refiner settings"):
        train_refiner(_dataset(), CONFIG, _settings(9), tmp_path, subjects=["toy"], progress=False)
    with pytest.raises(ValueError, match="training data"):
        train_refiner(_dataset(), CONFIG, _settings(6), tmp_path, subjects=["other"], progress=False)


def test_a_file_without_refiner_weights_is_refused(tmp_path: Path) -> None:
    torch.save({"model": {}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a refiner"):
        load_refiner(tmp_path / "x.pt")


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_stop_signal_saves_a_state_to_resume_from(tmp_path: Path, sig: signal.Signals) -> None:
    """SLURM's pre-emption signals stop the refiner with a state, as they stop CA-Diff."""
    torch.set_num_threads(1)

    def stop(iteration: int) -> None:
        if iteration == 3:
            os.kill(os.getpid(), sig)

    before = signal.getsignal(sig)
    assert train_refiner(_dataset(), CONFIG, _settings(9), tmp_path, subjects=["toy"],
                         progress=False, on_checkpoint=stop) == RefinerStop(4, sig.name)
    state = torch.load(tmp_path / REFINER_STATE, weights_only=True)
    assert state["iteration"] == 4 and not (tmp_path / REFINER_FILE).exists()
    assert signal.getsignal(sig) == before  # the previous handler is back
    assert train_refiner(_dataset(), CONFIG, _settings(9), tmp_path, subjects=["toy"],
                         progress=False) == tmp_path / REFINER_FILE
