"""The training loop: exact resume, checkpoints the app can load, state safe to load."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bids_cadiff.errors import CheckpointError
from bids_cadiff.inference.checkpoint import ModelMetadata, load_checkpoint
from bids_cadiff.labels import Label, LabelTable
from bids_cadiff.models.config import DiffusionConfig, ModelConfig
from bids_cadiff.models.diffusion import CADiff
from bids_cadiff.training.data import TrainingItem
from bids_cadiff.training.loop import LoopSettings, latest_checkpoint, state_path, train

TABLE = LabelTable((Label(0, "bg", "BG", "#000000"), Label(1, "a", "A", "#ff0000"),
                    Label(2, "b", "B", "#00ff00")))
META = ModelMetadata(name="tiny", labels=TABLE, normalization={"method": "percentile"},
                     voxel_size=(4.0, 4.0, 4.0), patch_size=(12, 12, 12))


def _items() -> list[TrainingItem]:
    out = []
    for seed in range(2):
        rng = np.random.default_rng(seed)
        labels = np.zeros((16, 18, 14), np.int16)
        labels[3:13, 4:14, 2:12] = 1
        labels[6:10, 7:11, 5:9] = 2
        image = (labels / 2 + 0.05 * rng.standard_normal(labels.shape)).astype(np.float32)
        field = np.clip(rng.random((3, *labels.shape)), 0, 1).astype(np.float32)
        out.append(TrainingItem(f"img{seed}", image, field, labels, np.eye(4)))
    return out


def _model(**kw) -> CADiff:
    torch.manual_seed(0)
    return CADiff(
        ModelConfig(spatial_dims=3, num_classes=3, channels=(8, 16), time_embed_dim=16,
                    taca_kernel_sizes=(3,), taca_num_kernels=2, **kw),
        DiffusionConfig(timesteps=50, sampling_steps=2),
    )


def _settings(iterations: int, **kw) -> LoopSettings:
    base = dict(patch_size=(12, 12, 12), batch_size=2, lr=1e-3, iterations=iterations,
                checkpoint_every=3, val_every=3, log_every=2, keep_checkpoints=0)
    base.update(kw)
    return LoopSettings(**base)


def test_resume_gives_bit_identical_weights(tmp_path: Path):
    items = _items()
    straight = train(_model(), items, settings=_settings(6), metadata=META,
                     output_dir=tmp_path / "a", val_items=items[:1], progress=False)
    train(_model(), items, settings=_settings(3), metadata=META, output_dir=tmp_path / "b",
          val_items=items[:1], progress=False)
    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt is not None and ckpt.name == "iter-0000003.pt"
    resumed = train(_model(), items, settings=_settings(6), metadata=META,
                    output_dir=tmp_path / "b", val_items=items[:1], resume=ckpt, progress=False)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Without the saved optimizer/RNG state the same three steps would not land there.
    fresh = train(_model(), items, settings=_settings(3, seed=1), metadata=META,
                  output_dir=tmp_path / "c", progress=False).model.state_dict()
    assert not all(torch.equal(a[k], fresh[k]) for k in a)
    # Checkpoints are app checkpoints; the state loads without unpickling code.
    loaded = load_checkpoint(tmp_path / "b" / "model.pt")
    assert loaded.metadata.training["iteration"] == 6 and loaded.metadata.labels == TABLE
    state = torch.load(state_path(tmp_path / "b/checkpoints/iter-0000006.pt"), weights_only=True)
    assert state["iteration"] == 6 and state["sampler"]["next_index"] == 12
    log = (tmp_path / "b/train_log.tsv").read_text().splitlines()
    assert log[0].startswith("iteration\tloss") and [r.split("\t")[0] for r in log[1:]] == ["2", "3", "4", "6"]
    val = (tmp_path / "b/val_log.tsv").read_text()
    assert "\n6\tmean\t" in val and "\n3\tmean\t" in val
    # resuming the finished run leaves its model.pt untouched (the score files that depend on
    # its timestamp stay up to date)
    written = (tmp_path / "b" / "model.pt").stat().st_mtime_ns
    train(_model(), items, settings=_settings(6), metadata=META, output_dir=tmp_path / "b",
          resume=latest_checkpoint(tmp_path / "b"), progress=False)
    assert (tmp_path / "b" / "model.pt").stat().st_mtime_ns == written


def test_resume_refuses_other_settings(tmp_path: Path):
    items = _items()
    train(_model(), items, settings=_settings(3), metadata=META, output_dir=tmp_path,
          progress=False)
    with pytest.raises(CheckpointError, match="batch_size"):
        train(_model(), items, settings=_settings(6, batch_size=3), metadata=META,
              output_dir=tmp_path, resume=latest_checkpoint(tmp_path), progress=False)
    state_path(latest_checkpoint(tmp_path)).unlink()
    assert latest_checkpoint(tmp_path) is None


def test_two_d_training_and_prediction(tmp_path: Path):
    from bids_cadiff.training.loop import predict_indices

    torch.manual_seed(0)
    model = CADiff(ModelConfig(spatial_dims=2, num_classes=3, channels=(8, 16), time_embed_dim=16,
                               taca_kernel_sizes=(3,), taca_num_kernels=2),
                   DiffusionConfig(timesteps=50, sampling_steps=2))
    meta = ModelMetadata(name="tiny2d", labels=TABLE, normalization={}, voxel_size=(4.0,) * 3,
                         patch_size=(16, 16))
    settings = LoopSettings(spatial_dims=2, patch_size=(16, 16), batch_size=4, iterations=3,
                            checkpoint_every=3, val_every=3, lr=1e-3)
    items = _items()
    result = train(model, items, settings=settings, metadata=meta, output_dir=tmp_path,
                   val_items=items[:1], progress=False)
    assert load_checkpoint(result.checkpoint).model.model_config.spatial_dims == 2
    pred = predict_indices(result.model, items[0].image, items[0].distance, patch_size=(16, 16),
                           steps=1, slice_axis=2)
    assert pred.shape == items[0].image.shape and pred.max() < 3


def test_time_limit_stops_cleanly_and_resumes_exactly(tmp_path: Path):
    items = _items()
    straight = train(_model(), items, settings=_settings(4), metadata=META,
                     output_dir=tmp_path / "a", progress=False)
    # a limit already spent: one step, then a checkpoint there and model.pt from it
    stopped = train(_model(), items, settings=_settings(4, time_limit=1e-9), metadata=META,
                    output_dir=tmp_path / "b", progress=False)
    assert stopped.stopped_early and stopped.iteration == 1
    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt is not None and ckpt.name == "iter-0000001.pt"
    assert load_checkpoint(tmp_path / "b/model.pt").metadata.training["iteration"] == 1
    # counted from an earlier clock_start (the app's start): spent alike, a generous limit too
    early = train(_model(), items, settings=_settings(4, time_limit=60.0), metadata=META,
                  output_dir=tmp_path / "c", progress=False,
                  clock_start=time.perf_counter() - 120.0)
    assert early.stopped_early and early.iteration == 1
    # the limit is not a setting of the run: resuming without it continues the same schedule
    resumed = train(_model(), items, settings=_settings(4), metadata=META,
                    output_dir=tmp_path / "b", resume=ckpt, progress=False)
    assert not resumed.stopped_early and resumed.iteration == 4
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_signal_checkpoints_the_current_iteration(tmp_path: Path, monkeypatch):
    import bids_cadiff.training.loop as loop

    sig = signal.SIGUSR1  # SLURM's --signal; SIGTERM: tests/cli/test_train.py (the GPU recipe)

    items = _items()
    straight = train(_model(), items, settings=_settings(4), metadata=META,
                     output_dir=tmp_path / "a", progress=False)
    step_generator = loop._step_generator

    def signalling(seed, rank, iteration, device):  # the scheduler's signal during step 2
        if iteration == 1:
            os.kill(os.getpid(), sig)
        return step_generator(seed, rank, iteration, device)

    monkeypatch.setattr(loop, "_step_generator", signalling)
    before = signal.getsignal(sig)
    stopped = train(_model(), items, settings=_settings(4), metadata=META,
                    output_dir=tmp_path / "b", progress=False)
    assert signal.getsignal(sig) is before  # the handler is only there while training
    assert stopped.stopped_early and stopped.signal == sig.name and stopped.iteration == 2
    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt is not None and ckpt.name == "iter-0000002.pt"  # not a checkpoint_every multiple
    monkeypatch.setattr(loop, "_step_generator", step_generator)
    resumed = train(_model(), items, settings=_settings(4), metadata=META,
                    output_dir=tmp_path / "b", resume=ckpt, progress=False)
    assert resumed.signal is None and resumed.iteration == 4
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_patches_drawn_on_the_device_train_and_resume_exactly(tmp_path: Path):
    from bids_cadiff.training.sampler import SamplingSettings

    items = _items()
    sampling = SamplingSettings(mode="mixed", on_device=True, real_fraction=1.0, field_jitter=1.0)
    straight = train(_model(), items, settings=_settings(4), metadata=META, sampling=sampling,
                     output_dir=tmp_path / "a", progress=False)
    train(_model(), items, settings=_settings(2, checkpoint_every=2), metadata=META,
          sampling=sampling, output_dir=tmp_path / "b", progress=False)
    resumed = train(_model(), items, settings=_settings(4), metadata=META, sampling=sampling,
                    output_dir=tmp_path / "b", resume=latest_checkpoint(tmp_path / "b"),
                    progress=False)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="on_device"):  # another sampler: another run
        train(_model(), items, settings=_settings(6), metadata=META, output_dir=tmp_path / "b",
              sampling=SamplingSettings(mode="mixed", real_fraction=1.0, field_jitter=1.0),
              resume=latest_checkpoint(tmp_path / "b"), progress=False)


def test_states_from_before_a_sampling_setting_existed_still_resume(tmp_path: Path):
    from bids_cadiff.training.sampler import SamplingSettings

    items = _items()
    sampling = SamplingSettings(mode="mixed", real_fraction=1.0)
    train(_model(), items, settings=_settings(3), metadata=META, sampling=sampling,
          output_dir=tmp_path, progress=False)
    ckpt = latest_checkpoint(tmp_path)
    state = torch.load(state_path(ckpt), weights_only=True)
    del state["guard"]["sampling"]["on_device"]  # as written before on_device existed
    torch.save(state, state_path(ckpt))
    resumed = train(_model(), items, settings=_settings(4), metadata=META, sampling=sampling,
                    output_dir=tmp_path, resume=ckpt, progress=False)
    assert resumed.iteration == 4


def test_mixed_precision_only_on_cuda(monkeypatch):
    from bids_cadiff.training.loop import _amp_dtype, _grad_scaler

    cuda = torch.device("cuda")
    assert _amp_dtype(torch.device("cpu"), True) is None  # fp32 on CPUs (no native bf16)
    assert _amp_dtype(cuda, False) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert _amp_dtype(cuda, True) == torch.bfloat16
    # older GPUs (V100, T4) only emulate bfloat16, slowly: float16 with loss scaling there
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation)
    assert _amp_dtype(cuda, True) == torch.float16
    assert not _grad_scaler(torch.device("cpu"), True).is_enabled()
