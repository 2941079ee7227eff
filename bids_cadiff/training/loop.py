"""The training loop: AdamW on random patches, validation Dice, checkpoints, exact resume.

Files under the training output folder::

    checkpoints/iter-0000100.pt          model checkpoint (bids_cadiff checkpoint format)
    checkpoints/iter-0000100_state.pt    training state of that checkpoint (see below)
    model.pt                             the final checkpoint (a copy of the last one)
    train_log.tsv                        iteration, losses (mean over the logging window), lr
    val_log.tsv                          iteration, image, class-average Dice (and a mean row)

Exact resume. An interrupted run resumed from its last checkpoint ends with the same weights,
bit for bit on CPU, as a run that was never interrupted, because everything a step depends on
is either in the two files or a pure function of ``(seed, rank, iteration)``:

* weights: the checkpoint stores float32 weights (``save_checkpoint(half=False)``);
* optimizer (AdamW moments and step counts) and learning-rate scheduler: ``*_state.pt``;
* data: patch ``n`` is drawn from ``default_rng([seed, rank, n])``
  (:class:`~bids_cadiff.training.data.PatchDataset`); the sampler state is the next index,
  ``iteration * batch_size``, stored in the state file;
* diffusion timesteps and noise: a ``torch.Generator`` seeded from ``(seed, rank, iteration)``
  each step;
* the global python / numpy / torch (and CUDA) RNG states are stored and restored too, for any
  library code that draws from them.

The state file holds only tensors and plain values and is read with ``weights_only=True``; it
names the sha256 of its checkpoint, and a resume refuses a state that does not belong to the
checkpoint, or settings (model, data, seed, batch, ...) that differ from the run being resumed.
On GPUs, cuDNN may pick non-deterministic kernels: resume is then exact in the data and RNG
streams but weights can differ in the last bits unless ``deterministic`` is set.

Stopping early. ``time_limit`` seconds after the call started (or after ``clock_start``: the
app's start, preparation included), or on SIGTERM or SIGUSR1 (what
SLURM sends before it pre-empts or times out a job: ``#SBATCH --signal=B:USR1@300``), the loop
finishes the iteration it is in, writes a checkpoint and returns with ``stopped_early`` (and
``signal`` naming the signal); ``--resume auto`` continues from there.
"""

from __future__ import annotations

import csv
import dataclasses
import filecmp
import logging
import math
import random
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from bids_cadiff.inference.checkpoint import ModelMetadata, load_checkpoint, save_checkpoint
from bids_cadiff.inference.predict import brain_box, cuda_autocast_dtype, predict_volume
from bids_cadiff.io.atomic import atomic_path
from bids_cadiff.models.diffusion import CADiff
from bids_cadiff.training.data import PatchDataset, TrainingItem
from bids_cadiff.training.ddp import DistributedContext, barrier, wrap_model
from bids_cadiff.training.sampler import MixedPatchDataset, SamplingSettings

logger = logging.getLogger(__name__)

__all__ = [
    "LR_SCHEDULES",
    "LoopSettings",
    "TrainResult",
    "checkpoint_path",
    "latest_checkpoint",
    "predict_indices",
    "state_path",
    "train",
    "validate",
]

STATE_FORMAT = "bids_cadiff-training-state"
STATE_VERSION = 1
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine", "poly")
TRAIN_LOG = "train_log.tsv"
VAL_LOG = "val_log.tsv"
FINAL_MODEL = "model.pt"
_LOSS_KEYS = ("loss", "dice_ce", "mse", "sac", "sim_d", "sim_m")


@dataclass(frozen=True)
class LoopSettings:
    """Optimisation and bookkeeping settings (paper defaults where it gives them).

    Attributes:
        spatial_dims: 3 (3D patches) or 2 (2D slices).
        patch_size: patch in voxels (paper: 96³ in 3D, 160² in 2D).
        batch_size: patches per step and process (paper: 2 in 3D, 70 in 2D).
        lr: AdamW learning rate (paper: 1e-4).
        weight_decay: AdamW weight decay.
        lr_schedule: ``"constant"`` (paper), ``"cosine"`` or ``"poly"`` (power 0.9) decay to 0.
        warmup: linear warm-up iterations.
        iterations: total optimiser steps (paper: 200 000).
        val_every: validation Dice every N iterations (0: never).
        checkpoint_every: checkpoint every N iterations (and always at the end).
        keep_checkpoints: periodic checkpoints kept (older ones are deleted; 0 keeps all).
        log_every: iterations per row of ``train_log.tsv``.
        seed: seeds initial weights, patches, augmentation, timesteps and noise.
        workers: DataLoader worker processes (0: sample in the training process).
        augment: random spatial and intensity augmentation.
        slice_axis: 2D: axis of the slices (2: axial, RAS).
        val_steps: DDIM steps for validation (``None``: the model's ``sampling_steps``).
        val_overlap: sliding-window overlap for validation.
        grad_clip: clip the gradient norm to this (0: off).
        amp: bfloat16/float16 autocast on CUDA (ignored on CPU).
        deterministic: ask cuDNN for deterministic kernels (slower on GPU).
        time_limit: stop cleanly after this many seconds of this call (0: no limit): a
            checkpoint at the iteration reached, then ``model.pt`` from it; resuming continues
            the same schedule (a job scheduler's wall time, a GPU budget).
    """

    spatial_dims: int = 3
    patch_size: tuple[int, ...] = (96, 96, 96)
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.01
    lr_schedule: str = "constant"
    warmup: int = 0
    iterations: int = 200_000
    val_every: int = 1000
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    workers: int = 0
    augment: bool = True
    slice_axis: int = 2
    val_steps: int | None = None
    val_overlap: float = 0.25
    grad_clip: float = 1.0
    amp: bool = True
    deterministic: bool = False
    time_limit: float = 0.0

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if len(self.patch_size) != self.spatial_dims or min(self.patch_size) < 4:
            raise ValueError(
                f"patch_size needs {self.spatial_dims} values >= 4, got {tuple(self.patch_size)}"
            )
        for name in ("batch_size", "iterations", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("val_every", "keep_checkpoints", "workers", "warmup", "time_limit"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {self.slice_axis}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["patch_size"] = list(self.patch_size)
        return out


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        model: the trained model (on its training device, eval mode).
        iteration: iterations done in total.
        checkpoint: the final checkpoint (``model.pt``); ``None`` on ranks other than 0.
        val_dice: last mean validation Dice (NaN if never validated).
        seconds: wall time of this call.
        stopped_early: the time limit or a signal ended the call before ``iterations``.
        signal: the signal that stopped it (``"SIGTERM"``, ``"SIGUSR1"``), else ``None``.
    """

    model: CADiff
    iteration: int
    checkpoint: Path | None
    val_dice: float = math.nan
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    signal: str | None = None


#: Signals that stop training with a checkpoint (SLURM sends SIGTERM, or USR1 with --signal).
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


@contextmanager
def _stop_on_signals() -> Iterator[list[str]]:
    """While inside, :data:`STOP_SIGNALS` append their name to the yielded list instead of
    killing the process (the loop checks it after each iteration). Outside the main thread
    handlers cannot be installed, and the list stays empty."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, _frame: Any) -> None:
        received.append(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield received
    finally:
        for sig, old in previous.items():  # None: a handler not set from Python
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


# --------------------------------------------------------------------------- file names


def checkpoint_path(output_dir: Path, iteration: int) -> Path:
    """``OUTPUT/checkpoints/iter-0000100.pt``.

    Example:
        >>> checkpoint_path(Path("/out"), 100).as_posix()
        '/out/checkpoints/iter-0000100.pt'
    """
    return Path(output_dir) / "checkpoints" / f"iter-{iteration:07d}.pt"


def state_path(checkpoint: Path) -> Path:
    """The training state beside a checkpoint.

    Example:
        >>> state_path(Path("/out/checkpoints/iter-0000100.pt")).name
        'iter-0000100_state.pt'
    """
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}_state.pt")


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint with the highest iteration that has its state file, or ``None``."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    found = sorted(
        p for p in folder.glob("iter-*.pt") if not p.stem.endswith("_state") and state_path(p).is_file()
    )
    return found[-1] if found else None


# --------------------------------------------------------------------------- RNG and state


def _step_generator(seed: int, rank: int, iteration: int, device: torch.device) -> torch.Generator:
    value = int(np.random.default_rng([int(seed), int(rank), int(iteration), 7]).integers(2**62))
    generator = torch.Generator(device=device)
    generator.manual_seed(value)
    return generator


def _rng_state() -> dict[str, Any]:
    key, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": str(key), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    nps = state["numpy"]
    np.random.set_state(
        (nps["key"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
         nps["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def schedule_factor(step: int, *, total: int, warmup: int, kind: str) -> float:
    """The learning rate's factor at ``step`` (0-based): linear warm-up over ``warmup`` steps,
    then ``kind`` (:data:`LR_SCHEDULES`) over the rest of ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return (1.0 - progress) ** 0.9


def _lr_lambda(settings: LoopSettings):  # noqa: ANN202 - returns a callable for LambdaLR
    total, warmup, kind = settings.iterations, settings.warmup, settings.lr_schedule

    def factor(step: int) -> float:
        return schedule_factor(step, total=total, warmup=warmup, kind=kind)

    return factor


def _guard(
    model: CADiff,
    settings: LoopSettings,
    items: Sequence[TrainingItem],
    world: int,
    sampling: SamplingSettings,
) -> dict[str, Any]:
    """What must not change between an interrupted run and its resumption."""
    loop = settings.to_dict()
    for free in ("iterations", "val_every", "checkpoint_every", "keep_checkpoints", "log_every",
                 "workers", "val_steps", "val_overlap", "amp", "deterministic", "time_limit"):
        loop.pop(free)
    if settings.lr_schedule != "constant":
        loop["iterations"] = settings.iterations
    return {
        "model_config": model.model_config.to_dict(),
        "diffusion_config": model.diffusion_config.to_dict(),
        "loop": loop,
        "world_size": world,
        "images": [item.name for item in items],
        "sampling": sampling.to_dict(),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _save_state(path: Path, payload: Mapping[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(dict(payload), tmp)


def _load_state(path: Path) -> dict[str, Any]:
    from bids_cadiff.errors import CheckpointError

    if not path.is_file():
        raise CheckpointError(
            path, "training state file missing; it is written beside every checkpoint by "
            "cadiff-train (resume from a checkpoint that has one, or start a new run)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same
        raise CheckpointError(path, f"cannot be read safely ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(path, f"is not a bids_cadiff training state (format {STATE_FORMAT!r})")
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(path, f"has state version {state.get('version')!r}, expected {STATE_VERSION}")
    return state


def _diff(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += _diff(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    if _jsonable(saved) != _jsonable(current):
        return [f"{prefix.rstrip('.')}: {saved!r} -> {current!r}"]
    return []


# --------------------------------------------------------------------------- inference helpers


@torch.no_grad()
def predict_indices(
    model: CADiff,
    image: np.ndarray,
    distance: np.ndarray,
    *,
    patch_size: Sequence[int],
    steps: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    slice_axis: int = 2,
    overlap: float = 0.25,
) -> np.ndarray:
    """Label channels of a whole prepared volume, with a 3D model or slice by slice in 2D.

    Args:
        model: the CA-Diff model (2D or 3D).
        image: ``(X, Y, Z)`` normalised image.
        distance: ``(3, X, Y, Z)`` distance field.
        patch_size: sliding-window size (2 or 3 values, as the model).
        steps: DDIM steps.
        seed: sampling seed (slice ``i`` uses ``seed + i`` in 2D).
        device: where the network runs.
        slice_axis: 2D: axis to slice along.
        overlap: sliding-window overlap.

    Returns:
        ``(X, Y, Z)`` int16 argmax channel indices.
    """
    was_training = model.training
    model.eval()
    try:
        probs = predict_volume(
            model, image, distance, patch_size=patch_size, steps=steps, seed=seed,
            device=device, slice_axis=slice_axis, overlap=overlap,
        )
        return probs.argmax(0).numpy().astype(np.int16)
    finally:
        model.train(was_training)


def _class_average_dice(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> float:
    from bids_cadiff.evaluation.metrics import dice_score

    scores = [dice_score(pred == c, ref == c) for c in range(1, num_classes)]
    kept = [s for s in scores if not math.isnan(s)]
    return float(np.mean(kept)) if kept else math.nan


def validate(
    model: CADiff,
    items: Sequence[TrainingItem],
    *,
    settings: LoopSettings,
    device: torch.device,
) -> dict[str, float]:
    """Class-average Dice (foreground structures present in either map) per validation image.

    3D models run inside the brain's bounding box, as the app does
    (:func:`~bids_cadiff.inference.predict.brain_box`); voxels outside it are background.
    """
    steps = settings.val_steps or model.diffusion_config.sampling_steps
    out = {}
    for item in items:
        box = brain_box(item.distance) if settings.spatial_dims == 3 else (slice(None),) * 3
        pred = np.zeros(item.labels.shape, dtype=np.int16)
        pred[box] = predict_indices(
            model, item.image[box], item.distance[(slice(None), *box)],
            patch_size=settings.patch_size, steps=steps, seed=settings.seed, device=device,
            slice_axis=settings.slice_axis, overlap=settings.val_overlap,
        )
        out[item.name] = _class_average_dice(pred, item.labels, model.num_classes)
    return out


# --------------------------------------------------------------------------- logs


class _TsvLog:
    """Append-only TSV; on resume, rows past the resumed iteration are dropped first (rows of
    a log with fewer columns are kept, the new columns ``n/a``)."""

    def __init__(self, path: Path, columns: Sequence[str], *, keep_until: int | None) -> None:
        self.path, self.columns = path, list(columns)
        rows: list[list[str]] = []
        if keep_until is not None and path.is_file():
            with open(path, newline="") as fh:
                reader = csv.reader(fh, delimiter="\t")
                header = next(reader, None)
                if header and set(header) <= set(self.columns):
                    # a log written before columns were added keeps its rows ("n/a" there)
                    rows = [
                        [dict(zip(header, r)).get(c, "n/a") for c in self.columns]
                        for r in reader if r and int(r[0]) <= keep_until
                    ]
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="") as fh:
                writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
                writer.writerow(self.columns)
                writer.writerows(rows)

    def write(self, row: Mapping[str, Any]) -> None:
        def fmt(v: Any) -> str:
            if v is None or (isinstance(v, float) and math.isnan(v)):
                return "n/a"
            return f"{v:.6g}" if isinstance(v, float) else str(v)

        with open(self.path, "a", newline="") as fh:
            csv.writer(fh, delimiter="\t", lineterminator="\n").writerow(
                [fmt(row.get(c)) for c in self.columns]
            )


def _tensorboard(output_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional: TensorBoard is not a dependency
        return None
    return SummaryWriter(log_dir=str(output_dir / "tensorboard"))


# --------------------------------------------------------------------------- the loop


def _amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The autocast dtype (:func:`~bids_cadiff.inference.predict.cuda_autocast_dtype`); ``None``
    off CUDA (on CPUs without native bfloat16 autocast is far slower than float32) or without
    ``amp``."""
    if device.type != "cuda" or not amp:
        return None
    return cuda_autocast_dtype()


def _autocast(device: torch.device, amp: bool) -> Any:
    import contextlib

    dtype = _amp_dtype(device, amp)
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _grad_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler:
    """Loss scaling for float16 autocast (older GPUs), whose small gradients would underflow;
    a pass-through otherwise (bfloat16 has float32's range)."""
    enabled = _amp_dtype(device, amp) == torch.float16
    return torch.amp.GradScaler("cuda" if enabled else "cpu", enabled=enabled)


def _save(
    model: CADiff, optimizer: torch.optim.Optimizer, scheduler: Any, *, iteration: int,
    settings: LoopSettings, metadata: ModelMetadata, output_dir: Path, guard: Mapping[str, Any],
    started: float, seconds_before: float, scaler: torch.amp.GradScaler | None = None,
) -> Path:
    path = checkpoint_path(output_dir, iteration)
    training = dict(metadata.training)
    training.update(
        iteration=iteration, seconds=seconds_before + time.perf_counter() - started,
        loop=settings.to_dict(),
    )
    meta = dataclasses.replace(metadata, training=training)
    sha = save_checkpoint(
        path, model, meta, extra={"state_file": state_path(path).name, "iteration": iteration}
    )
    _save_state(
        state_path(path),
        {
            "format": STATE_FORMAT, "version": STATE_VERSION, "iteration": iteration,
            "checkpoint_sha256": sha, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": _rng_state(),
            "sampler": {"seed": settings.seed, "next_index": iteration * settings.batch_size},
            "guard": _jsonable(guard), "seconds": training["seconds"],
            **({"scaler": scaler.state_dict()} if scaler is not None and scaler.is_enabled()
               else {}),
        },
    )
    logger.info("checkpoint %s (iteration %d)", path, iteration)
    if settings.keep_checkpoints:
        older = sorted(
            p for p in path.parent.glob("iter-*.pt") if not p.stem.endswith("_state") and p != path
        )
        for old in older[: max(len(older) - settings.keep_checkpoints + 1, 0)]:
            old.unlink(missing_ok=True)
            state_path(old).unlink(missing_ok=True)
    return path


def train(
    model: CADiff,
    items: Sequence[TrainingItem],
    *,
    settings: LoopSettings,
    metadata: ModelMetadata,
    output_dir: str | Path,
    ctx: DistributedContext | None = None,
    val_items: Sequence[TrainingItem] = (),
    resume: str | Path | None = None,
    progress: bool = True,
    sampling: SamplingSettings | None = None,
    clock_start: float | None = None,
) -> TrainResult:
    """Train ``model`` on random patches of ``items`` (see the module docstring).

    Args:
        model: a freshly built model (its weights are replaced when resuming; under DDP rank 0's
            initial weights are broadcast).
        items: the training images.
        settings: optimisation settings.
        metadata: what the checkpoints say besides the weights (labels, voxel size, ...); the
            loop adds ``iteration``, ``seconds`` and ``loop`` to its ``training`` dict.
        output_dir: where checkpoints and logs go.
        ctx: the distributed context (default: single process on the CPU).
        val_items: held-out images for validation Dice (rank 0 only).
        resume: a checkpoint written by this function (its ``*_state.pt`` beside it).
        progress: tqdm bar on rank 0.
        sampling: how patches are drawn: ``mode="patches"`` (default): real images with MONAI
            augmentation (:class:`~bids_cadiff.training.data.PatchDataset`); ``"mixed"``: real
            and synthesised images (:class:`~bids_cadiff.training.sampler.MixedPatchDataset`).
        clock_start: the :func:`time.perf_counter` value ``settings.time_limit`` counts from
            (the app passes its own start, so that preparing the data is inside the limit);
            default: this call's start.

    Returns:
        the trained model and where its final checkpoint is.

    Raises:
        CheckpointError: ``resume`` (or its state) is unusable, or belongs to a run with other
            settings (the message lists the differences).
    """
    from bids_cadiff.errors import CheckpointError

    started = time.perf_counter()
    if clock_start is None:
        clock_start = started
    ctx = ctx or DistributedContext()
    output_dir = Path(output_dir)
    device = ctx.device
    if settings.deterministic and device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(settings))
    scaler = _grad_scaler(device, settings.amp)
    sampling = sampling or SamplingSettings()
    guard = _guard(model, settings, items, ctx.world_size, sampling)
    start, seconds_before = 0, 0.0
    if resume is not None:
        resume = Path(resume)
        loaded = load_checkpoint(resume)
        state = _load_state(state_path(resume))
        if state["checkpoint_sha256"] != loaded.metadata.sha256:
            raise CheckpointError(
                resume, f"{state_path(resume).name} belongs to another checkpoint (sha256 "
                f"{state['checkpoint_sha256'][:12]}…, this file {loaded.metadata.sha256[:12]}…)"
            )
        saved_guard = dict(state["guard"])
        if "sampling" not in saved_guard and sampling.mode == "patches":
            saved_guard["sampling"] = guard["sampling"]  # states from before [sampling] existed
        if "sampling" in saved_guard:  # settings added since: absent means their default
            defaults = SamplingSettings().to_dict()
            saved_guard["sampling"] = {
                **{k: v for k, v in guard["sampling"].items()
                   if k not in saved_guard["sampling"] and v == defaults.get(k)},
                **saved_guard["sampling"]}
        differences = _diff(saved_guard, _jsonable(guard))
        if differences:
            raise CheckpointError(
                resume, "was trained with other settings; resume with the same ones or start a "
                "new run in another output folder. Differences: " + "; ".join(differences)
            )
        model.load_state_dict(loaded.model.state_dict())
        model.to(device).train()
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start, seconds_before = int(state["iteration"]), float(state.get("seconds", 0.0))
        logger.info("resuming from %s at iteration %d", resume, start)
    if start >= settings.iterations:
        logger.warning("already at iteration %d of %d: nothing to train", start, settings.iterations)
    module = wrap_model(model, ctx)

    batches: Any
    b = settings.batch_size
    if sampling.mode == "mixed" and settings.spatial_dims != 3:
        raise ValueError("sampling mode 'mixed' draws 3D patches; use spatial_dims 3")
    if sampling.on_device:  # the GPU recipe: items in device memory, batches made there
        from bids_cadiff.training.device_sampler import DevicePatchSampler

        batches = DevicePatchSampler(
            items, patch_size=settings.patch_size, batch_size=b, seed=settings.seed,
            rank=ctx.rank, settings=sampling, device=device,
        ).batches(start, settings.iterations)
    else:
        dataset: torch.utils.data.Dataset
        if sampling.mode == "mixed":
            dataset = MixedPatchDataset(items, patch_size=settings.patch_size,
                                        seed=settings.seed, rank=ctx.rank, settings=sampling)
        else:  # the paper's patches: real images only (label maps without images: prior only)
            dataset = PatchDataset(
                [item for item in items if item.real], spatial_dims=settings.spatial_dims,
                patch_size=settings.patch_size, seed=settings.seed, rank=ctx.rank,
                augment=settings.augment, slice_axis=settings.slice_axis,
            )
        batches = torch.utils.data.DataLoader(
            dataset, batch_size=b, sampler=range(start * b, settings.iterations * b),
            num_workers=settings.workers, pin_memory=device.type == "cuda", drop_last=True,
        )
    main = ctx.is_main
    train_log = val_log = writer = None
    if main:
        keep = start if resume is not None else -1
        train_log = _TsvLog(output_dir / TRAIN_LOG, ["iteration", *_LOSS_KEYS, "lr", "seconds"],
                            keep_until=keep)
        val_log = _TsvLog(output_dir / VAL_LOG, ["iteration", "image", "dice"], keep_until=keep)
        writer = _tensorboard(output_dir)
    bar = tqdm(total=settings.iterations, initial=start, desc="training", unit="it",
               disable=not (main and progress), dynamic_ncols=True)
    sums: dict[str, torch.Tensor] = {}
    window = 0
    val_dice = math.nan
    history: list[dict[str, float]] = []
    iteration = start
    final: Path | None = None
    stopped = False
    with _stop_on_signals() as received:
        for iteration, batch in zip(range(start, settings.iterations), batches):
            image = batch["image"].to(device, non_blocking=True)
            distance = batch["distance"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            generator = _step_generator(settings.seed, ctx.rank, iteration, device)
            with _autocast(device, settings.amp):
                losses = module(image, distance, labels, generator)
            scaler.scale(losses["loss"]).backward()
            if settings.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            for key, value in losses.items():
                sums[key] = sums.get(key, torch.zeros((), device=device)) + value.detach().float()
            window += 1
            done = iteration + 1
            bar.update(1)
            if main and (done % settings.log_every == 0 or done == settings.iterations):
                means = {k: float(v) / window for k, v in sums.items()}
                row = {"iteration": done, **means, "lr": scheduler.get_last_lr()[0],
                       "seconds": round(seconds_before + time.perf_counter() - started, 1)}
                assert train_log is not None
                train_log.write(row)
                history.append({k: float(v) for k, v in row.items()})
                bar.set_postfix(loss=f"{means['loss']:.4f}")
                if writer is not None:
                    for k, v in means.items():
                        writer.add_scalar(f"train/{k}", v, done)
            if done % settings.log_every == 0:
                sums, window = {}, 0
            if settings.val_every and val_items and done % settings.val_every == 0:
                if main:
                    scores = validate(model, val_items, settings=settings, device=device)
                    val_dice = float(np.nanmean(list(scores.values()))) if scores else math.nan
                    assert val_log is not None
                    for name, dice in scores.items():
                        val_log.write({"iteration": done, "image": name, "dice": dice})
                    val_log.write({"iteration": done, "image": "mean", "dice": val_dice})
                    logger.info("iteration %d: validation Dice %.4f", done, val_dice)
                    if writer is not None:
                        writer.add_scalar("val/dice", val_dice, done)
                barrier(ctx)
            out_of_time = _out_of_time(clock_start, settings.time_limit, ctx, bool(received))
            if done % settings.checkpoint_every == 0 or done == settings.iterations or out_of_time:
                if main:
                    final = _save(
                        model, optimizer, scheduler, iteration=done, settings=settings,
                        metadata=metadata, output_dir=output_dir, guard=guard, started=started,
                        seconds_before=seconds_before, scaler=scaler,
                    )
                barrier(ctx)
            iteration = done
            if out_of_time and done < settings.iterations:
                stopped = True
                why = (f"{received[0]} received" if received
                       else f"time limit of {settings.time_limit:.0f} s reached")
                logger.warning("%s at iteration %d of %d: checkpoint saved; continue with "
                               "--resume auto", why, done, settings.iterations)
                break
    bar.close()
    if writer is not None:
        writer.close()
    result_path: Path | None = None
    if main:
        if final is None:  # nothing trained in this call: reuse the resumed checkpoint
            final = Path(resume) if resume is not None else _save(
                model, optimizer, scheduler, iteration=iteration, settings=settings,
                metadata=metadata, output_dir=output_dir, guard=guard, started=started,
                seconds_before=seconds_before, scaler=scaler,
            )
        result_path = output_dir / FINAL_MODEL
        # an unchanged model is not written again: what depends on its timestamp (the
        # cross-validation's score files) stays up to date
        if not (result_path.is_file() and filecmp.cmp(final, result_path, shallow=False)):
            with atomic_path(result_path) as tmp:
                shutil.copyfile(final, tmp)
        logger.info("final model %s (iteration %d)", result_path, iteration)
    barrier(ctx)
    model.eval()
    return TrainResult(
        model=model, iteration=iteration, checkpoint=result_path, val_dice=val_dice,
        seconds=time.perf_counter() - started, history=history, stopped_early=stopped,
        signal=received[0] if stopped and received else None,
    )


def _out_of_time(started: float, limit: float, ctx: DistributedContext,
                 signalled: bool = False) -> bool:
    """Whether to stop now: ``limit`` seconds have passed since ``started`` (0: never) or a stop
    signal came; under DDP rank 0 decides for every rank, so all stop at the same iteration."""
    flag = signalled or (limit > 0 and time.perf_counter() - started >= limit)
    if ctx.distributed:
        import torch.distributed as dist

        tensor = torch.tensor([int(flag)], device=ctx.device)
        dist.broadcast(tensor, src=0)
        flag = bool(tensor.item())
    return flag
