"""The checkpoint format: everything needed to rebuild and use a CA-Diff model, in one file.

A checkpoint is a ``torch.save`` of a dict of plain values and tensors, read back with
``torch.load(weights_only=True)`` so that loading never executes code from the file:

=====================  ====================================================================
``format``             ``"bids_cadiff-checkpoint"``; ``format_version``: 1
``model_config``       :class:`~bids_cadiff.models.config.ModelConfig` as a dict
``diffusion_config``   :class:`~bids_cadiff.models.config.DiffusionConfig` as a dict
``labels``             the label table, channel order (value, name, abbreviation, color, ...)
``normalization``      how intensities were normalised for training (see ``imaging``)
``voxel_size``         mm, the grid the model was trained at (images are resampled to it)
``patch_size``         voxels, the sliding-window size
``atlas``              the atlas its distance field came from (name, source)
``inputs``             how its inputs were made: ``registration`` (``"syn"``, ``"affine"`` or
                       ``"none"``) and ``slice_axis`` (2D models; RAS axis). Optional:
                       checkpoints written before it existed were all made with SyN and
                       axial slices, which :data:`DEFAULT_INPUTS` says
``training``           provenance: data, iterations, hours, hardware, command, ...
``name``, ``package_version``   model name and the bids_cadiff version that wrote it
``dtype``              ``"float32"`` or ``"float16"`` (compact storage; loaded as float32)
``state_dict``         the network weights
``refiner``            optional: the 1 mm refiner (:mod:`bids_cadiff.models.refiner`), its
                       ``config``, ``simulation``, ``training`` and ``subjects``;
                       ``refiner_state_dict`` its weights (:func:`store_refiner`)
``sha256``             content hash over everything above (weights included)
=====================  ====================================================================
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from bids_cadiff import __version__
from bids_cadiff.errors import CheckpointError
from bids_cadiff.io.atomic import atomic_path
from bids_cadiff.labels import LabelTable
from bids_cadiff.models.config import DiffusionConfig, ModelConfig
from bids_cadiff.models.diffusion import CADiff
from bids_cadiff.models.refiner import Refiner, RefinerConfig

FORMAT = "bids_cadiff-checkpoint"
FORMAT_VERSION = 1
#: Registration modes a model's distance field can have been made with.
REGISTRATION_MODES: tuple[str, ...] = ("syn", "affine", "none")
#: ``inputs`` of checkpoints written before the key existed (all SyN, axial slices).
DEFAULT_INPUTS: Mapping[str, Any] = {"registration": "syn", "slice_axis": 2}


def check_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The ``inputs`` entry, complete and checked.

    Raises:
        ValueError: an unknown registration mode or slice axis, or an unknown key.
    """
    unknown = sorted(set(inputs) - set(DEFAULT_INPUTS))
    if unknown:
        raise ValueError(f"unknown inputs {unknown} (known: {sorted(DEFAULT_INPUTS)})")
    out = {**DEFAULT_INPUTS, **inputs}
    if out["registration"] not in REGISTRATION_MODES:
        raise ValueError(
            f"inputs.registration must be one of {REGISTRATION_MODES}, got {out['registration']!r}"
        )
    if out["slice_axis"] not in (0, 1, 2):
        raise ValueError(f"inputs.slice_axis must be 0, 1 or 2, got {out['slice_axis']!r}")
    return out

_REQUIRED = (
    "format",
    "format_version",
    "name",
    "model_config",
    "diffusion_config",
    "labels",
    "normalization",
    "voxel_size",
    "patch_size",
    "atlas",
    "training",
    "package_version",
    "dtype",
    "state_dict",
    "sha256",
)


@dataclass(frozen=True)
class ModelMetadata:
    """What a checkpoint says about its model, besides the weights.

    Attributes:
        name: model name, e.g. ``"cadiff-default"``.
        labels: the label table in channel order.
        normalization: intensity normalisation parameters (``{"method": "percentile", ...}``).
        voxel_size: mm per axis the model works at.
        patch_size: sliding-window size in voxels.
        atlas: ``{"name": ..., "source": ...}`` of the distance field's atlas.
        training: free-form provenance (JSON-able).
        inputs: how the model's inputs were made (:data:`DEFAULT_INPUTS`): the app makes
            them the same way.
        calibration: ``{"temperature": T, "chosen_on": how}``: the app's final probabilities
            are ∝ p^(1/T) (argmax unchanged; confidences, soft volumes and probability maps
            calibrated). Empty: T = 1.
        package_version: bids_cadiff version that wrote the file.
        sha256: content hash (filled in by :func:`save_checkpoint` / :func:`load_checkpoint`).
    """

    name: str
    labels: LabelTable
    normalization: Mapping[str, Any]
    voxel_size: tuple[float, ...]
    patch_size: tuple[int, ...]
    atlas: Mapping[str, Any] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)
    inputs: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_INPUTS))
    calibration: Mapping[str, Any] = field(default_factory=dict)
    package_version: str = __version__
    sha256: str = ""

    def __post_init__(self) -> None:
        # complete and check ``inputs`` (defaults for missing keys; ValueError otherwise)
        object.__setattr__(self, "inputs", check_inputs(self.inputs))
        temperature = self.calibration.get("temperature", 1.0)
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"calibration temperature must be > 0, got {temperature!r}")

    @property
    def temperature(self) -> float:
        """The probability temperature of :attr:`calibration` (1: none)."""
        return float(self.calibration.get("temperature", 1.0))


@dataclass
class LoadedModel:
    """A model rebuilt from a checkpoint, in eval mode, float32 on the CPU."""

    model: CADiff
    metadata: ModelMetadata
    path: Path
    refiner: Refiner | None = None


def _content_hash(payload: Mapping[str, Any]) -> str:
    """sha256 over the canonical JSON of the metadata and the bytes of every tensor (the
    refiner's after the network's, only when there is one: older files keep their hashes)."""
    digest = hashlib.sha256()
    tensors = ("state_dict", "refiner_state_dict")
    meta = {k: v for k, v in payload.items() if k not in (*tensors, "sha256")}
    digest.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for name in tensors:
        if name not in payload:
            continue
        prefix = "" if name == "state_dict" else "refiner/"
        for key in sorted(payload[name]):
            tensor = payload[name][key].detach().cpu().contiguous()
            digest.update((prefix + key).encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_checkpoint(
    path: str | Path,
    model: CADiff,
    metadata: ModelMetadata,
    *,
    half: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Write a checkpoint atomically (temp file in the same folder, then rename).

    Args:
        path: destination file.
        model: the model to store.
        metadata: everything but the weights and configs.
        half: store floating-point weights as float16 (half the size).
        extra: additional plain values (e.g. a training-state reference); must be
            ``weights_only``-loadable.

    Returns:
        the content hash written into the file.
    """
    path = Path(path)
    dtype = torch.float16 if half else torch.float32
    state = {
        k: (v.detach().cpu().to(dtype) if v.is_floating_point() else v.detach().cpu()).clone()
        for k, v in model.state_dict().items()
    }
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": metadata.name,
        "model_config": model.model_config.to_dict(),
        "diffusion_config": model.diffusion_config.to_dict(),
        "labels": metadata.labels.to_list(),
        "normalization": dict(metadata.normalization),
        "voxel_size": [float(v) for v in metadata.voxel_size],
        "patch_size": [int(v) for v in metadata.patch_size],
        "atlas": dict(metadata.atlas),
        "inputs": dict(metadata.inputs),  # completed and checked by ModelMetadata
        "training": json.loads(json.dumps(dict(metadata.training), default=str)),
        "package_version": metadata.package_version,
        "dtype": "float16" if half else "float32",
        "state_dict": state,
    }
    if metadata.calibration:  # absent from uncalibrated files, whose hashes stay as they were
        payload["calibration"] = dict(metadata.calibration)
    if extra:
        payload["extra"] = dict(extra)
    payload["sha256"] = _content_hash(payload)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return str(payload["sha256"])


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and verify a checkpoint file without building the model.

    Raises:
        CheckpointError: missing, unreadable, truncated, not a bids_cadiff checkpoint,
            incomplete, or its content hash does not match.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file does not exist; pass --model a .pt file from cadiff-train")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            path,
            "is not a bids_cadiff checkpoint (not a PyTorch zip archive: truncated, corrupt or "
            "another kind of file); re-download or re-train it",
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise CheckpointError(
            path, f"cannot be read safely ({type(exc).__name__}: {exc}); it is corrupt, "
            "truncated or holds code, and is not loaded"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(path, f"is not a bids_cadiff checkpoint (no format={FORMAT!r})")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            path,
            f"has format version {payload.get('format_version')!r}; this bids_cadiff "
            f"({__version__}) reads version {FORMAT_VERSION}: use a matching bids_cadiff",
        )
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(path, f"is incomplete, missing {missing}")
    actual = _content_hash(payload)
    if actual != payload["sha256"]:
        raise CheckpointError(
            path,
            f"content hash mismatch (file says {payload['sha256'][:12]}…, content is "
            f"{actual[:12]}…): the file is corrupt or was modified",
        )
    return payload


def load_checkpoint(path: str | Path) -> LoadedModel:
    """Rebuild the model a checkpoint describes, verified by its content hash.

    Returns:
        the model in eval mode (float32, CPU) and its metadata.

    Raises:
        CheckpointError: see :func:`read_checkpoint`; also when the configs are invalid or the
            weights do not fit the network the configs describe.
    """
    path = Path(path)
    payload = read_checkpoint(path)
    try:
        model_config = ModelConfig.from_dict(payload["model_config"])
        diffusion_config = DiffusionConfig.from_dict(payload["diffusion_config"])
        labels = LabelTable.from_list(payload["labels"])
        inputs = check_inputs(payload.get("inputs", DEFAULT_INPUTS))
        calibration = dict(payload.get("calibration", {}))
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(path, f"has an invalid configuration: {exc}") from exc
    if labels.num_classes != model_config.num_classes:
        raise CheckpointError(
            path,
            f"label table has {labels.num_classes} entries but the network "
            f"{model_config.num_classes} classes",
        )
    model = CADiff(model_config, diffusion_config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            path, f"weights do not match the network its config describes: {exc}"
        ) from exc
    model.eval()
    refiner = _load_refiner(path, payload, labels) if "refiner" in payload else None
    metadata = ModelMetadata(
        name=str(payload["name"]),
        labels=labels,
        normalization=payload["normalization"],
        voxel_size=tuple(float(v) for v in payload["voxel_size"]),
        patch_size=tuple(int(v) for v in payload["patch_size"]),
        atlas=payload["atlas"],
        training=payload["training"],
        inputs=inputs,
        calibration=calibration,
        package_version=str(payload["package_version"]),
        sha256=str(payload["sha256"]),
    )
    return LoadedModel(model=model, metadata=metadata, path=path, refiner=refiner)


def _load_refiner(path: Path, payload: Mapping[str, Any], labels: LabelTable) -> Refiner:
    """The refiner a checkpoint holds (:func:`store_refiner`), eval mode."""
    try:
        config = RefinerConfig.from_dict(payload["refiner"]["config"])
        refiner = Refiner(config)
        refiner.load_state_dict({k: v.float() for k, v in payload["refiner_state_dict"].items()})
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(path, f"has an unusable refiner: {exc}") from exc
    if config.num_classes != labels.num_classes:
        raise CheckpointError(
            path, f"its refiner has {config.num_classes} classes, the model {labels.num_classes}"
        )
    return refiner.eval()


def store_refiner(
    source: str | Path, destination: str | Path, refiner: Refiner, about: Mapping[str, Any]
) -> str:
    """Copy a checkpoint with a 1 mm refiner added (or replaced); the model's weights and
    metadata are unchanged, the content hash is recomputed. Returns the new hash.

    Args:
        source, destination: checkpoint files (may be the same).
        refiner: the trained refiner.
        about: its provenance (``simulation``, ``training``, ``subjects``, ``iteration``, ...;
            plain values).

    Raises:
        CheckpointError: ``source`` is not a valid checkpoint.
        ValueError: the refiner's classes are not the model's.
    """
    payload = read_checkpoint(source)
    if refiner.config.num_classes != len(payload["labels"]):
        raise ValueError(
            f"the refiner has {refiner.config.num_classes} classes, the model "
            f"{len(payload['labels'])}"
        )
    info = json.loads(json.dumps({k: v for k, v in about.items() if k != "config"}, default=str))
    payload["refiner"] = {**info, "config": refiner.config.to_dict()}
    payload["refiner_state_dict"] = {
        k: v.detach().cpu().float().clone() for k, v in refiner.state_dict().items()
    }
    payload["sha256"] = _content_hash(payload)
    with atomic_path(Path(destination)) as tmp:
        torch.save(payload, tmp)
    return str(payload["sha256"])


def store_calibration(
    source: str | Path, destination: str | Path, calibration: Mapping[str, Any]
) -> str:
    """Copy a checkpoint with its ``calibration`` set (weights and everything else unchanged;
    the content hash is recomputed). Returns the new hash.

    Raises:
        CheckpointError: ``source`` is not a valid checkpoint.
        ValueError: a temperature that is not > 0.
    """
    payload = read_checkpoint(source)
    temperature = calibration.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"calibration temperature must be > 0, got {temperature!r}")
    payload["calibration"] = json.loads(json.dumps(dict(calibration)))
    payload["sha256"] = _content_hash(payload)
    with atomic_path(Path(destination)) as tmp:
        torch.save(payload, tmp)
    return str(payload["sha256"])
