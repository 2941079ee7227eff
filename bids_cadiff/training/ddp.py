"""Distributed data parallel training: process group set-up, model wrapping, small collectives.

Under ``torchrun --nproc-per-node N cadiff-train ...`` every process reads ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` (set by torchrun) and joins a process group: NCCL when the
training device is a CUDA GPU (one GPU per process, ``cuda:LOCAL_RANK``), gloo on CPUs. Without
those variables training runs in one process and nothing here changes behaviour.

``CADiff``'s objective is a method (``training_losses``), not ``forward``, and DDP's gradient
hooks only fire through ``forward``; :class:`LossModule` is the thin ``nn.Module`` whose
``forward`` is the objective, and that is what gets wrapped.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn

from bids_cadiff.models.diffusion import CADiff

logger = logging.getLogger(__name__)

__all__ = [
    "DistributedContext",
    "LossModule",
    "barrier",
    "broadcast_object",
    "init_distributed",
    "shutdown_distributed",
    "wrap_model",
]

#: How long a rank waits for the others (e.g. while rank 0 validates or others prepare data).
DEFAULT_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands.

    Attributes:
        rank: global rank (0 in a single process).
        world_size: number of processes (1 in a single process).
        local_rank: rank on this machine (selects the GPU).
        device: this process' device.
        backend: ``"nccl"``, ``"gloo"`` or ``""`` (no process group).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, validates and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _resolve(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        return torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)
    return torch.device(device)


def init_distributed(
    device: str = "auto",
    *,
    env: Mapping[str, str] | None = None,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> DistributedContext:
    """Join the process group torchrun set up (or the one described by the arguments).

    Args:
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``; with CUDA each process takes
            ``cuda:LOCAL_RANK``.
        env: the environment to read (default ``os.environ``; never modified).
        init_method: a ``torch.distributed`` init URL (e.g. ``file:///tmp/x``) instead of
            torchrun's ``env://``; then ``rank`` and ``world_size`` must be given.
        rank, world_size: explicit placement (tests spawning processes themselves).
        timeout: collective timeout.

    Returns:
        the context; a single-process context when ``WORLD_SIZE`` is unset or 1.
    """
    env = os.environ if env is None else env
    if world_size is None:
        world_size = int(env.get("WORLD_SIZE", "1"))
    if rank is None:
        rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", str(rank)))
    torch_device = _resolve(device, local_rank)
    if world_size <= 1:
        return DistributedContext(device=torch_device)
    backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, init_method=init_method or "env://", rank=rank,
            world_size=world_size, timeout=timeout,
        )
    logger.info("rank %d/%d on %s (%s)", rank, world_size, torch_device, backend)
    return DistributedContext(rank, world_size, local_rank, torch_device, backend)


def shutdown_distributed(ctx: DistributedContext) -> None:
    """Leave the process group (no-op in a single process)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistributedContext) -> None:
    """Wait for every rank (no-op in a single process)."""
    if ctx.distributed:
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.device.index or 0])
        else:
            dist.barrier()


def broadcast_object(ctx: DistributedContext, value: object) -> object:
    """Rank 0's ``value`` on every rank."""
    if not ctx.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class LossModule(nn.Module):
    """``forward(image, distance, labels, generator)`` = ``model.training_losses(...)``."""

    def __init__(self, model: CADiff) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        image: torch.Tensor,
        distance: torch.Tensor | None,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        return self.model.training_losses(image, distance, labels, generator=generator)


def wrap_model(model: CADiff, ctx: DistributedContext) -> nn.Module:
    """The module to call for losses: :class:`LossModule`, DDP-wrapped when distributed.

    DDP broadcasts rank 0's parameters and buffers at construction, so every rank starts from
    the same weights whatever its own initialisation was. Buffers are not broadcast again at
    every step (``broadcast_buffers=False``): the model's only buffers are constants (the
    noise schedule and the label prior, 14.6 MB in the bundled model) that training never
    changes, and the network uses GroupNorm, which keeps no running statistics.
    """
    module: nn.Module = LossModule(model)
    if not ctx.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index or 0] if ctx.device.type == "cuda" else None
    # Every parameter takes part in every mode (ablations remove modules, they do not idle them).
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)
