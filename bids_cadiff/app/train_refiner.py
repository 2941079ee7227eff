"""The refiner stage of ``cadiff-train``: a recipe's ``[refiner]`` table trains a 1 mm refiner
(:mod:`bids_cadiff.models.refiner`) after CA-Diff and stores it in the final checkpoint.

It trains on the same training subjects as CA-Diff (their T1w and labels at 1 mm; validation
subjects are left out) and on the same label maps, with simulated coarse inputs
(:mod:`bids_cadiff.training.refiner_data`), in ``OUTPUT_DIR/refiner``; a time limit stops it
with a resumable state, and ``--resume auto`` goes on from there. Once it is done, the refiner
is added to ``OUTPUT_DIR/model.pt`` (:func:`~bids_cadiff.inference.checkpoint.store_refiner`).

Recipe form (one flat table; each key belongs to :class:`~bids_cadiff.models.refiner.RefinerConfig`,
:class:`~bids_cadiff.training.refiner_data.CoarseSimulation` or
:class:`~bids_cadiff.training.refiner_loop.RefinerTraining`)::

    [refiner]
    iterations = 1500
    channels = [16, 32, 64]
    deformation = 6.0
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Mapping, Sequence

from bids_cadiff.errors import UsageError
from bids_cadiff.labels import LabelTable
from bids_cadiff.models.refiner import RefinerConfig
from bids_cadiff.training.refiner_data import CoarseSimulation
from bids_cadiff.training.refiner_loop import RefinerStop, RefinerTraining

log = logging.getLogger(__name__)

__all__ = ["RefinerRecipe", "REFINER_DIR", "run_refiner_stage"]

#: Sub-folder of the training output that holds the refiner's state and result.
REFINER_DIR = "refiner"

_ARCHITECTURE_KEYS = ("squeeze", "channels", "prob_floor", "voxel_size")


@dataclass(frozen=True)
class RefinerRecipe:
    """A recipe's ``[refiner]`` table, split by owner."""

    architecture: Mapping[str, Any] = field(default_factory=dict)
    simulation: CoarseSimulation = field(default_factory=CoarseSimulation)
    training: RefinerTraining = field(default_factory=RefinerTraining)

    @classmethod
    def from_dict(cls, table: Mapping[str, Any]) -> "RefinerRecipe":
        """Build from the flat table; an unknown key is an error that lists the known ones.

        Raises:
            UsageError: unknown keys or invalid values.
        """
        # the simulation's factor follows from the model's grid and the refiner's
        sim_keys = {f.name for f in dataclasses.fields(CoarseSimulation)} - {"factor"}
        train_keys = {f.name for f in dataclasses.fields(RefinerTraining)}
        unknown = sorted(set(table) - sim_keys - train_keys - set(_ARCHITECTURE_KEYS))
        if unknown:
            known = sorted(sim_keys | train_keys | set(_ARCHITECTURE_KEYS))
            raise UsageError(f"unknown [refiner] keys {unknown}; known: {', '.join(known)}")
        sim = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items() if k in sim_keys}
        try:
            architecture = {k: table[k] for k in _ARCHITECTURE_KEYS if k in table}
            RefinerConfig.from_dict({"num_classes": 2, **architecture})  # validates
            return cls(architecture=architecture, simulation=CoarseSimulation(**sim),
                       training=RefinerTraining(**{k: v for k, v in table.items() if k in train_keys}))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"invalid [refiner] table: {exc}") from None

    def config(self, num_classes: int) -> RefinerConfig:
        return RefinerConfig.from_dict({"num_classes": num_classes, **self.architecture})

    def to_dict(self) -> dict[str, Any]:
        arch = {k: list(v) if isinstance(v, tuple) else v for k, v in self.architecture.items()}
        sim = {k: v for k, v in self.simulation.to_dict().items() if k != "factor"}
        return {**arch, **sim, **self.training.to_dict()}


def run_refiner_stage(
    recipe: RefinerRecipe,
    *,
    model_voxel_size: Sequence[float],
    table: LabelTable,
    merge: Mapping[int, int] | None,
    pairs: Sequence[Any],
    label_maps: Sequence[Path],
    split_midline_maps: Sequence[str],
    csf_to_background: bool,
    output_dir: Path,
    checkpoint: Path,
    time_left: float | None,
    progress: bool = True,
) -> RefinerStop | None:
    """Train (or resume) the refiner and store it in ``checkpoint``.

    Args:
        recipe: the ``[refiner]`` table.
        model_voxel_size: CA-Diff's grid (mm); the refiner's must divide it evenly.
        table, merge: the label table and the value merge of CA-Diff's training.
        pairs: the training subjects' :class:`~bids_cadiff.app.train.TrainingPair` s.
        label_maps: label maps without images; ``split_midline_maps``: their fnmatch patterns
            whose right hemisphere carries left codes; ``csf_to_background``: their CSF is
            background in the targets (``data.synthetic_csf_to_background``).
        output_dir: the training output; the refiner works in ``output_dir/refiner``.
        checkpoint: the final CA-Diff checkpoint the refiner is added to.
        time_left: seconds before the time limit (``None``: no limit).

    Returns:
        ``None`` when the refiner is in ``checkpoint``; a
        :class:`~bids_cadiff.training.refiner_loop.RefinerStop` when the time limit, SIGTERM
        or SIGUSR1 stopped it first (its state is saved; resume to go on). A signal while the
        training data load stops it before the first iteration.
    """
    from bids_cadiff.inference.checkpoint import store_refiner
    from bids_cadiff.inference.refiner import grid_factor
    from bids_cadiff.training.refiner_data import (
        RefinerPatches,
        load_label_map_volume,
        load_real_volume,
    )
    from bids_cadiff.training.loop import _stop_on_signals
    from bids_cadiff.training.refiner_loop import (
        REFINER_FILE,
        load_refiner,
        refiner_settings,
        train_refiner,
    )

    config = recipe.config(table.num_classes)
    factor = grid_factor(list(model_voxel_size), config.voxel_size)
    if factor is None:
        raise UsageError(
            f"[refiner] voxel_size {config.voxel_size} mm does not divide the model's grid "
            f"({', '.join(f'{v:g}' for v in model_voxel_size)} mm); set it to a divisor"
        )
    simulation = dataclasses.replace(recipe.simulation, factor=factor)
    work = output_dir / REFINER_DIR
    final = work / REFINER_FILE
    subjects = [str(p.t1w.name) for p in pairs] + [p.name for p in label_maps]
    if final.is_file():
        refiner, made = load_refiner(final)
        wanted = refiner_settings(config, simulation, recipe.training, subjects)
        if any(made.get(k) != v for k, v in wanted.items()):
            raise UsageError(
                f"{final} was trained with other [refiner] settings or training data than this "
                f"run; delete {work} to train it again, or use another output folder"
            )
    else:
        clock_start = time.monotonic()
        log.info("refiner: loading %d training image(s) and %d label map(s) at %g mm",
                 len(pairs), len(label_maps), config.voxel_size)
        with _stop_on_signals() as received:  # loading takes minutes: a signal stops it too
            real = [load_real_volume(p.t1w, p.dseg, table, merge=merge,
                                     voxel_size=config.voxel_size) for p in pairs]
            maps = [load_label_map_volume(
                        p, table, merge=merge, csf_to_background=csf_to_background,
                        split_midline=any(fnmatch(p.name, s) for s in split_midline_maps),
                        voxel_size=config.voxel_size)
                    for p in label_maps]
        if received:
            log.info("refiner: %s while loading its training data; resume to go on", received[0])
            return RefinerStop(iteration=None, signal=received[0])
        settings = recipe.training
        dataset = RefinerPatches(
            real, maps, num_classes=table.num_classes, patch=settings.patch,
            length=settings.iterations * settings.batch_size, sim=simulation,
            real_fraction=settings.real_fraction, skull_fraction=settings.skull_fraction,
            seed=settings.seed,
        )
        done = train_refiner(dataset, config, settings, work, subjects=subjects,
                             time_limit=time_left, clock_start=clock_start, progress=progress)
        if isinstance(done, RefinerStop):
            return done
        refiner, made = load_refiner(done)
    digest = store_refiner(checkpoint, checkpoint, refiner, made)
    log.info("refiner stored in %s (sha256 %s…)", checkpoint, digest[:12])
    return None
