"""Training orchestration: BIDS T1w + labelled derivatives → prepared arrays → a CA-Diff checkpoint.

A recipe (:class:`TrainConfig`) has these TOML tables, each optional in a file::

    name = "cadiff-3d"
    [data]       labels, labels_desc, atlas, registration, voxel_size, normalization, ...
    [model]      ModelConfig fields except num_classes (from the label table)
    [diffusion]  DiffusionConfig fields
    [training]   LoopSettings fields (patch_size, batch_size, lr, iterations, ...)
    [sampling]   SamplingSettings fields (mode "patches", the paper's, or "mixed": real and
                 synthesised images, class balance, registration jitter; see
                 :mod:`bids_cadiff.training.sampler`)
    [refiner]    optional: a 1 mm refiner trained after CA-Diff on the same training subjects
                 and label maps, stored in the final checkpoint
                 (:mod:`bids_cadiff.app.train_refiner`)

``data.synth_label_maps`` adds label maps without images (SynthSeg's training maps, for
example): each is registered to the atlas once, and with ``sampling.mode = "mixed"`` training
synthesises images from it. The bundled default model's recipe is ``configs/default_model.toml``.

``configs/*.toml`` holds the paper's recipe and its ablations; the command line overrides any
value. The resolved recipe is written to ``OUTPUT_DIR/train_config.toml`` beside the checkpoint
(and into the checkpoint's ``training`` provenance).

Labels: every ``*_dseg.nii[.gz]`` of ``LABELS_DIR`` is paired with the T1w of ``BIDS_DIR`` with
the same ``sub``/``ses``/``acq``/``ce``/``rec``/``run`` entities (:mod:`bids_cadiff.evaluation.
matching`). ``labels = "synthseg32"`` learns the 32 SynthSeg structures with FreeSurfer aseg
values merged by :data:`~bids_cadiff.labels.ASEG_MERGE`; ``"dseg"`` learns every value listed in
``LABELS_DIR/dseg.tsv``; a path names a TSV with ``index``/``name`` columns. Values outside the
table (and the merge) are background.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bids_cadiff import __version__
from bids_cadiff.app.train_refiner import RefinerRecipe, run_refiner_stage
from bids_cadiff.bidsio.derivatives import read_label_table_tsv
from bids_cadiff.config import dumps_toml
from bids_cadiff.errors import InputError, UsageError
from bids_cadiff.io.atomic import atomic_write
from bids_cadiff.labels import ASEG_MERGE, SYNTHSEG32, LabelTable
from bids_cadiff.models.config import DiffusionConfig, ModelConfig
from bids_cadiff.training.loop import LoopSettings, TrainResult, latest_checkpoint
from bids_cadiff.training.prepare import REGISTRATION_MODES
from bids_cadiff.training.sampler import SamplingSettings

logger = logging.getLogger(__name__)

__all__ = [
    "DataSettings",
    "TrainConfig",
    "TrainingPair",
    "find_label_maps",
    "find_training_pairs",
    "load_recipe",
    "merge_recipes",
    "prepare_items",
    "prepare_label_map_items",
    "resolve_labels",
    "run_training",
    "split_participants",
]

CONFIG_NAME = "train_config.toml"
#: Default patch per spatial dimensionality (paper: 96³ in 3D, 160² in 2D).
DEFAULT_PATCH = {3: (96, 96, 96), 2: (160, 160)}
DEFAULT_BATCH = {3: 2, 2: 70}


@dataclass(frozen=True)
class DataSettings:
    """Which data, and how it is prepared.

    Attributes:
        bids_dir: raw BIDS dataset with the T1w images.
        labels_dir: BIDS-Derivatives dataset with the ``*_dseg`` label maps.
        output_dir: where checkpoints, logs and the resolved config go.
        work_dir: cache of prepared arrays and registrations (default ``OUTPUT_DIR/work``).
        participant_labels: subjects to use (training and validation); empty: all.
        val_participants: held-out validation subjects (overrides ``val_fraction``).
        val_fraction: fraction of subjects held out for validation when no list is given.
        labels: ``"synthseg32"``, ``"dseg"`` or a TSV path (see the module docstring).
        labels_desc: use only label maps with this ``desc`` entity.
        atlas: atlas T1w for the distance field (``None``: Colin27 / MNI152, as the app).
        registration: ``"syn"`` (app default), ``"affine"`` or ``"none"`` (identity; tests).
        voxel_size: model grid (mm).
        normalization: intensity normalisation (``{"method": "percentile", "lower", "upper"}``).
        synth_label_maps: folder of label maps without images (``*.nii[.gz]``, ``*.mgz``;
            FreeSurfer values) to synthesise training images from; ``None``: none.
        split_midline_maps: file-name patterns (``fnmatch``) of maps in ``synth_label_maps``
            whose hemispheres both carry left codes; their right side gets right codes.
        synthetic_csf_to_background: the label maps' CSF (24: SynthSeg's maps label all the
            extra-cerebral CSF with it) is background in their targets and in the label
            prior, aseg's convention (a small region there).
        max_synth_label_maps: use only the first N maps (sorted by name; 0: all).
    """

    bids_dir: Path | None = None
    labels_dir: Path | None = None
    output_dir: Path | None = None
    work_dir: Path | None = None
    participant_labels: tuple[str, ...] = ()
    val_participants: tuple[str, ...] = ()
    val_fraction: float = 0.1
    labels: str = "synthseg32"
    labels_desc: str | None = None
    atlas: Path | None = None
    registration: str = "syn"
    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0)
    normalization: Mapping[str, Any] = field(
        default_factory=lambda: {"method": "percentile", "lower": 0.5, "upper": 99.5}
    )
    synth_label_maps: Path | None = None
    split_midline_maps: tuple[str, ...] = ()
    synthetic_csf_to_background: bool = True
    max_synth_label_maps: int = 0

    def __post_init__(self) -> None:
        if self.max_synth_label_maps < 0:
            raise ValueError(f"max_synth_label_maps must be >= 0, got {self.max_synth_label_maps}")
        if self.registration not in REGISTRATION_MODES:
            raise ValueError(
                f"registration must be one of {REGISTRATION_MODES}, got {self.registration!r}"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if len(self.voxel_size) != 3 or min(self.voxel_size) <= 0:
            raise ValueError(f"voxel_size needs 3 positive values (mm), got {self.voxel_size}")


@dataclass(frozen=True)
class TrainConfig:
    """A whole training recipe (see the module docstring for its TOML form)."""

    data: DataSettings
    model: ModelConfig
    diffusion: DiffusionConfig
    training: LoopSettings
    name: str = "cadiff"
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    refiner: RefinerRecipe | None = None

    def to_dict(self) -> dict[str, Any]:
        """TOML-able form (``None`` dropped, paths as strings, tuples as lists)."""

        def plain(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, (tuple, list)):
                return [plain(v) for v in value]
            if isinstance(value, Mapping):
                return {k: plain(v) for k, v in value.items() if v is not None}
            return value

        data = {f.name: plain(getattr(self.data, f.name)) for f in dataclasses.fields(self.data)}
        model = self.model.to_dict()
        model.pop("num_classes")
        out = {
            "name": self.name,
            "data": {k: v for k, v in data.items() if v is not None},
            "model": plain(model),
            "diffusion": self.diffusion.to_dict(),
            "training": {k: v for k, v in plain(self.training.to_dict()).items() if v is not None},
            "sampling": self.sampling.to_dict(),
        }
        if self.refiner is not None:
            out["refiner"] = self.refiner.to_dict()
        return out

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())

    @classmethod
    def from_dict(cls, recipe: Mapping[str, Any], *, num_classes: int = 33) -> "TrainConfig":
        """Build from a (merged) recipe mapping; unknown keys are an error naming the table.

        ``training.patch_size`` and ``training.batch_size`` default to the paper's values for
        ``model.spatial_dims``; ``training.spatial_dims`` always follows the model.
        """
        unknown = set(recipe) - {"name", "data", "model", "diffusion", "training", "sampling",
                                 "refiner"}
        if unknown:
            raise UsageError(
                f"unknown recipe tables/keys {sorted(unknown)}; use name, [data], [model], "
                "[diffusion], [training], [sampling] and [refiner]"
            )
        refiner = RefinerRecipe.from_dict(recipe["refiner"]) if "refiner" in recipe else None
        data = dict(recipe.get("data") or {})
        _check_keys("data", data, DataSettings)
        for key in ("bids_dir", "labels_dir", "output_dir", "work_dir", "atlas", "synth_label_maps"):
            if data.get(key) is not None:
                data[key] = Path(data[key])
        for key in ("participant_labels", "val_participants", "split_midline_maps"):
            if key in data:
                data[key] = tuple(str(v) for v in data[key])
        if "voxel_size" in data:
            vs = data["voxel_size"]
            vs = [vs] if isinstance(vs, (int, float)) else list(vs)
            data["voxel_size"] = tuple(float(v) for v in (vs * 3 if len(vs) == 1 else vs))
        model = dict(recipe.get("model") or {})
        _check_keys("model", model, ModelConfig)
        model["num_classes"] = num_classes
        diffusion = dict(recipe.get("diffusion") or {})
        _check_keys("diffusion", diffusion, DiffusionConfig)
        training = dict(recipe.get("training") or {})
        _check_keys("training", training, LoopSettings)
        sampling = dict(recipe.get("sampling") or {})
        _check_keys("sampling", sampling, SamplingSettings)
        try:
            model_config = ModelConfig.from_dict(model)
            dims = model_config.spatial_dims
            training["spatial_dims"] = dims
            patch = training.get("patch_size", DEFAULT_PATCH[dims])
            patch = [patch] if isinstance(patch, int) else list(patch)
            training["patch_size"] = tuple(int(p) for p in (patch * dims if len(patch) == 1 else patch))
            training.setdefault("batch_size", DEFAULT_BATCH[dims])
            return cls(
                data=DataSettings(**data),
                model=model_config,
                diffusion=DiffusionConfig.from_dict(diffusion),
                training=LoopSettings(**training),
                name=str(recipe.get("name", "cadiff")),
                sampling=SamplingSettings(**sampling),
                refiner=refiner,
            )
        except (TypeError, ValueError) as exc:
            raise UsageError(f"invalid training recipe: {exc}") from None


def _check_keys(table: str, values: Mapping[str, Any], cls: type) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise UsageError(
            f"unknown keys in [{table}]: {sorted(unknown)}; known: {sorted(known)}"
        )


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe TOML file as a mapping (validated when the config is built)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: file not found (see configs/*.toml)") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--config {path}: not valid TOML ({exc})") from None


def merge_recipes(*recipes: Mapping[str, Any]) -> dict[str, Any]:
    """Later recipes override earlier ones, key by key inside each table."""
    out: dict[str, Any] = {}
    for recipe in recipes:
        for key, value in recipe.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = {**out[key], **value}
            elif isinstance(value, Mapping):
                out[key] = dict(value)
            else:
                out[key] = value
    return out


# --------------------------------------------------------------------------- labels and pairs


def resolve_labels(spec: str, labels_dir: Path | None) -> tuple[LabelTable, dict[int, int]]:
    """The label table and value merge a recipe's ``labels`` names.

    Raises:
        UsageError: an unknown name or an unreadable TSV (the message says which).
    """
    if spec.lower() == "synthseg32":
        return SYNTHSEG32, dict(ASEG_MERGE)
    if spec.lower() == "dseg":
        if labels_dir is None or not (Path(labels_dir) / "dseg.tsv").is_file():
            raise UsageError(
                f"--labels dseg reads LABELS_DIR/dseg.tsv, which does not exist in {labels_dir}; "
                "add it (index, name columns) or pass --labels synthseg32 or a TSV path"
            )
        return read_label_table_tsv(Path(labels_dir) / "dseg.tsv"), {}
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UsageError(
            f"--labels {spec!r} is neither 'synthseg32', 'dseg' nor an existing TSV file"
        )
    return read_label_table_tsv(path), {}


@dataclass(frozen=True)
class TrainingPair:
    """A T1w and its label map (and brain mask, if the labels dataset has one).
    ``entities``: the T1w's (``subject``, ``session``, ...)."""

    t1w: Path
    dseg: Path
    entities: Mapping[str, str]
    mask: Path | None = None

    @property
    def subject(self) -> str:
        return self.entities["subject"]

    @property
    def name(self) -> str:
        return self.t1w.name.split(".")[0]


def find_training_pairs(
    bids_dir: Path,
    labels_dir: Path,
    *,
    participant_labels: Sequence[str] = (),
    labels_desc: str | None = None,
) -> list[TrainingPair]:
    """Pair each selected T1w with the one ``*_dseg`` of the same entities.

    T1w images without a label map are left out (logged); several label maps for one T1w are
    an error unless ``labels_desc`` picks one. A ``*_desc-brain_mask.nii[.gz]`` with the same
    entities (sMRIPrep's name) is the brain mask of the skull-stripped training input.

    Raises:
        UsageError: no pair at all, or ambiguous label maps.
    """
    from bids_cadiff.bidsio.query import find_t1w
    from bids_cadiff.evaluation.matching import parse_bids_name

    records = find_t1w(bids_dir, participant_labels=participant_labels)
    by_key: dict[tuple[tuple[str, str], ...], list[Path]] = {}
    masks: dict[tuple[tuple[str, str], ...], Path] = {}
    for path in sorted(Path(labels_dir).rglob("*_desc-brain_mask.nii*")):
        parsed = parse_bids_name(path)
        if parsed is not None and not any(p.startswith(".") for p in path.relative_to(labels_dir).parts):
            masks[parsed.key()] = path
    for path in sorted(Path(labels_dir).rglob("*_dseg.nii*")):
        rel = path.relative_to(labels_dir).parts
        if any(p.startswith(".") for p in rel):
            continue
        parsed = parse_bids_name(path)
        if parsed is None or parsed.suffix != "dseg":
            continue
        if labels_desc is not None and parsed.entities.get("desc") != labels_desc:
            continue
        by_key.setdefault(parsed.key(), []).append(path)
    pairs, missing = [], []
    for record in records:
        parsed = parse_bids_name(record.path)
        found = by_key.get(parsed.key(), []) if parsed is not None else []
        if not found:
            missing.append(record.path.name)
            continue
        if len(found) > 1:
            raise UsageError(
                f"{record.path.name} has {len(found)} label maps in {labels_dir} "
                f"({', '.join(p.name for p in found)}); choose one with --labels-desc"
            )
        mask = masks.get(parsed.key()) if parsed is not None else None
        pairs.append(TrainingPair(record.path, found[0], dict(record.entities), mask))
    if missing:
        logger.warning("%d T1w image(s) without a label map, left out: %s", len(missing),
                       ", ".join(missing))
    if not pairs:
        raise UsageError(
            f"no T1w of {bids_dir} has a label map in {labels_dir}: label maps must be named "
            "like sub-<label>[_ses-<label>]..._dseg.nii.gz with the T1w's entities"
        )
    return pairs


def split_participants(
    subjects: Sequence[str], *, val_participants: Sequence[str], val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Training and validation subjects (by subject, never splitting one subject's images).

    Returns:
        ``(train, val)``, sorted; ``val`` empty when neither a list nor a fraction is given.

    Raises:
        UsageError: an unknown validation subject, or no training subject left.
    """
    subjects = sorted(set(subjects))
    if val_participants:
        wanted = [v[4:] if v.startswith("sub-") else v for v in val_participants]
        unknown = sorted(set(wanted) - set(subjects))
        if unknown:
            raise UsageError(
                f"--val-participants {', '.join(unknown)} not among the labelled subjects "
                f"({', '.join(subjects)})"
            )
        val = sorted(set(wanted))
    elif val_fraction > 0 and len(subjects) >= 2:
        count = min(max(1, round(val_fraction * len(subjects))), len(subjects) - 1)
        order = np.random.default_rng(seed).permutation(len(subjects))
        val = sorted(subjects[i] for i in order[:count])
    else:
        val = []
    train = [s for s in subjects if s not in val]
    if not train:
        raise UsageError("every labelled subject is held out for validation; keep some for training")
    return train, val


def _label_prior(items: Sequence["TrainingItem"], model: ModelConfig) -> np.ndarray:
    """The distance-field label prior of the training images (``label_prior_bins`` cells)."""
    from bids_cadiff.models.prior import build_label_prior

    if not items:
        raise UsageError("a label prior needs training images, and none were found")
    start = time.perf_counter()
    probs = build_label_prior(
        ((it.distance, it.labels) for it in items), model.num_classes, model.label_prior_bins
    )
    logger.info("label prior from %d training image(s), %d³ cells, in %.1f s",
                len(items), model.label_prior_bins, time.perf_counter() - start)
    return probs


def _prepare_settings(config: TrainConfig, atlas: Any) -> Any:
    """The :class:`~bids_cadiff.training.prepare.PrepareSettings` of a recipe."""
    from bids_cadiff.training.prepare import PrepareSettings

    return PrepareSettings(
        atlas=atlas, voxel_size=config.data.voxel_size,
        normalization=dict(config.data.normalization), registration=config.data.registration,
    )


def prepare_items(
    pairs: Sequence[TrainingPair],
    *,
    config: TrainConfig,
    table: LabelTable,
    merge: Mapping[int, int],
    atlas: Any,
    work_dir: Path,
    rank: int = 0,
    world_size: int = 1,
) -> list[Any]:
    """Prepared :class:`~bids_cadiff.training.data.TrainingItem` for each pair (cached on disk).

    Under DDP each rank prepares every ``world_size``-th image first (so the expensive
    registrations are shared out); the caller then waits for all ranks and calls this again,
    which reads every image from the cache. Separate runs that share ``work_dir`` share out
    the preparing too (:func:`~bids_cadiff.training.prepare.prepare_in_turn`).
    """
    from bids_cadiff.app.participant import prepare_image
    from bids_cadiff.training.data import TrainingItem
    from bids_cadiff.training.prepare import (
        labels_to_index,
        prepare_in_turn,
        prepare_training_image,
    )

    settings = _prepare_settings(config, atlas)
    mine = [p for i, p in enumerate(pairs) if i % world_size == rank]

    def prepare_one(pair: TrainingPair, wait: bool) -> Any:
        return prepare_training_image(
            pair.t1w, pair.dseg, settings=settings, work_dir=work_dir, prepare_fn=prepare_image,
            mask_path=pair.mask, wait=wait,
        )

    items = []
    prepared_all = prepare_in_turn(mine, prepare_one, desc="preparing", unit="image",
                                   progress=rank == 0)
    for pair, prepared in zip(mine, prepared_all):
        assert prepared.label_values is not None
        labels = labels_to_index(prepared.label_values, table, merge, prepared.affine)
        if not labels.any():
            raise InputError(
                pair.dseg, "holds none of the label table's structures on the model grid; check "
                "--labels (and that the label map belongs to this T1w)"
            )
        items.append(TrainingItem(
            pair.name, prepared.image, prepared.distance, labels, prepared.affine,
            values=prepared.label_values, mask=prepared.mask, image_brain=prepared.image_brain,
        ))
    return items


def find_label_maps(folder: Path, limit: int = 0) -> list[Path]:
    """The label maps of ``data.synth_label_maps`` (sorted by name; the first ``limit``).

    Raises:
        UsageError: the folder holds no label map.
    """
    maps = sorted(
        p for p in Path(folder).iterdir()
        if p.is_file() and p.name.endswith((".nii", ".nii.gz", ".mgz")) and not p.name.startswith(".")
    )
    if not maps:
        raise UsageError(
            f"synth_label_maps {folder} holds no label map (*.nii, *.nii.gz or *.mgz with "
            "FreeSurfer values)"
        )
    return maps[:limit] if limit else maps


def prepare_label_map_items(
    maps: Sequence[Path],
    *,
    config: TrainConfig,
    table: LabelTable,
    merge: Mapping[int, int],
    atlas: Any,
    work_dir: Path,
    rank: int = 0,
    world_size: int = 1,
) -> list[Any]:
    """:class:`~bids_cadiff.training.data.TrainingItem` (``real=False``) of label maps without
    images (cached on disk as :func:`prepare_items`; shared out the same way)."""
    from fnmatch import fnmatch

    from bids_cadiff.app.participant import prepare_image
    from bids_cadiff.training.data import TrainingItem
    from bids_cadiff.training.prepare import labels_to_index, prepare_in_turn, prepare_label_map
    from bids_cadiff.training.synth import CSF_VALUE

    data = config.data
    settings = _prepare_settings(config, atlas)
    csf = table.value_to_index(np.array([CSF_VALUE]))[0] if CSF_VALUE in table.values else 0
    mine = [m for i, m in enumerate(maps) if i % world_size == rank]

    def prepare_one(path: Path, wait: bool) -> Any:
        split = any(fnmatch(path.name, pattern) for pattern in data.split_midline_maps)
        return prepare_label_map(path, settings=settings, work_dir=work_dir,
                                 prepare_fn=prepare_image, split_midline=split, wait=wait)

    items = []
    prepared_all = prepare_in_turn(mine, prepare_one, desc="preparing label maps", unit="map",
                                   progress=rank == 0)
    for path, prepared in zip(mine, prepared_all):
        assert prepared.label_values is not None
        labels = labels_to_index(prepared.label_values, table, merge, prepared.affine)
        if data.synthetic_csf_to_background and csf:
            labels[labels == csf] = 0
        if not labels.any():
            raise InputError(path, "holds none of the label table's structures; check --labels")
        name = path.name.split(".")[0]
        items.append(TrainingItem(
            f"map-{name}", prepared.image, prepared.distance, labels, prepared.affine,
            values=prepared.label_values, mask=prepared.mask, real=False,
        ))
    return items


def _log_unknown_values(labels_dir: Path, table: LabelTable, merge: Mapping[int, int]) -> None:
    tsv = Path(labels_dir) / "dseg.tsv"
    if not tsv.is_file():
        logger.info("%s has no dseg.tsv; label values are taken as the label table says", labels_dir)
        return
    try:
        listed = read_label_table_tsv(tsv)
    except UsageError as exc:
        logger.warning("cannot read %s (%s)", tsv, exc)
        return
    known = set(table.values) | set(merge)
    dropped = [f"{e.value} {e.name}" for e in listed.entries if e.value not in known]
    if dropped:
        logger.info("values of %s outside the label table become background: %s", tsv,
                    ", ".join(dropped))


# --------------------------------------------------------------------------- run


def run_training(
    config: TrainConfig,
    *,
    resume: str | Path | None = None,
    progress: bool = True,
    distributed: Any = None,
) -> TrainResult:
    """Train a model as ``config`` says (see :func:`bids_cadiff.training.loop.train`).

    Args:
        config: the resolved recipe; ``data.bids_dir``, ``labels_dir``, ``output_dir`` are needed.
        resume: a checkpoint, ``"auto"`` (the latest in ``OUTPUT_DIR/checkpoints``; a fresh
            start if there is none) or ``None``.
        progress: tqdm bars on rank 0.
        distributed: a :class:`~bids_cadiff.training.ddp.DistributedContext`; default: from
            torchrun's environment (a single process without it).

    Returns:
        the loop's result (final checkpoint at ``OUTPUT_DIR/model.pt``).
    """
    clock_start = time.perf_counter()  # --time-limit counts from here: preparation is inside it
    import torch

    from bids_cadiff.inference.checkpoint import ModelMetadata
    from bids_cadiff.models.diffusion import CADiff
    from bids_cadiff.registration.atlas import resolve_atlas
    from bids_cadiff.training.ddp import barrier, init_distributed, shutdown_distributed
    from bids_cadiff.training.loop import train

    data = config.data
    if data.bids_dir is None or data.labels_dir is None or data.output_dir is None:
        raise UsageError("training needs BIDS_DIR, LABELS_DIR and OUTPUT_DIR")
    output_dir = Path(data.output_dir)
    work_dir = Path(data.work_dir) if data.work_dir is not None else output_dir / "work"
    table, merge = resolve_labels(data.labels, data.labels_dir)
    if table.num_classes != config.model.num_classes:
        config = dataclasses.replace(
            config, model=dataclasses.replace(config.model, num_classes=table.num_classes)
        )
    atlas = resolve_atlas(data.atlas)
    own_context = distributed is None
    ctx = distributed or init_distributed("auto")
    try:
        if isinstance(resume, str) and resume == "auto":
            resume = latest_checkpoint(output_dir)
            if resume is None:
                logger.info("no checkpoint in %s: starting a new run", output_dir / "checkpoints")
        pairs = find_training_pairs(
            data.bids_dir, data.labels_dir, participant_labels=data.participant_labels,
            labels_desc=data.labels_desc,
        )
        train_subjects, val_subjects = split_participants(
            [p.subject for p in pairs], val_participants=data.val_participants,
            val_fraction=data.val_fraction, seed=config.training.seed,
        )
        logger.info("%d image(s) of %d subject(s) for training, %d subject(s) for validation%s",
                    sum(p.subject in train_subjects for p in pairs), len(train_subjects),
                    len(val_subjects), f" ({', '.join(val_subjects)})" if val_subjects else "")
        if ctx.is_main:
            _log_unknown_values(data.labels_dir, table, merge)
            output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(output_dir / CONFIG_NAME, config.to_toml())
        maps = (find_label_maps(data.synth_label_maps, data.max_synth_label_maps)
                if data.synth_label_maps is not None else [])
        if ctx.distributed:  # share out the registrations, then everyone reads the cache
            prepare_items(pairs, config=config, table=table, merge=merge, atlas=atlas,
                          work_dir=work_dir, rank=ctx.rank, world_size=ctx.world_size)
            prepare_label_map_items(maps, config=config, table=table, merge=merge, atlas=atlas,
                                    work_dir=work_dir, rank=ctx.rank, world_size=ctx.world_size)
            barrier(ctx)
        items = prepare_items(pairs, config=config, table=table, merge=merge, atlas=atlas,
                              work_dir=work_dir)
        by_pair = dict(zip([p.name for p in pairs], pairs))
        train_items = [it for it in items if by_pair[it.name].subject in train_subjects]
        val_items = [it for it in items if by_pair[it.name].subject in val_subjects]
        if maps:
            train_items += prepare_label_map_items(
                maps, config=config, table=table, merge=merge, atlas=atlas, work_dir=work_dir)
            logger.info("%d label map(s) without images added for synthesis", len(maps))
            if config.sampling.mode != "mixed":
                logger.warning("sampling mode %r trains on real images only; the label maps "
                               "enter only the label prior (use sampling.mode = \"mixed\")",
                               config.sampling.mode)
        torch.manual_seed(config.training.seed)
        model = CADiff(config.model, config.diffusion)
        if config.model.label_prior_bins:
            model.set_label_prior(torch.as_tensor(_label_prior(train_items, config.model)))
        metadata = ModelMetadata(
            name=config.name,
            labels=table,
            normalization=dict(data.normalization),
            voxel_size=tuple(float(v) for v in data.voxel_size),
            patch_size=tuple(int(p) for p in config.training.patch_size),
            atlas={"name": atlas.name, "source": atlas.description},
            inputs={"registration": data.registration,
                    "slice_axis": int(config.training.slice_axis)},
            training={
                "recipe": config.to_dict(),
                "train_images": [it.name for it in train_items],
                "val_images": [it.name for it in val_items],
                "world_size": ctx.world_size,
                "device": str(ctx.device),
                "host": platform.node(),
                "torch": torch.__version__,
                "bids_cadiff": __version__,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )
        result = train(
            model, train_items, settings=config.training, metadata=metadata,
            output_dir=output_dir, ctx=ctx, val_items=val_items, resume=resume, progress=progress,
            sampling=config.sampling, clock_start=clock_start,
        )
        if config.refiner is not None and not result.stopped_early and ctx.is_main:
            assert result.checkpoint is not None
            limit = config.training.time_limit
            stop = run_refiner_stage(
                config.refiner, model_voxel_size=data.voxel_size, table=table, merge=merge,
                pairs=[p for p in pairs if p.subject in train_subjects], label_maps=maps,
                split_midline_maps=data.split_midline_maps,
                csf_to_background=data.synthetic_csf_to_background, output_dir=output_dir,
                checkpoint=result.checkpoint, progress=progress,
                time_left=(limit - (time.perf_counter() - clock_start)) if limit else None,
            )
            if stop is not None:  # the exit status then says so (a signal: 128 + its number)
                result = dataclasses.replace(result, stopped_early=True, signal=stop.signal)
        return result
    finally:
        if own_context:
            shutdown_distributed(ctx)
