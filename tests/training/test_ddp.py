"""DistributedDataParallel: two CPU processes (gloo) train and end with identical weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from bids_cadiff.inference.checkpoint import load_checkpoint
from bids_cadiff.training.ddp import init_distributed, shutdown_distributed, wrap_model
from bids_cadiff.training.loop import train


def _worker(rank: int, folder: str) -> None:
    from tests.training.test_loop import META, _items, _model, _settings

    torch.set_num_threads(1)
    ctx = init_distributed("cpu", env={}, init_method=f"file://{folder}/store", rank=rank,
                           world_size=2)
    try:
        torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
        model = _model()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(rank * 0.01)
        result = train(model, _items(), settings=_settings(3, val_every=0), metadata=META,
                       output_dir=Path(folder) / "out", ctx=ctx, progress=False)
        torch.save(result.model.state_dict(), Path(folder) / f"rank{rank}.pt")
        # the constant buffers (noise schedule, label prior) are not re-sent at every step
        wrapped = wrap_model(_model(), ctx)
        (Path(folder) / f"broadcast{rank}.txt").write_text(str(wrapped.broadcast_buffers))
    finally:
        shutdown_distributed(ctx)


@pytest.mark.slow
def test_two_process_ddp_ranks_agree(tmp_path: Path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [(tmp_path / f"broadcast{r}.txt").read_text() for r in (0, 1)] == ["False", "False"]
    loaded = load_checkpoint(tmp_path / "out" / "model.pt")
    assert loaded.metadata.training["iteration"] == 3
    saved = loaded.model.state_dict()
    assert all(torch.equal(saved[k], a[k]) for k in saved)
