"""Training images on the model grid: preprocessed T1w, registered distance field, labels; cached.

Each labelled image is prepared once and kept in ``WORK_DIR/prepared/<key>.npz``, ``key`` being a
sha256 over the T1w file's bytes, the label map file's bytes, the voxel size, the intensity
normalisation, the atlas (its files' sha256) and the registration mode. The file is written
atomically (temporary file, then rename), so concurrent or interrupted runs never leave a
half-written cache entry; a changed input, setting or atlas gives a new key.

Runs that share a work dir (cross-validation folds side by side, jobs of an array on a
cluster) share out the preparing: an entry being prepared is locked (``<key>.lock``, an
advisory ``flock`` that dies with its process), and :func:`prepare_in_turn` first takes the
entries no other process is preparing, then waits for the others and reads them from the cache.
Where the file system has no locks, every run prepares what it lacks (correct, only slower).

The image and distance field are those the participant pipeline computes at inference
(:func:`bids_cadiff.app.participant.prepare_image`: RAS → resample to the voxel size → N4 →
percentile normalisation → atlas registration → warped distance field). The app passes that
function in as ``prepare_fn`` so that training and inference share one code path;
:func:`default_prepare` does the same steps for callers without the app.

The label map is read with its own affine (any orientation) and resampled onto the model grid by
world coordinates with nearest neighbour (label values are copied, never blended;
:func:`bids_cadiff.io.nifti.load_label_map`) and stored as *values*; the mapping to
model channels (:meth:`~bids_cadiff.labels.LabelTable.value_to_index` with a merge) is applied when
the training set is built (:func:`labels_to_index`), so one cache serves every label table.

``registration="none"`` skips ANTs: the atlas field is resampled onto the image grid by world
coordinates (an identity mapping). Fast, and only meaningful for images already in the atlas'
space, or for tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from bids_cadiff.imaging.preprocess import (
    n4_bias_correct,
    normalise_intensity,
    resample_to_reference,
    resample_to_spacing,
    to_ras,
)
from bids_cadiff.inference.checkpoint import REGISTRATION_MODES
from bids_cadiff.io.atomic import atomic_path
from bids_cadiff.io.hashing import file_sha256 as _file_sha256
from bids_cadiff.io.nifti import load_label_map, load_t1w
from bids_cadiff.labels import LabelTable
from bids_cadiff.registration.atlas import AtlasSpec, atlas_distance_field, file_sha256

logger = logging.getLogger(__name__)

__all__ = [
    "REGISTRATION_MODES",
    "EntryBusy",
    "PrepareSettings",
    "PreparedTrainingImage",
    "default_prepare",
    "file_digest",
    "brain_mask_from_labels",
    "labels_to_index",
    "prepare_in_turn",
    "prepare_label_map",
    "prepare_training_image",
    "skull_stripped_input",
    "split_by_hemisphere",
]

#: Bumped whenever preparation changes in a way that invalidates cached arrays.
CACHE_VERSION = "2"
# REGISTRATION_MODES (from the checkpoint format, which records the mode): ``syn``: affine +
# SyN (the app's default); ``affine``: affine only; ``none``: identity.

#: ``prepare_fn(t1, *, atlas, voxel_size, normalization, cache_dir, image_path)`` returning an
#: object with ``image (X, Y, Z)``, ``distance (3, X, Y, Z)`` and ``affine (4, 4)`` attributes.
PrepareFn = Callable[..., Any]


@dataclass(frozen=True)
class PrepareSettings:
    """What the prepared arrays depend on (all of it goes into the cache key).

    Attributes:
        atlas: the atlas of the distance field.
        voxel_size: model grid voxel size in mm (3 values).
        normalization: ``{"method": "percentile", "lower": 0.5, "upper": 99.5}``.
        registration: one of :data:`REGISTRATION_MODES`.
    """

    atlas: AtlasSpec
    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0)
    normalization: Mapping[str, Any] = field(
        default_factory=lambda: {"method": "percentile", "lower": 0.5, "upper": 99.5}
    )
    registration: str = "syn"

    def __post_init__(self) -> None:
        if self.registration not in REGISTRATION_MODES:
            raise ValueError(
                f"registration must be one of {REGISTRATION_MODES}, got {self.registration!r}"
            )
        if len(self.voxel_size) != 3 or any(v <= 0 for v in self.voxel_size):
            raise ValueError(f"voxel_size needs 3 positive values (mm), got {self.voxel_size}")


@dataclass
class PreparedTrainingImage:
    """One labelled image on the model grid.

    Attributes:
        image: ``(X, Y, Z)`` float32 normalised intensities in [0, 1].
        distance: ``(3, X, Y, Z)`` float32 distance field in [0, 1], 0 outside the brain.
        label_values: ``(X, Y, Z)`` int32 label *values* of the label map (not yet channels);
            ``None`` when prepared without a label map.
        affine: ``(4, 4)`` voxel-to-world matrix (RAS) of the model grid.
        key: the cache key.
        t1w_path: the source T1w.
        label_path: the source label map (or ``None``).
        mask: ``(X, Y, Z)`` bool brain mask (the given mask file, else the labelled voxels
            with holes filled); ``None`` without a label map.
        image_brain: ``(X, Y, Z)`` float32: the app's input for the skull-stripped image
            (the N4-corrected image × mask, normalised over the brain); ``None`` without a mask.
        real: ``False`` for a label map without an image (:func:`prepare_label_map`): ``image``
            is then only the stand-in the atlas was registered to, and training synthesises
            images from ``label_values``.
    """

    image: np.ndarray
    distance: np.ndarray
    label_values: np.ndarray | None
    affine: np.ndarray
    key: str
    t1w_path: Path
    label_path: Path | None = None
    mask: np.ndarray | None = None
    image_brain: np.ndarray | None = None
    real: bool = True


#: sha256 of a file's bytes, not cached (training inputs may change).
file_digest = _file_sha256


def _atlas_digest(atlas: AtlasSpec) -> dict[str, str]:
    out = {"name": atlas.name, "t1": file_sha256(Path(atlas.t1_path)), "mask": atlas.brain_mask_source}
    if atlas.brain_mask_path is not None:
        out["mask_file"] = file_sha256(Path(atlas.brain_mask_path))
    return out


def cache_key(
    t1w_path: Path | None,
    label_path: Path | None,
    settings: PrepareSettings,
    *,
    mask_path: Path | None = None,
    kind: str = "image",
) -> str:
    """The content hash naming a prepared image (``kind="image"``) or label map
    (``kind="label-map"``, no T1w) in the cache."""
    payload = {
        "version": CACHE_VERSION,
        "kind": kind,
        "t1w": file_digest(t1w_path) if t1w_path is not None else None,
        "labels": file_digest(label_path) if label_path is not None else None,
        "mask": file_digest(mask_path) if mask_path is not None else None,
        "voxel_size": [round(float(v), 6) for v in settings.voxel_size],
        "normalization": dict(settings.normalization),
        "atlas": _atlas_digest(settings.atlas),
        "registration": settings.registration,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _preprocess(t1: nib.Nifti1Image, settings: PrepareSettings) -> nib.Nifti1Image:
    """RAS → resample → N4, the participant pipeline's order; returns the model-grid image."""
    grid = resample_to_spacing(to_ras(t1), tuple(float(v) for v in settings.voxel_size), order=1)
    return n4_bias_correct(grid)


def _normalise(grid: nib.Nifti1Image, normalization: Mapping[str, Any]) -> np.ndarray:
    if normalization.get("method", "percentile") != "percentile":
        raise ValueError(f"unknown intensity normalisation {dict(normalization)!r}")
    return normalise_intensity(
        np.asanyarray(grid.dataobj).astype(np.float32),
        lower_percentile=float(normalization.get("lower", 0.5)),
        upper_percentile=float(normalization.get("upper", 99.5)),
    )


def identity_distance_field(atlas: AtlasSpec, grid: nib.Nifti1Image) -> np.ndarray:
    """The atlas field resampled onto ``grid`` by world coordinates (no registration).

    Returns:
        float32 ``(3, X, Y, Z)`` in [0, 1].
    """
    atlas_img, atlas_field = atlas_distance_field(atlas)
    out = resample_to_reference(
        np.asarray(atlas_field), atlas_img.affine, grid.shape[:3], grid.affine, order=1
    )
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def default_prepare(
    t1: nib.Nifti1Image,
    *,
    atlas: AtlasSpec,
    voxel_size: Sequence[float],
    normalization: Mapping[str, Any],
    cache_dir: Path | None,
    image_path: Path | None = None,
    registration: str = "syn",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Preprocess a T1w and bring the atlas field onto its model grid.

    Returns:
        ``(image (X, Y, Z) float32, distance (3, X, Y, Z) float32, affine (4, 4),
        corrected (X, Y, Z) float32)``; ``corrected``: the N4-corrected intensities before
        normalisation (the skull-stripped training input is derived from them).
    """
    from bids_cadiff.registration.ants import register_atlas, warp_distance_field

    settings = PrepareSettings(
        atlas=atlas, voxel_size=tuple(float(v) for v in voxel_size),  # type: ignore[arg-type]
        normalization=normalization, registration=registration,
    )
    grid = _preprocess(t1, settings)
    image = _normalise(grid, normalization)
    corrected = np.asanyarray(grid.dataobj).astype(np.float32)
    if registration == "none":
        return image, identity_distance_field(atlas, grid), np.asarray(grid.affine), corrected
    reg = register_atlas(
        grid, atlas, cache_dir=cache_dir, image_path=image_path,
        type_of_transform="SyN" if registration == "syn" else "Affine",
    )
    atlas_img, atlas_field = atlas_distance_field(atlas)
    distance = warp_distance_field(np.asarray(atlas_field), atlas_img, reg, grid)
    return image, distance, np.asarray(grid.affine), corrected


class EntryBusy(Exception):
    """Another process is preparing this cache entry (raised with ``wait=False``)."""


@contextlib.contextmanager
def _claimed(entry: Path, *, wait: bool) -> Iterator[None]:
    """Hold the exclusive lock of cache ``entry`` while preparing it.

    Raises :class:`EntryBusy` when another process holds it and ``wait`` is false; with
    ``wait`` it blocks until that process is done (or has died: the lock goes with it). On a
    file system without ``flock`` it does not lock.
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_suffix(".lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise EntryBusy(entry) from None
        except OSError as exc:  # e.g. Lustre mounted without -o flock
            logger.debug("%s: no lock (%s); preparing without one", entry, exc)
        yield  # the lock is released when the file closes


def _cached(
    entry: Path, key: str, t1w_path: Path, label_path: Path | None
) -> PreparedTrainingImage | None:
    return _load_npz(entry, key, t1w_path, label_path) if entry.is_file() else None


def _cached_or_made(
    entry: Path,
    key: str,
    t1w_path: Path,
    label_path: Path | None,
    *,
    wait: bool,
    make: Callable[[], PreparedTrainingImage],
) -> PreparedTrainingImage:
    """Cache ``entry``, or ``make()`` (which writes it) under the entry's lock; see
    :func:`_claimed` for ``wait``."""
    cached = _cached(entry, key, t1w_path, label_path)
    if cached is None:
        with _claimed(entry, wait=wait):
            cached = _cached(entry, key, t1w_path, label_path)  # made by another, while we waited
            if cached is None:
                return make()
    logger.debug("%s: prepared arrays from cache %s", t1w_path.name, key[:12])
    return cached


_Task = TypeVar("_Task")


def prepare_in_turn(
    tasks: Sequence[_Task],
    prepare_one: Callable[[_Task, bool], PreparedTrainingImage],
    *,
    desc: str,
    unit: str,
    progress: bool = True,
) -> list[PreparedTrainingImage]:
    """Prepare every task, sharing the work with other processes that use the same cache.

    Each task is first tried with ``prepare_one(task, False)``, which raises
    :class:`EntryBusy` when another process is preparing that entry; those are put off and
    taken at the end with ``prepare_one(task, True)``, which waits for the other process and
    then reads its result from the cache. Alone, this is plain preparation in order.

    Returns:
        the prepared items in the order of ``tasks``.
    """
    done: dict[int, PreparedTrainingImage] = {}
    put_off: list[int] = []
    with tqdm(total=len(tasks), desc=desc, unit=unit, disable=not progress) as bar:
        for i, task in enumerate(tasks):
            try:
                done[i] = prepare_one(task, False)
                bar.update()
            except EntryBusy:
                put_off.append(i)
        if put_off:
            logger.info("%d %s(s) being prepared by another process; waiting for them",
                        len(put_off), unit)
        for i in put_off:
            done[i] = prepare_one(tasks[i], True)
            bar.update()
    return [done[i] for i in range(len(tasks))]


def _save_npz(path: Path, prepared: PreparedTrainingImage) -> None:
    arrays: dict[str, np.ndarray] = {
        "image": prepared.image, "distance": prepared.distance, "affine": prepared.affine,
        "real": np.array(prepared.real),
    }
    for name in ("label_values", "mask", "image_brain"):
        value = getattr(prepared, name)
        if value is not None:
            arrays[name] = value
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def _load_npz(path: Path, key: str, t1w_path: Path, label_path: Path | None) -> PreparedTrainingImage | None:
    try:
        with np.load(path) as data:
            def optional(name: str) -> np.ndarray | None:
                return data[name] if name in data.files else None

            return PreparedTrainingImage(
                image=data["image"], distance=data["distance"],
                label_values=optional("label_values"), affine=data["affine"], key=key,
                t1w_path=t1w_path, label_path=label_path, mask=optional("mask"),
                image_brain=optional("image_brain"), real=bool(data["real"]),
            )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        logger.warning("ignoring unreadable cache entry %s (%s); recomputing", path, exc)
        return None


def brain_mask_from_labels(values: np.ndarray) -> np.ndarray:
    """The labelled voxels with holes filled (a brain mask where none is given)."""
    return ndimage.binary_fill_holes(values > 0)


def skull_stripped_input(
    corrected: np.ndarray, mask: np.ndarray, normalization: Mapping[str, Any]
) -> np.ndarray:
    """The app's input for the skull-stripped image: ``corrected × mask`` normalised over its
    nonzero voxels, exactly as the app normalises a skull-stripped T1w."""
    stripped = np.asarray(corrected, dtype=np.float32) * mask
    return normalise_intensity(
        stripped, lower_percentile=float(normalization.get("lower", 0.5)),
        upper_percentile=float(normalization.get("upper", 99.5)),
    ).astype(np.float32)


def prepare_training_image(
    t1w_path: str | Path,
    label_path: str | Path | None,
    *,
    settings: PrepareSettings,
    work_dir: str | Path,
    prepare_fn: PrepareFn | None = None,
    mask_path: str | Path | None = None,
    wait: bool = True,
) -> PreparedTrainingImage:
    """Prepare (or read from the cache) one T1w and its label map on the model grid.

    Args:
        t1w_path: the raw T1w.
        label_path: its label map (``*_dseg.nii[.gz]``), any grid; ``None``: image only.
        settings: voxel size, normalisation, atlas and registration mode.
        work_dir: cache root; arrays go to ``work_dir/prepared``, ANTs transforms to
            ``work_dir/registration``.
        prepare_fn: the app's ``prepare_image`` (see the module docstring); used unless
            ``settings.registration`` is ``"none"``. Default: :func:`default_prepare`.
        mask_path: a brain mask of the T1w (any grid; e.g. ``*_desc-brain_mask.nii.gz``):
            the skull-stripped training input is the image inside it. Default: the labelled
            voxels with holes filled.
        wait: when another process is preparing the same entry, wait for it and read its
            result (``True``) or raise :class:`EntryBusy` (``False``; :func:`prepare_in_turn`).

    Returns:
        the prepared arrays.

    Raises:
        InputError: an unreadable image or label map, or a failed registration.
        EntryBusy: with ``wait=False``, another process is preparing this entry.
    """
    t1w_path, work_dir = Path(t1w_path), Path(work_dir)
    label_path = Path(label_path) if label_path is not None else None
    mask_path = Path(mask_path) if mask_path is not None else None
    key = cache_key(t1w_path, label_path, settings, mask_path=mask_path)
    entry = work_dir / "prepared" / f"{key}.npz"
    return _cached_or_made(
        entry, key, t1w_path, label_path, wait=wait,
        make=lambda: _prepare_training_image(t1w_path, label_path, settings, work_dir,
                                             prepare_fn, mask_path, key, entry),
    )


def _prepare_training_image(
    t1w_path: Path,
    label_path: Path | None,
    settings: PrepareSettings,
    work_dir: Path,
    prepare_fn: PrepareFn | None,
    mask_path: Path | None,
    key: str,
    entry: Path,
) -> PreparedTrainingImage:
    logger.info("%s: preparing (registration: %s)", t1w_path.name, settings.registration)
    t1 = load_t1w(t1w_path)
    image, distance, affine, corrected = _prepare_t1(t1, t1w_path, settings, work_dir, prepare_fn)
    labels = mask = image_brain = None
    if label_path is not None:
        labels = load_label_map(label_path, ref_shape=image.shape, ref_affine=affine).values
        if mask_path is not None:
            mask = load_label_map(mask_path, ref_shape=image.shape, ref_affine=affine).values > 0
        else:
            mask = brain_mask_from_labels(labels)
        image_brain = skull_stripped_input(corrected, mask, settings.normalization)
    prepared = PreparedTrainingImage(
        image=np.ascontiguousarray(image, dtype=np.float32),
        distance=np.ascontiguousarray(distance, dtype=np.float32),
        label_values=labels, affine=np.asarray(affine, dtype=np.float64), key=key,
        t1w_path=t1w_path, label_path=label_path, mask=mask, image_brain=image_brain,
    )
    _save_npz(entry, prepared)
    return prepared


def _prepare_t1(
    t1: nib.Nifti1Image,
    image_path: Path,
    settings: PrepareSettings,
    work_dir: Path,
    prepare_fn: PrepareFn | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(image, distance, affine, corrected)`` on the model grid (``corrected``: the
    N4-corrected intensities before normalisation)."""
    cache_dir = work_dir / "registration"
    if prepare_fn is None or settings.registration != "syn":
        return default_prepare(
            t1, atlas=settings.atlas, voxel_size=settings.voxel_size,
            normalization=settings.normalization, cache_dir=cache_dir, image_path=image_path,
            registration=settings.registration,
        )
    result = prepare_fn(
        t1, atlas=settings.atlas, voxel_size=settings.voxel_size,
        normalization=settings.normalization, cache_dir=cache_dir, image_path=image_path,
    )
    corrected = result.corrected if result.corrected is not None else result.image
    return result.image, result.distance, np.asarray(result.affine), corrected


def prepare_label_map(
    label_path: str | Path,
    *,
    settings: PrepareSettings,
    work_dir: str | Path,
    prepare_fn: PrepareFn | None = None,
    split_midline: bool = False,
    wait: bool = True,
) -> PreparedTrainingImage:
    """Prepare (or read from the cache) a label map that has no image (SynthSeg manner).

    The atlas is registered to a noiseless T1w-like image of the map's brain
    (:func:`~bids_cadiff.training.synth.mean_t1_image`, extra-cerebral labels dropped: the
    field matters inside the brain), so the map gets a distance field as a real image would;
    training then synthesises images from the map's values.

    Args:
        label_path: the label map (FreeSurfer values, any grid).
        settings, work_dir, prepare_fn, wait: as :func:`prepare_training_image`.
        split_midline: the map carries left codes in both hemispheres (older SynthSeg maps):
            give the right side right codes (:func:`~bids_cadiff.labels.split_left_codes_at_midline`).

    Returns:
        the prepared map, ``real=False``, ``mask`` the brain labels.

    Raises:
        EntryBusy: with ``wait=False``, another process is preparing this entry.
    """
    label_path, work_dir = Path(label_path), Path(work_dir)
    key = cache_key(None, label_path, settings, kind=f"label-map split={split_midline}")
    entry = work_dir / "prepared" / f"{key}.npz"
    return _cached_or_made(
        entry, key, label_path, label_path, wait=wait,
        make=lambda: _prepare_label_map(label_path, settings, work_dir, prepare_fn,
                                        split_midline, key, entry),
    )


def _prepare_label_map(
    label_path: Path,
    settings: PrepareSettings,
    work_dir: Path,
    prepare_fn: PrepareFn | None,
    split_midline: bool,
    key: str,
    entry: Path,
) -> PreparedTrainingImage:
    from bids_cadiff.labels import split_left_codes_at_midline
    from bids_cadiff.training.synth import BRAIN_VALUES, mean_t1_image

    logger.info("%s: preparing a label map (registration: %s)", label_path.name, settings.registration)
    lab_img = to_ras(nib.load(label_path))
    raw = np.asarray(lab_img.dataobj).astype(np.int32)
    if split_midline:
        raw = split_left_codes_at_midline(raw, lab_img.affine)
    brain = np.isin(raw, sorted(BRAIN_VALUES))
    stand_in = nib.Nifti1Image(mean_t1_image(np.where(brain, raw, 0)) * 100.0, lab_img.affine)
    image, distance, affine, _ = _prepare_t1(stand_in, label_path, settings, work_dir, prepare_fn)
    values = resample_to_reference(raw, lab_img.affine, image.shape, affine, order=0).astype(np.int32)
    prepared = PreparedTrainingImage(
        image=np.ascontiguousarray(image, dtype=np.float32),
        distance=np.ascontiguousarray(distance, dtype=np.float32),
        label_values=values, affine=np.asarray(affine, dtype=np.float64), key=key,
        t1w_path=label_path, label_path=label_path, mask=np.isin(values, sorted(BRAIN_VALUES)),
        real=False,
    )
    _save_npz(entry, prepared)
    return prepared


#: FreeSurfer's WM-hypointensities value and the white matter it is split into, by side.
_WM_HYPO, _LEFT_WM, _RIGHT_WM = 77, 2, 41


def split_by_hemisphere(values: np.ndarray) -> np.ndarray:
    """Give each WM-hypointensity voxel (FreeSurfer 77) the nearest cerebral white matter label.

    ``ASEG_MERGE`` sends 77 to left white matter (2); this assigns 2 or 41 by whichever
    white matter voxel is nearest, so right-hemisphere lesions do not become left WM.

    Args:
        values: ``(X, Y, Z)`` integer label values.

    Returns:
        a copy with 77 replaced where any 2/41 voxel exists; unchanged otherwise.
    """
    hypo = values == _WM_HYPO
    wm = (values == _LEFT_WM) | (values == _RIGHT_WM)
    if not hypo.any() or not wm.any():
        return values
    _, nearest = ndimage.distance_transform_edt(~wm, return_distances=True, return_indices=True)
    out = values.copy()
    idx = tuple(n[hypo] for n in nearest)
    out[hypo] = values[idx]
    return out


def labels_to_index(
    values: np.ndarray,
    table: LabelTable,
    merge: Mapping[int, int] | None,
    affine: np.ndarray | None = None,
) -> np.ndarray:
    """Label values → model channels (int16); values outside table and merge become 0.

    With FreeSurfer's merge (:data:`~bids_cadiff.labels.ASEG_MERGE`) and the grid's ``affine``,
    values go through :func:`~bids_cadiff.labels.aseg_to_table_values` first, as everywhere
    else in the package: midline and bilateral white matter (WM hypointensities, corpus
    callosum) become left or right cerebral white matter by side. Without ``affine``, WM
    hypointensities take the nearest white matter label (:func:`split_by_hemisphere`).
    """
    from bids_cadiff.labels import ASEG_MERGE, aseg_to_table_values

    if merge and affine is not None and dict(merge) == ASEG_MERGE:
        mapped = aseg_to_table_values(values, affine, table)
        return table.value_to_index(mapped).astype(np.int16)
    if merge and _WM_HYPO in merge and {_LEFT_WM, _RIGHT_WM} <= set(table.values):
        values = split_by_hemisphere(values)
    return table.value_to_index(values, merge=merge).astype(np.int16)
