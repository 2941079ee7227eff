"""Training loop of the 1 mm refiner: AdamW, cosine learning rate, MONAI's Dice + CE loss,
resumable checkpoints (weights, optimiser, iteration), a time limit that stops with one.

The data come from :class:`~bids_cadiff.training.refiner_data.RefinerPatches`; item ``i`` is
a pure function of the seed and ``i``, so a resumed run draws the same patches as an
uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from monai.losses import DiceCELoss
from tqdm import tqdm

from bids_cadiff.io.atomic import atomic_path
from bids_cadiff.models.refiner import Refiner, RefinerConfig
from bids_cadiff.training.loop import _stop_on_signals, schedule_factor
from bids_cadiff.training.refiner_data import CoarseSimulation, RefinerPatches

log = logging.getLogger(__name__)

__all__ = [
    "RefinerTraining",
    "RefinerStop",
    "refiner_settings",
    "train_refiner",
    "load_refiner",
    "REFINER_STATE",
    "REFINER_FILE",
]

#: The resumable state in the output folder, and the final refiner.
REFINER_STATE = "refiner_state.pt"
REFINER_FILE = "refiner.pt"


@dataclass(frozen=True)
class RefinerTraining:
    """Settings of :func:`train_refiner` (a recipe's ``[refiner]`` table)."""

    iterations: int = 3000
    patch: int = 64
    batch_size: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    checkpoint_every: int = 250
    log_every: int = 25
    seed: int = 0
    real_fraction: float = 0.5
    skull_fraction: float = 0.6

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("iterations, batch_size and checkpoint_every must be >= 1")
        if self.patch % 4:
            raise ValueError(f"patch must be divisible by 4, got {self.patch}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RefinerStop:
    """Refiner training stopped before its last iteration, with its state saved (resume to go
    on).

    Attributes:
        iteration: iterations done (``None``: stopped before training began).
        signal: the signal that stopped it (``"SIGTERM"``, ``"SIGUSR1"``), or ``None`` for the
            time limit.
    """

    iteration: int | None
    signal: str | None = None


def refiner_settings(
    config: RefinerConfig, simulation: CoarseSimulation, training: RefinerTraining,
    subjects: list[str],
) -> dict[str, Any]:
    """What a refiner was made with, as saved in its state and file: a state or a refiner
    whose settings differ from a run's is not that run's."""
    return {"config": config.to_dict(), "simulation": simulation.to_dict(),
            "training": training.to_dict(), "subjects": list(subjects)}


def load_refiner(path: str | Path) -> tuple[Refiner, dict[str, Any]]:
    """A refiner saved by :func:`train_refiner` (``refiner.pt`` or a state), eval mode.

    Returns:
        ``(refiner, metadata)``: metadata holds ``config``, ``simulation``, ``training``,
        ``iteration`` and ``subjects``.
    """
    payload = torch.load(str(path), map_location="cpu", weights_only=True)
    if "refiner" not in payload:
        raise ValueError(f"{path} is not a refiner saved by cadiff-train (no 'refiner' weights)")
    model = Refiner(RefinerConfig.from_dict(payload["config"]))
    model.load_state_dict(payload["refiner"])
    model.eval()
    meta = {k: v for k, v in payload.items() if k not in ("refiner", "optimizer")}
    return model, meta


def train_refiner(
    dataset: RefinerPatches,
    config: RefinerConfig,
    settings: RefinerTraining,
    out_dir: str | Path,
    *,
    subjects: list[str],
    time_limit: float | None = None,
    clock_start: float | None = None,
    progress: bool = True,
    on_checkpoint: Callable[[int], None] | None = None,
) -> Path | RefinerStop:
    """Train (or resume) a refiner in ``out_dir``.

    Args:
        dataset: the training patches (its ``length`` at least ``iterations × batch_size``).
        config: the architecture.
        settings: the schedule.
        out_dir: holds :data:`REFINER_STATE` while training, :data:`REFINER_FILE` at the end.
        subjects: names of the training volumes, recorded in the output.
        time_limit: seconds since ``clock_start`` after which training stops with a state.
        progress: tqdm bar.

    SIGTERM and SIGUSR1 (SLURM's pre-emption signals) also stop it with a state, after the
    current iteration.

    Returns:
        the final :data:`REFINER_FILE`, or a :class:`RefinerStop` when the time limit or a
        signal stopped training first.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clock_start = time.monotonic() if clock_start is None else clock_start
    torch.manual_seed(settings.seed)
    model = Refiner(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    start = 0
    state_path = out / REFINER_STATE
    meta = refiner_settings(config, dataset.sim, settings, subjects)
    if state_path.is_file():
        state = torch.load(str(state_path), map_location="cpu", weights_only=True)
        if any(state.get(k) != v for k, v in meta.items()):
            raise ValueError(
                f"{state_path} was made with other refiner settings or training data; delete "
                "it or use another output folder"
            )
        model.load_state_dict(state["refiner"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["iteration"])
        log.info("refiner: resuming at iteration %d", start)

    def save(path: Path, iteration: int, with_optimizer: bool) -> None:
        payload = {**meta, "iteration": iteration, "refiner": model.state_dict()}
        if with_optimizer:
            payload["optimizer"] = optimizer.state_dict()
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    model.train()
    bar = tqdm(range(start, settings.iterations), desc="refiner", initial=start,
               total=settings.iterations, disable=not progress)
    running = 0.0
    with _stop_on_signals() as received:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * schedule_factor(
                    step, total=settings.iterations, warmup=settings.warmup, kind="cosine")
            items = [dataset[step * settings.batch_size + k] for k in range(settings.batch_size)]
            x = torch.stack([it["input"] for it in items])
            y = torch.stack([it["target"] for it in items])
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            running += float(loss.detach())
            done = step + 1
            if done % settings.log_every == 0:
                log.info("refiner iteration %d: loss %.4f, lr %.2e", done,
                         running / settings.log_every, optimizer.param_groups[0]["lr"])
                bar.set_postfix(loss=f"{running / settings.log_every:.4f}")
                running = 0.0
            out_of_time = bool(received) or (
                time_limit is not None and time.monotonic() - clock_start > time_limit)
            if done % settings.checkpoint_every == 0 or (out_of_time and done < settings.iterations):
                save(state_path, done, with_optimizer=True)
                if on_checkpoint is not None:
                    on_checkpoint(done)
            if out_of_time and done < settings.iterations:
                log.info("refiner: %s at iteration %d: state saved; resume to go on",
                         received[0] if received else "time limit reached", done)
                return RefinerStop(iteration=done, signal=received[0] if received else None)
    final = out / REFINER_FILE
    model.eval()
    save(final, settings.iterations, with_optimizer=False)
    log.info("refiner: wrote %s", final)
    return final
