#!/usr/bin/env python
"""Keep a training run's resumable state in the repository, in one place, overwritten.

A fold of the default model trains for hours over several sessions; the work folder
(``work/``, not in git) may not outlive a session. This copies what resuming needs, and the
logs, between a run folder and a committed folder:

    python scripts/training_state.py save work/default_model_v2/fold1 artifacts/default_model_v2/fold1
    python scripts/training_state.py restore artifacts/default_model_v2/fold1 work/default_model_v2/fold1

``save`` replaces the committed folder's contents with the run's latest checkpoint that has a
state file (``checkpoints/iter-N.pt`` and ``iter-N_state.pt``), ``train_log.tsv``,
``val_log.tsv`` and ``train_config.toml``. ``restore`` copies them back when the run folder
has no checkpoint at least as far on (a fresh clone, a lost work folder), and does nothing
otherwise; ``cadiff-train --resume auto`` then continues from it, exactly.

The label prior (a 14.6 MB buffer of the default model) is built once from the training labels
and never trained, so ``save`` keeps it apart, in ``label_prior.pt``, which stays byte-for-byte
the same from one save to the next: git stores it once, not once per save. ``restore`` puts it
back and checks the checkpoint's content hash before the run sees it.

    python scripts/training_state.py finished work/default_model_v2/fold1 work/default_model_v2/fold2

``finished`` exits 1, naming the run and how far it is, unless every run has trained all the
iterations of its ``train_config.toml`` and holds the ``model.pt`` they ended with (a run
stopped early also writes ``model.pt``: scoring that as the fold's model would be wrong), and,
when its recipe has a ``[refiner]`` table, that ``model.pt`` carries the finished refiner.

The refiner stage's files (``refiner/refiner_state.pt`` while it trains, ``refiner/refiner.pt``
once done; about 4 MB) travel with ``save`` and ``restore`` too.
"""

from __future__ import annotations

import argparse
import filecmp
import io
import logging
import pickle
import shutil
import sys
import tomllib
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bids_cadiff.errors import CheckpointError  # noqa: E402
from bids_cadiff.inference.checkpoint import _content_hash, read_checkpoint  # noqa: E402
from bids_cadiff.io.atomic import atomic_path  # noqa: E402
from bids_cadiff.training.loop import FINAL_MODEL, checkpoint_path, latest_checkpoint, state_path  # noqa: E402,E501

logger = logging.getLogger("training_state")

#: Run files kept beside the checkpoint.
LOGS = ("train_log.tsv", "val_log.tsv", "train_config.toml")
#: The refiner stage's files (bids_cadiff.app.train_refiner), kept when present.
REFINER_FILES = ("refiner/refiner_state.pt", "refiner/refiner.pt")
#: The checkpoint's buffer kept apart (unchanged by training), and the file it is kept in.
PRIOR_KEY, PRIOR_FILE = "label_prior", "label_prior.pt"


def _iteration(checkpoint: Path | None) -> int:
    return -1 if checkpoint is None else int(checkpoint.stem.split("-")[1])


def _copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def _serialised(obj: Any) -> bytes:
    """``torch.save`` bytes, the same for the same tensors (no file name inside)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _write(data: bytes, dest: Path) -> None:
    if dest.is_file() and dest.read_bytes() == data:
        return  # unchanged: the committed blob stays the same
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def _save_checkpoint_apart(checkpoint: Path, dest: Path) -> None:
    """The checkpoint without its label prior into ``dest/checkpoints``, the prior into
    ``dest/label_prior.pt`` (a checkpoint without one is copied as it is)."""
    payload = read_checkpoint(checkpoint)
    prior = payload["state_dict"].pop(PRIOR_KEY, None)
    if prior is None:
        _copy(checkpoint, dest / "checkpoints" / checkpoint.name)
        (dest / PRIOR_FILE).unlink(missing_ok=True)
        return
    _write(_serialised(prior), dest / PRIOR_FILE)
    _write(_serialised(payload), dest / "checkpoints" / checkpoint.name)


def _restore_checkpoint(kept: Path, saved: Path, dest: Path) -> None:
    """``kept`` with the label prior of ``saved`` put back, verified, as ``dest``."""
    try:
        payload = torch.load(kept, map_location="cpu", weights_only=True)
        state_dict = payload["state_dict"]
        if PRIOR_KEY not in state_dict and payload["model_config"].get("label_prior_bins"):
            if not (saved / PRIOR_FILE).is_file():
                raise SystemExit(f"{kept} was saved without its label prior and {saved / PRIOR_FILE} "
                                 "is missing; restore the folder from git")
            state_dict[PRIOR_KEY] = torch.load(saved / PRIOR_FILE, map_location="cpu",
                                               weights_only=True)
    except (OSError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as exc:
        raise SystemExit(f"{kept} or {saved / PRIOR_FILE} cannot be read ({exc}); "
                         "restore the folder from git") from exc
    with atomic_path(dest) as tmp:
        tmp.write_bytes(_serialised(payload))
        try:
            read_checkpoint(tmp)
        except CheckpointError as exc:
            raise SystemExit(f"{kept} with {saved / PRIOR_FILE} is not the checkpoint that was "
                             f"saved ({exc}); restore the folder from git") from exc


def save(run: Path, dest: Path) -> Path:
    """Copy ``run``'s latest resumable checkpoint and its logs into ``dest`` (replacing it)."""
    checkpoint = latest_checkpoint(run)
    if checkpoint is None:
        raise SystemExit(f"{run} has no checkpoint with a state file: nothing to save")
    files = [checkpoint, state_path(checkpoint)]
    _save_checkpoint_apart(checkpoint, dest)  # reads and verifies it first
    _copy(state_path(checkpoint), dest / "checkpoints" / state_path(checkpoint).name)
    for old in (dest / "checkpoints").glob("iter-*.pt"):
        if old.name not in {f.name for f in files}:
            old.unlink()
    for name in LOGS + REFINER_FILES:
        if (run / name).exists():
            _copy(run / name, dest / name)
        elif name in REFINER_FILES:
            (dest / name).unlink(missing_ok=True)
    logger.info("saved %s (iteration %d) in %s", checkpoint.name, _iteration(checkpoint), dest)
    return dest / "checkpoints" / checkpoint.name


def restore(saved: Path, run: Path) -> bool:
    """Copy ``saved`` into ``run`` when that has no checkpoint as far on; True if copied."""
    kept, have = latest_checkpoint(saved), latest_checkpoint(run)
    for name in REFINER_FILES:  # the refiner stage's progress, where the run lacks it
        if (saved / name).is_file() and not (run / name).is_file():
            _copy(saved / name, run / name)
    if kept is None:
        logger.info("%s holds no saved state: nothing to restore", saved)
        return False
    if _iteration(have) >= _iteration(kept):
        logger.info("%s is at iteration %d, the saved state at %d: kept as it is", run,
                    _iteration(have), _iteration(kept))
        return False
    _restore_checkpoint(kept, saved, run / "checkpoints" / kept.name)
    _copy(state_path(kept), run / "checkpoints" / state_path(kept).name)
    for name in LOGS:
        if (saved / name).exists():
            _copy(saved / name, run / name)
    logger.info("restored %s into %s", kept.name, run)
    return True


def unfinished(run: Path) -> str | None:
    """Why ``run`` is not a finished training run, or ``None`` when it is."""
    config = run / "train_config.toml"
    if not config.is_file():
        return f"{run}: no train_config.toml: not trained yet, or not a cadiff-train run folder"
    iterations = int(tomllib.loads(config.read_text())["training"]["iterations"])
    last, final = checkpoint_path(run, iterations), run / FINAL_MODEL
    if not last.is_file():
        reached = _iteration(latest_checkpoint(run))
        return (f"{run}: at iteration {max(reached, 0)} of {iterations}; finish it first "
                "(make default-model-foldN resumes it)")
    if not final.is_file() or not _same_network(final, last):
        return (f"{run}: {FINAL_MODEL} is not the final checkpoint {last.name} (a model from an "
                f"earlier stop); resume the run once (make default-model-foldN) to write it")
    if "refiner" in tomllib.loads(config.read_text()) and "refiner" not in read_checkpoint(final):
        return (f"{run}: its recipe trains a 1 mm refiner and {FINAL_MODEL} has none yet; "
                "resume the run (make default-model-foldN) to train it")
    return None


def _same_network(final: Path, last: Path) -> bool:
    """``final`` is ``last`` with at most a refiner added (``store_refiner`` rewrites it)."""
    if filecmp.cmp(final, last, shallow=False):
        return True

    def network(path: Path) -> str:
        payload = read_checkpoint(path)
        return _content_hash({k: v for k, v in payload.items() if not k.startswith("refiner")})

    return network(final) == network(last)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, first, second in (("save", "run", "dest"), ("restore", "saved", "run")):
        p = sub.add_parser(name)
        p.add_argument(first, type=Path)
        p.add_argument(second, type=Path)
    sub.add_parser("finished").add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "finished":
        reasons = [r for r in map(unfinished, args.runs) if r is not None]
        for reason in reasons:
            logger.error(reason)
        return 1 if reasons else 0
    if args.command == "save":
        save(args.run, args.dest)
    else:
        restore(args.saved, args.run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
