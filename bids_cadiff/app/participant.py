"""Participant level: every selected T1w → a CA-Diff label map on its own grid, with provenance.

Per image: load and check → RAS → resample to the model's voxel size → N4 → intensity
normalisation (as the checkpoint says) → register the atlas and warp its distance field →
check that the header's orientation is the one the atlas fits best
(:mod:`bids_cadiff.registration.orientation`; a lying header fails QC) → sliding-window
CA-Diff sampling inside the brain's bounding box → probabilities resampled onto the T1w's own
grid → label map, volumes, overlay picture and, last, the JSON sidecar. The sidecar
is the "finished" mark: a rerun skips images that have it (``--overwrite`` recomputes, and
removes the old sidecar before it writes anything), and every file is written atomically, so a
killed run never leaves a finished-looking output.

One job at a time works on a T1w: :func:`process_record` holds the image's lock file
(``OUTPUT_DIR/logs/locks/``, :mod:`bids_cadiff.io.locks`) from segmentation to sidecar; a second
job on the same image waits, then skips it once the first has finished it. The kernel releases
the lock of a killed job.

One image failing is logged with its path and reason; the others go on, and the exit code is 1.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from bids_cadiff import __version__
from bids_cadiff.bidsio import derivatives as deriv
from bids_cadiff.bidsio.query import T1wRecord, find_t1w
from bids_cadiff.config import GB_PER_IMAGE, RunConfig
from bids_cadiff.errors import CadiffError, CheckpointError, OutputError, UsageError
from bids_cadiff.imaging.preprocess import (
    bias_field,
    n4_bias_correct,
    normalise_intensity,
    resample_to_spacing,
    to_ras,
)
from bids_cadiff.inference.checkpoint import LoadedModel, ModelMetadata, load_checkpoint
from bids_cadiff.inference.predict import brain_box, predict_volume, resolve_device
from bids_cadiff.inference.refine import RefineSettings
from bids_cadiff.inference.refiner import refine_probabilities
from bids_cadiff.inference.posterior import PROBABILITY_SCALE, GridPosterior
from bids_cadiff.inference.resample import field_to_grid, posterior_on_grid
from bids_cadiff.io.atomic import remove_stale_temporaries
from bids_cadiff.io.faults import kill_point
from bids_cadiff.io.locks import exclusive_lock, holder
from bids_cadiff.io.nifti import load_t1w
from bids_cadiff.labels import LabelTable
from bids_cadiff.models.refiner import Refiner
from bids_cadiff.qc.coverage import face_cuts
from bids_cadiff.qc.flags import QCReference, load_reference, qc_flags
from bids_cadiff.qc.structures import QC_COLUMNS, structure_rows
from bids_cadiff.reports.overlay import overlay_png
from bids_cadiff.registration.ants import Registration, register_atlas, warp_distance_field
from bids_cadiff.registration.atlas import AtlasSpec, atlas_distance_field, resolve_atlas
from bids_cadiff.registration.orientation import OrientationCheck, check_orientation

log = logging.getLogger(__name__)

#: The bundled default model (package data).
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "data" / "cadiff-default.pt"


@dataclass
class PreparedImage:
    """A T1w ready for the model, on the model's grid (RAS, the checkpoint's voxel size).

    Attributes:
        image: ``(X, Y, Z)`` float32 normalised intensities.
        distance: ``(3, X, Y, Z)`` float32 atlas distance field in [0, 1], 0 outside the brain.
        affine: ``(4, 4)`` voxel-to-world matrix of the model grid.
        registration: the atlas registration (quality figure, transforms).
        bias: ``(X, Y, Z)`` float32 multiplicative intensity bias that N4 removed (1 where
            it is undefined), to correct the T1w on its own grid for the refinement.
        timings: seconds per stage.
        corrected: ``(X, Y, Z)`` float32 N4-corrected intensities before normalisation (the
            training recipe derives its skull-stripped inputs from them).
    """

    image: np.ndarray
    distance: np.ndarray
    affine: np.ndarray
    registration: Registration
    bias: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    corrected: np.ndarray | None = None


def load_model(path: Path | None) -> LoadedModel:
    """The model from ``--model``, else the bundled default."""
    if path is None:
        if not DEFAULT_MODEL.is_file():
            raise UsageError(
                f"no default model is bundled with this installation ({DEFAULT_MODEL} is "
                "missing); pass --model PATH with a checkpoint made by cadiff-train"
            )
        path = DEFAULT_MODEL
    try:
        return load_checkpoint(path)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from exc


def prepare_image(
    t1: nib.Nifti1Image,
    *,
    atlas: AtlasSpec,
    voxel_size: Sequence[float],
    normalization: Mapping[str, float | str],
    cache_dir: Path | None,
    image_path: Path | None = None,
    registration: str = "syn",
) -> PreparedImage:
    """Preprocess one T1w and bring the atlas distance field onto it (shared with training).

    Args:
        t1: the checked T1w (:func:`~bids_cadiff.io.nifti.load_t1w`).
        atlas: the atlas whose distance field the model was trained with.
        voxel_size: the model's voxel size (mm).
        normalization: ``{"method": "percentile", "lower": 0.5, "upper": 99.5}``.
        cache_dir: registration cache (content-keyed), or ``None``.
        image_path: for messages.
        registration: ``"syn"`` or ``"affine"``, as the model's checkpoint says
            (``inputs.registration``).

    Raises:
        UsageError: a registration mode the app cannot reproduce (``"none"``: a model trained
            on identity fields, for tests only).
    """
    if registration not in ("syn", "affine"):
        raise UsageError(
            f"the model was trained with registration {registration!r}; the app registers the "
            "atlas with 'syn' or 'affine': retrain with cadiff-train --registration syn"
        )
    timings: dict[str, float] = {}
    start = time.perf_counter()
    grid = resample_to_spacing(to_ras(t1), tuple(float(v) for v in voxel_size), order=1)
    timings["resample"] = time.perf_counter() - start
    start = time.perf_counter()
    before = np.asanyarray(grid.dataobj).astype(np.float32)
    grid = n4_bias_correct(grid)
    timings["n4"] = time.perf_counter() - start
    data = np.asanyarray(grid.dataobj).astype(np.float32)
    bias = bias_field(before, data)
    if normalization.get("method", "percentile") != "percentile":
        raise UsageError(f"unknown intensity normalisation {normalization!r} in the model")
    image = normalise_intensity(
        data,
        lower_percentile=float(normalization.get("lower", 0.5)),
        upper_percentile=float(normalization.get("upper", 99.5)),
    )
    start = time.perf_counter()
    registration_result = register_atlas(
        grid, atlas, cache_dir=cache_dir, image_path=image_path,
        type_of_transform="SyN" if registration == "syn" else "Affine",
    )
    timings["registration"] = time.perf_counter() - start
    start = time.perf_counter()
    atlas_img, atlas_field = atlas_distance_field(atlas)
    distance = warp_distance_field(atlas_field, atlas_img, registration_result, grid)
    timings["field_warp"] = time.perf_counter() - start
    return PreparedImage(image, distance, grid.affine, registration_result, bias, timings,
                         corrected=data)


def prepare_for_model(
    t1: nib.Nifti1Image,
    metadata: ModelMetadata,
    *,
    atlas: AtlasSpec,
    cache_dir: Path | None,
    image_path: Path | None = None,
) -> PreparedImage:
    """:func:`prepare_image` with the voxel size, normalisation and registration mode that the
    model's checkpoint records (``metadata``), as the app runs it."""
    return prepare_image(
        t1, atlas=atlas, voxel_size=metadata.voxel_size, normalization=metadata.normalization,
        cache_dir=cache_dir, image_path=image_path,
        registration=str(metadata.inputs["registration"]),
    )


def corrected_intensity(t1: nib.Nifti1Image, prepared: PreparedImage) -> np.ndarray:
    """``(X, Y, Z)`` float32 T1w on its own grid, divided by the N4 bias field of ``prepared``
    (unchanged for an image prepared without N4)."""
    shape = tuple(int(n) for n in t1.shape[:3])
    intensity = np.asanyarray(t1.dataobj, dtype=np.float32).reshape(shape)
    if prepared.bias is not None:
        bias = field_to_grid(prepared.bias, prepared.affine, shape, t1.affine, fill=1.0)
        intensity = intensity / np.maximum(bias, 1e-3)
    return intensity


def posterior_on_t1w_grid(
    t1: nib.Nifti1Image,
    probs: torch.Tensor,
    crop_affine: np.ndarray,
    refine: RefineSettings | None,
    intensity: np.ndarray | None = None,
    *,
    keep_probabilities: bool = False,
    temperature: float = 1.0,
    refiner: Refiner | None = None,
    device: torch.device | str = "cpu",
) -> GridPosterior:
    """The final class probabilities on the T1w's own grid (summarised): the model's
    probabilities resampled trilinearly, or (``refine`` given) the intensity-refined posterior
    (:mod:`bids_cadiff.inference.refine`) on the T1w's voxels, with ``intensity`` from
    :func:`corrected_intensity`, at the model's calibration ``temperature``. With a
    ``refiner`` (run on ``device``), its 1 mm probabilities
    (:func:`~bids_cadiff.inference.refiner.refine_probabilities`) take the place of the
    model's."""
    shape = tuple(int(n) for n in t1.shape[:3])
    if (refine is not None or refiner is not None) and intensity is None:
        raise ValueError("the refinement needs the bias-corrected intensities")
    if refiner is not None:
        assert intensity is not None
        probs, crop_affine = refine_probabilities(refiner, probs, crop_affine, intensity,
                                                  t1.affine, device=device)
    return posterior_on_grid(
        probs, crop_affine, shape, t1.affine, intensity=intensity, settings=refine,
        keep_probabilities=keep_probabilities, temperature=temperature,
    )


def labels_on_t1w_grid(
    t1: nib.Nifti1Image,
    probs: torch.Tensor,
    crop_affine: np.ndarray,
    prepared: PreparedImage,
    refine: RefineSettings | None,
    refiner: Refiner | None = None,
) -> np.ndarray:
    """Channel indices ``(X, Y, Z)`` on the T1w's own grid: the argmax of
    :func:`posterior_on_t1w_grid`."""
    needed = refine is not None or refiner is not None
    intensity = corrected_intensity(t1, prepared) if needed else None
    return posterior_on_t1w_grid(t1, probs, crop_affine, refine, intensity,
                                 refiner=refiner).labels


def segment_prepared(
    loaded: LoadedModel,
    prepared: PreparedImage,
    *,
    steps: int,
    seed: int,
    device: torch.device,
    progress: bool = False,
) -> tuple[torch.Tensor, np.ndarray]:
    """CA-Diff class probabilities inside the brain box of a prepared image (3D models by
    sliding windows, 2D models slice by slice along the axial axis).

    Returns:
        ``(probs, affine)``: ``(C, X, Y, Z)`` probabilities of the cropped box and its affine.
    """
    box = brain_box(prepared.distance)
    probs = predict_volume(
        loaded.model, prepared.image[box], prepared.distance[(slice(None), *box)],
        patch_size=loaded.metadata.patch_size, steps=steps, seed=seed, device=device,
        progress=progress, slice_axis=int(loaded.metadata.inputs["slice_axis"]),
    )
    offset = np.eye(4)
    offset[:3, 3] = [s.start for s in box]
    return probs, prepared.affine @ offset


def posterior_temperature(meta: ModelMetadata, refiner: Refiner | None) -> float:
    """The calibration temperature applied to the final probabilities: the model's (fitted on
    its EM-refined posterior, ``scripts/calibration.py``), or 1 when a refiner makes them,
    for which no temperature has been fitted yet."""
    return meta.temperature if refiner is None else 1.0


@dataclass
class Segmentation:
    """One T1w segmented, on its own grid.

    Attributes:
        labels: ``(X, Y, Z)`` label values (as the dseg holds them).
        uncertainty: ``(X, Y, Z)`` float32 in [0, 1]: with one sample, the final posterior's
            probability that the voxel's label is wrong (1 − its largest class probability);
            with several, the fraction of samples whose label differs from the final one.
        soft_counts: label value → sum of its final probability over all voxels.
        sample_volumes: with several samples, one ``{label value: mm³}`` per sample.
        probabilities: ``(X, Y, Z, C)`` uint8 final probabilities × 255 (channels in label
            table order), when asked for.
        prepared: the image on the model's grid, with its registration.
        timings: seconds per stage.
        samples: samples drawn.
        orientation: the header orientation check (``None``: not asked for, or it failed).
    """

    labels: np.ndarray
    uncertainty: np.ndarray
    soft_counts: dict[int, float]
    sample_volumes: list[dict[int, float]]
    probabilities: np.ndarray | None
    prepared: PreparedImage
    timings: dict[str, float]
    samples: int = 1
    orientation: OrientationCheck | None = None


def segment_t1w(
    t1: nib.Nifti1Image,
    loaded: LoadedModel,
    *,
    atlas: AtlasSpec,
    steps: int,
    seed: int,
    device: torch.device,
    cache_dir: Path | None,
    image_path: Path | None = None,
    progress: bool = False,
    refine: RefineSettings | None = None,
    samples: int = 1,
    keep_probabilities: bool = False,
    orientation_check: bool = False,
    refiner: Refiner | None = None,
) -> Segmentation:
    """Segment one T1w (``refine``: the intensity refinement's settings, ``None`` for none;
    ``refiner``: the model's 1 mm refiner, ``None`` for none; neither: the plain argmax;
    ``orientation_check``: also check the header's orientation, :func:`orientation_of`).

    With ``samples`` = N ≥ 2, CA-Diff is sampled N times (seeds ``seed`` … ``seed + N − 1``);
    the final labels come from the mean of the N model probabilities, and each sample's own
    labels measure the uncertainty (:class:`Segmentation`). One sample with seed ``seed`` gives
    the same labels as before sampling was added.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    meta = loaded.metadata
    table = meta.labels
    prepared = prepare_for_model(t1, meta, atlas=atlas, cache_dir=cache_dir,
                                 image_path=image_path)
    timings = dict(prepared.timings)
    orientation = None
    if orientation_check:
        start = time.perf_counter()
        orientation = orientation_of(t1, prepared, atlas, image_path)
        timings["orientation"] = time.perf_counter() - start
    kill_point("inference")  # tests only: die with the image prepared, before sampling
    start = time.perf_counter()
    draws = []
    for k in tqdm(range(samples), desc="samples", unit="sample", disable=samples < 2 or not progress):
        probs, crop_affine = segment_prepared(
            loaded, prepared, steps=steps, seed=seed + k, device=device, progress=progress
        )
        draws.append(probs)
    timings["inference"] = time.perf_counter() - start
    start = time.perf_counter()
    refined = refine is not None or refiner is not None
    intensity = corrected_intensity(t1, prepared) if refined else None
    mean = draws[0] if samples == 1 else torch.stack(draws).mean(dim=0)
    final = posterior_on_t1w_grid(t1, mean, crop_affine, refine, intensity,
                                  keep_probabilities=keep_probabilities,
                                  temperature=posterior_temperature(meta, refiner),
                                  refiner=refiner, device=device)
    timings["refinement" if refined else "to_native_grid"] = time.perf_counter() - start
    voxel_mm3 = float(np.prod(t1.header.get_zooms()[:3]))
    sample_volumes: list[dict[int, float]] = []
    if samples == 1:
        uncertainty = final.uncertainty()
    else:
        start = time.perf_counter()
        disagree = np.zeros(final.labels.shape, dtype=np.uint16)
        for probs in draws:
            own = posterior_on_t1w_grid(t1, probs, crop_affine, refine, intensity,
                                        refiner=refiner, device=device).labels
            disagree += own != final.labels
            counts = np.bincount(own.ravel(), minlength=table.num_classes)
            sample_volumes.append({e.value: float(c) * voxel_mm3
                                   for e, c in zip(table.entries, counts)})
        uncertainty = (disagree / samples).astype(np.float32)
        timings["sample_labels"] = time.perf_counter() - start
    soft = {e.value: float(c) for e, c in zip(table.entries, final.soft_counts)}
    return Segmentation(
        labels=table.index_to_value(final.labels), uncertainty=uncertainty, soft_counts=soft,
        sample_volumes=sample_volumes, probabilities=final.probabilities, prepared=prepared,
        timings=timings, samples=samples, orientation=orientation,
    )


def orientation_of(
    t1: nib.Nifti1Image, prepared: PreparedImage, atlas: AtlasSpec, image_path: Path | None,
) -> OrientationCheck | None:
    """The header orientation check (:mod:`bids_cadiff.registration.orientation`) on the
    prepared (N4-corrected) grid, naming the T1w file's own axis codes; ``None`` with a
    warning when it cannot run (the segmentation goes on without it)."""
    codes = "".join(str(c) for c in nib.aff2axcodes(t1.affine))
    grid = nib.Nifti1Image(prepared.corrected if prepared.corrected is not None
                           else prepared.image, prepared.affine)
    try:
        return check_orientation(grid, atlas, header_codes=codes,
                                 brain_only=prepared.registration.brain_only)
    except (RuntimeError, ValueError) as exc:  # antspyx raises both from C++
        log.warning("%s: the orientation check could not run (%s): QC goes on without it",
                    image_path or "T1w", exc)
        return None


def _is_finished(output_dir: Path, entities: Mapping[str, str]) -> bool:
    return deriv.is_finished(output_dir, entities)


def process_record(
    record: T1wRecord,
    *,
    config: RunConfig,
    loaded: LoadedModel,
    atlas: AtlasSpec,
    device: torch.device,
) -> dict[str, float]:
    """Segment one T1w and write all its outputs (sidecar last), holding the image's lock.

    Returns:
        the timings; empty when another job finished the image meanwhile (this one then
        waited for its lock, or found it finished once it held the lock).
    """
    out = config.output_dir
    entities = record.entities

    def waiting(path: Path) -> None:
        log.info("%s: another job is segmenting this image (lock %s, held by %s); waiting "
                 "for it", record.relpath, path, holder(path) or "?")

    try:
        lock = exclusive_lock(deriv.lock_path(out, entities), on_wait=waiting)
        state = lock.__enter__()
    except OSError as exc:
        raise _output_error(exc, out) from exc
    with contextlib.ExitStack() as stack:
        stack.push(lock)
        if (state.waited or not config.overwrite) and _is_finished(out, entities):
            log.info("%s: finished by another job meanwhile; skipped", record.relpath)
            return {}
        if state.held:  # no other job writes this image: its temporaries are of killed jobs
            for path in deriv.image_output_paths(out, entities):
                remove_stale_temporaries(path)
        return _segment_and_write(record, config=config, loaded=loaded, atlas=atlas,
                                  device=device)


def _segment_and_write(
    record: T1wRecord,
    *,
    config: RunConfig,
    loaded: LoadedModel,
    atlas: AtlasSpec,
    device: torch.device,
) -> dict[str, float]:
    start = time.perf_counter()
    entities = record.entities
    out = config.output_dir
    t1 = load_t1w(record.path)
    refinement = resolve_refinement(config.refine, loaded)
    result = segment_t1w(
        t1, loaded, atlas=atlas, steps=config.steps, seed=config.seed, device=device,
        cache_dir=config.work_dir / "registration", image_path=record.path,
        progress=log.isEnabledFor(logging.INFO), refine=refinement.em, samples=config.samples,
        keep_probabilities=config.save_probabilities, orientation_check=config.orientation_check,
        refiner=refinement.refiner,
    )
    try:
        return _write_outputs(record, config, loaded, atlas, device, t1, refinement, result,
                              start)
    except OSError as exc:
        # no output of this image may look finished, or half there: remove them all
        for path in deriv.image_output_paths(out, entities):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        raise _output_error(exc, out) from exc


def _output_error(exc: OSError, out: Path) -> OutputError:
    """The :class:`OutputError` of an OSError raised while writing into ``out``."""
    where = exc.filename or out
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(where, "no space left on the device (or the quota is used up); "
                           "free space or give another OUTPUT_DIR, then rerun: finished "
                           "images are kept and this one is redone")
    return OutputError(where, f"{exc.strerror or exc}; check that OUTPUT_DIR is writable, "
                       "then rerun")


def _write_outputs(
    record: T1wRecord,
    config: RunConfig,
    loaded: LoadedModel,
    atlas: AtlasSpec,
    device: torch.device,
    t1: nib.Nifti1Image,
    refinement: "Refinement",
    result: Segmentation,
    start: float,
) -> dict[str, float]:
    """Write every output of one segmented T1w, the sidecar last. Returns the timings."""
    entities = record.entities
    out = config.output_dir
    # an output being redone (--overwrite) is no longer finished, from its first file on
    deriv.dseg_sidecar_path(out, entities).unlink(missing_ok=True)
    timings = result.timings
    write_start = time.perf_counter()
    table = loaded.metadata.labels
    labels = result.labels
    dseg = deriv.save_label_map(deriv.dseg_path(out, entities), labels, t1.affine, t1.header)
    voxel_mm3 = float(np.prod(t1.header.get_zooms()[:3]))
    deriv.write_volumes_tsv(
        deriv.volumes_path(out, entities), deriv.compute_volumes(labels, voxel_mm3, table), entities
    )
    dseg_uri = f"bids::{dseg.relative_to(out).as_posix()}"
    measure = _uncertainty_measure(result.samples)
    unc_path = deriv.save_probability_map(
        deriv.uncertainty_path(out, entities),
        np.rint(np.clip(result.uncertainty, 0, 1) * PROBABILITY_SCALE).astype(np.uint8),
        t1.affine, t1.header,
    )
    deriv.write_json(deriv.image_sidecar_path(unc_path), deriv.image_sidecar(
        "Voxel uncertainty of the CA-Diff label map: " + measure, [record.bids_uri, dseg_uri],
        Samples=result.samples,
    ))
    probseg = deriv.probseg_path(out, entities)
    if result.probabilities is not None:
        deriv.save_probability_map(probseg, result.probabilities, t1.affine, t1.header)
        deriv.write_json(deriv.image_sidecar_path(probseg), deriv.image_sidecar(
            "Class probabilities of the CA-Diff label map; volume i of the fourth axis is "
            "row i of desc-cadiff_dseg.tsv (its index column in order; volume 0: background)",
            [record.bids_uri, dseg_uri], Labels=[e.abbreviation for e in table.entries],
        ))
    else:  # a finished rerun without --save-probabilities must not keep a stale map
        for stale in (probseg, deriv.image_sidecar_path(probseg)):
            stale.unlink(missing_ok=True)
    rows = structure_rows(
        labels, result.uncertainty, table, voxel_mm3, soft_counts=result.soft_counts,
        sample_volumes=result.sample_volumes,
    )
    brain = labels > 0
    brain_uncertainty = float(result.uncertainty[brain].mean()) if brain.any() else 1.0
    reg = result.prepared.registration
    zooms = t1.header.get_zooms()[:3]
    qc = qc_flags(
        rows, registration_ncc=reg.quality, brain_only=reg.brain_only,
        brain_uncertainty=brain_uncertainty, reference=qc_reference(table),
        orientation=result.orientation,
        coverage=face_cuts(labels, t1.affine, zooms, table.abbreviations),
        voxel_size=zooms,
    )
    deriv.write_qc_table(deriv.qc_table_path(out, entities), rows, QC_COLUMNS)
    if config.reports:
        from bids_cadiff.reports.figures import write_figures

        atlas_mask = field_to_grid(
            result.prepared.distance.any(axis=0).astype(np.float32), result.prepared.affine,
            tuple(int(n) for n in t1.shape[:3]), t1.affine,
        ) > 0.5
        write_figures(out, entities, t1, labels, table, result.uncertainty, atlas_mask)
    else:
        overlay_png(t1, labels, table, deriv.figure_path(out, entities))
    timings["writing"] = time.perf_counter() - write_start
    if qc["Status"] != "pass":
        log.warning("%s: QC %s: %s", record.relpath, qc["Status"], "; ".join(
            f"{f['Check']}{' ' + f['Structure'] if f['Structure'] else ''} ({f['Reason']})"
            for f in qc["Flags"]))
    sidecar = deriv.dseg_sidecar(
        sources=[record.bids_uri],
        model_name=loaded.metadata.name,
        model_version=loaded.metadata.package_version,
        model_sha256=loaded.metadata.sha256,
        steps=config.steps,
        seed=config.seed,
        device=str(device),
        run_time_s=time.perf_counter() - start,
        atlas=atlas.description,
        registration={
            "Metric": reg.quality_metric,
            "Value": round(reg.quality, 4),
            "ForegroundDice": round(reg.mask_dice, 4),
            "BrainOnlyAtlas": reg.brain_only,
            "ResolutionMM": reg.params.resolution_mm,
            "Transform": reg.params.type_of_transform,
        },
        extra={
            "ModelVoxelSizeMM": list(loaded.metadata.voxel_size),
            "LabelPrior": _label_prior_description(loaded),
            "Refinement": _refinement_description(refinement),
            "Uncertainty": {
                "Samples": result.samples,
                "Measure": measure,
                "BrainMean": round(brain_uncertainty, 5),
                "Temperature": posterior_temperature(loaded.metadata, refinement.refiner),
            },
            "QC": qc,
            "Orientation": (result.orientation.as_json()
                            if result.orientation is not None else None),
            "StageSeconds": {k: round(v, 2) for k, v in timings.items()},
            "GeneratedBy": {"Name": "bids_cadiff", "Version": __version__},
        },
    )
    deriv.write_dseg_sidecar(deriv.dseg_sidecar_path(out, entities), sidecar)
    return timings


def _uncertainty_measure(samples: int) -> str:
    """What the uncertainty map's values are, for its sidecar and the dseg's."""
    if samples == 1:
        return ("1 minus the final posterior probability of the voxel's label (the model's "
                "probability that the label is wrong); one sample")
    return (f"the fraction of {samples} CA-Diff samples whose label differs from the final "
            "label (the labels of the mean of the samples' probabilities)")


def qc_reference(table: LabelTable) -> QCReference | None:
    """The bundled QC reference when ``table`` is the one it was built for, else ``None``
    (then only the ``missing`` check runs)."""
    try:
        reference = load_reference()
    except (OSError, ValueError, KeyError) as exc:
        log.warning("the bundled QC reference cannot be read (%s): only the 'missing' QC check "
                    "runs; reinstall bids_cadiff", exc)
        return None
    if not reference.fits([e.abbreviation for e in table.entries[1:]]):
        log.warning("the model's label table is not the one the bundled QC reference was built "
                    "for: only the 'missing' QC check runs")
        return None
    return reference


@dataclass(frozen=True)
class Refinement:
    """How the final posterior is made from the model's probabilities (``--refine``).

    Attributes:
        kind: ``"refiner"``, ``"refiner+em"``, ``"em"`` or ``"none"`` (``auto`` resolved).
        em: the EM intensity refinement's settings, or ``None``.
        refiner: the model's 1 mm refiner, or ``None``.
    """

    kind: str
    em: RefineSettings | None
    refiner: Refiner | None


def resolve_refinement(choice: str, loaded: LoadedModel) -> Refinement:
    """``--refine`` for this model: ``auto`` is ``refiner+em`` when the model has a refiner,
    else ``em`` (on fold 1's validation subject the two score alike, and the refiner alone
    below both: artifacts/default_model_v2/README.md).

    Raises:
        UsageError: a refiner is asked for and the model has none.
    """
    kind = choice if choice != "auto" else ("refiner+em" if loaded.refiner is not None else "em")
    uses_refiner = kind.startswith("refiner")
    if uses_refiner and loaded.refiner is None:
        raise UsageError(
            f"--refine {kind}: the model {loaded.path} has no 1 mm refiner; use --refine em, or "
            "a model trained with a [refiner] table in its cadiff-train recipe"
        )
    em = RefineSettings() if kind in ("em", "refiner+em") else None
    return Refinement(kind=kind, em=em, refiner=loaded.refiner if uses_refiner else None)


def _warn_if_other_refinement(config: RunConfig, record: T1wRecord, wanted: str) -> None:
    """A finished output made with another ``--refine`` is kept, but said so: one
    derivatives folder would otherwise mix refined and unrefined label maps unnoticed."""
    path = deriv.dseg_sidecar_path(config.output_dir, record.entities)
    try:
        made = json.loads(path.read_text()).get("Refinement")
    except (OSError, ValueError):
        return
    kind = "none" if made is None else str(made.get("Kind", "em"))
    if kind != wanted:
        log.warning(
            "%s: the finished output was made with --refine %s, this run asks for --refine "
            "%s; pass --overwrite to redo it", record.relpath, kind, wanted,
        )


_EM_FIT = (
    "the spatial prior of an EM fit of one Gaussian intensity model per structure (a mixture "
    "for the background) to the N4-corrected T1w; labels are the posterior's argmax "
    "(bids_cadiff.inference.refine)"
)
_REFINER_DESCRIPTION = (
    "the model's probabilities, upsampled to the refiner's grid, and the N4-corrected T1w "
    "resampled there, go through the model's refiner network (bids_cadiff.models.refiner), "
    "whose probabilities are resampled trilinearly onto the T1w's own grid"
)


def _refinement_description(refinement: Refinement) -> dict[str, object] | None:
    """The sidecar's account of the refinement (None: plain argmax)."""
    if refinement.kind == "none":
        return None
    out: dict[str, object] = {"Kind": refinement.kind}
    if refinement.refiner is None:
        out["Description"] = ("the model's probabilities, trilinearly resampled onto the T1w's "
                              "own grid, are " + _EM_FIT)
    else:
        config = refinement.refiner.config
        out["Refiner"] = {"VoxelSizeMM": config.voxel_size, "Channels": list(config.channels)}
        out["Description"] = _REFINER_DESCRIPTION + (
            "; they are " + _EM_FIT if refinement.em is not None else "; labels are their argmax")
    if refinement.em is not None:
        out["Settings"] = refinement.em.as_dict()
    return out


def _label_prior_description(loaded: LoadedModel) -> dict[str, object] | None:
    """The sidecar's account of the model's distance-field label prior (None: it has none)."""
    bins = loaded.model.model_config.label_prior_bins
    if not bins:
        return None
    return {
        "Description": "log P(label | atlas coordinate) from the training label maps, added "
        "to the network's logits (bids_cadiff.models.prior)",
        "Cells": [bins, bins, bins],
    }


def _worker_init(threads: int, reproducible: bool = False) -> None:
    """Worker process set-up: its own thread budget for torch and ITK (ANTs); ITK gets one
    thread with ``--reproducible``."""
    import os

    itk_threads = 1 if reproducible else threads
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(itk_threads)  # this worker's own env
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def _worker(record: T1wRecord, config: RunConfig, model_path: Path, atlas: AtlasSpec,
            device: str) -> dict[str, float]:
    loaded = load_checkpoint(model_path)
    return process_record(record, config=config, loaded=loaded, atlas=atlas,
                          device=torch.device(device))


def _is_broken_pool(outcome: object) -> bool:
    return type(outcome).__name__ == "BrokenProcessPool"


def _run_in_workers(
    todo: Sequence[T1wRecord], workers: int, config: RunConfig, model_path: Path,
    atlas: AtlasSpec, device: str,
    report: Callable[[T1wRecord, dict[str, float] | BaseException], None],
) -> None:
    """Process ``todo`` in ``workers`` spawned processes; ``report`` gets each outcome.

    A worker that dies (the OOM killer, a crash in a native library) breaks the whole pool, and
    every image still in it fails with it. Those images are run again, each in a fresh
    one-worker pool, so that only the image that kills its worker fails ("worker process
    died"), not the ones that happened to run beside it.
    """
    import concurrent.futures as cf
    import multiprocessing

    def run(batch: Sequence[T1wRecord], processes: int, isolated: bool) -> list[T1wRecord]:
        broken: list[T1wRecord] = []
        with cf.ProcessPoolExecutor(
            processes, mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init, initargs=(config.omp_nthreads, config.reproducible),
        ) as pool:
            futures = {pool.submit(_worker, r, config, model_path, atlas, device): r for r in batch}
            for future in tqdm(cf.as_completed(futures), total=len(futures), desc="T1w images",
                               unit="image", disable=isolated):
                exc = future.exception()
                if exc is not None and _is_broken_pool(exc) and not isolated:
                    broken.append(futures[future])
                else:
                    report(futures[future], exc if exc is not None else future.result())
        return broken

    broken = run(todo, workers, isolated=False)
    if broken:
        log.warning("a worker process died and took %d image(s) with it (%s); running them "
                    "again one at a time, so that only the image that kills its worker fails",
                    len(broken), ", ".join(r.relpath for r in broken))
    for record in tqdm(broken, desc="T1w images again", unit="image", disable=len(broken) < 2):
        run([record], 1, isolated=True)


def _write_error_record(output_dir: Path, record: T1wRecord, reason: str) -> None:
    """Keep a failed image's reason for the reports (removed when it later succeeds)."""
    try:
        deriv.write_json(deriv.error_record_path(output_dir, record.entities), {
            "Source": str(record.path),
            "Error": reason,
            "Time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
    except OSError as exc:
        log.error("could not record the failure of %s: %s", record.path, exc)


def _write_participant_reports(output_dir: Path, records: Sequence[T1wRecord]) -> None:
    """One HTML report per participant of this run (a report that fails is logged, and the
    results stay)."""
    from bids_cadiff.reports.html import write_participant_report

    for subject in sorted({str(r.entities["subject"]) for r in records}):
        start = time.perf_counter()
        try:
            path = write_participant_report(output_dir, subject)
        except Exception:  # noqa: BLE001 - a report must never lose results
            log.exception("could not write the report of sub-%s", subject)
            continue
        log.info("report %s (%.1f s)", path, time.perf_counter() - start)


def parallel_images(config: RunConfig, device: torch.device) -> int:
    """How many images run at once: ``nprocs // omp_nthreads`` on the CPU (one on a GPU),
    and no more than ``--mem`` holds at :data:`~bids_cadiff.config.GB_PER_IMAGE` each."""
    workers = max(1, config.nprocs // config.omp_nthreads) if device.type == "cpu" else 1
    if config.mem_gb is not None:
        allowed = max(1, int(config.mem_gb // GB_PER_IMAGE))
        if allowed < workers:
            log.info("--mem %g GB: %d image(s) at once instead of %d (%g GB each)",
                     config.mem_gb, allowed, workers, GB_PER_IMAGE)
        workers = min(workers, allowed)
    return workers


def run_participant(config: RunConfig) -> int:
    """Segment every selected T1w. Returns 0, or 1 when any image failed.

    Images run one after the other with ``--omp-nthreads`` threads each, or, when
    ``--nprocs`` allows ``nprocs // omp_nthreads`` > 1 workers on the CPU, in that many worker
    processes.
    """
    records = find_t1w(
        config.bids_dir,
        participant_labels=config.participant_labels,
        session_labels=config.session_labels,
        bids_filters=config.bids_filters,
        ignore_dirs=[config.output_dir, config.work_dir],
    )
    loaded = load_model(config.model)
    refinement = resolve_refinement(config.refine, loaded)  # a refiner the model lacks: stop now
    atlas = resolve_atlas(config.atlas)
    trained_with = loaded.metadata.atlas.get("name")
    if trained_with and trained_with != atlas.name:
        log.warning(
            "the model's distance field was built from atlas %s but this run uses %s; pass "
            "--atlas with the model's atlas for results like its validation", trained_with,
            atlas.name,
        )
    try:
        device = resolve_device(config.device)
    except RuntimeError as exc:
        raise UsageError(str(exc)) from exc
    log.info(
        "%d T1w image(s); model %s (%s…), atlas %s, device %s",
        len(records), loaded.metadata.name, loaded.metadata.sha256[:12], atlas.name, device,
    )
    try:
        deriv.init_derivatives(config.output_dir, config.bids_dir, loaded.metadata.labels)
    except OSError as exc:
        raise UsageError(
            f"cannot write to the output folder {config.output_dir} ({exc.strerror or exc}); "
            "free space there or give another OUTPUT_DIR"
        ) from exc
    failures: list[tuple[Path, str]] = []
    todo = []
    for record in records:
        if not config.overwrite and _is_finished(config.output_dir, record.entities):
            log.info("%s: already done, skipped (--overwrite recomputes)", record.relpath)
            _warn_if_other_refinement(config, record, refinement.kind)
        else:
            todo.append(record)
    workers = min(parallel_images(config, device), len(todo))

    def report(record: T1wRecord, outcome: dict[str, float] | BaseException) -> None:
        count = len(failures)
        _report(record, outcome)
        if len(failures) > count:
            _write_error_record(config.output_dir, record, failures[-1][1])
        else:
            deriv.error_record_path(config.output_dir, record.entities).unlink(missing_ok=True)

    def _report(record: T1wRecord, outcome: dict[str, float] | BaseException) -> None:
        if _is_broken_pool(outcome):
            log.error("FAILED %s: a worker process died (out of memory?); rerun with fewer "
                      "--nprocs or more memory: finished images are kept", record.path)
            failures.append((record.path, "worker process died"))
        elif isinstance(outcome, CadiffError):
            log.error("FAILED %s", outcome)
            failures.append((record.path, str(outcome)))
        elif isinstance(outcome, BaseException):
            log.error("FAILED %s: unexpected error", record.path, exc_info=outcome)
            failures.append((record.path, f"{type(outcome).__name__}: {outcome}"))
        elif not outcome:
            pass  # finished by another job meanwhile (process_record said so)
        else:
            log.info("%s: done (%s)", record.relpath,
                     ", ".join(f"{k} {v:.1f} s" for k, v in outcome.items()))

    if workers > 1:
        log.info("%d images in %d worker processes, %d threads each", len(todo), workers,
                 config.omp_nthreads)
        _run_in_workers(todo, workers, config, loaded.path, atlas, str(device), report)
    else:
        for record in tqdm(todo, desc="T1w images", unit="image", disable=len(todo) < 2):
            log.info("%s: segmenting", record.relpath)
            try:
                outcome: dict[str, float] | BaseException = process_record(
                    record, config=config, loaded=loaded, atlas=atlas, device=device
                )
            except Exception as exc:  # noqa: BLE001 - one image must not lose the others
                outcome = exc
            report(record, outcome)
    if config.reports:
        _write_participant_reports(config.output_dir, records)
    if failures:
        log.error("%d of %d image(s) failed:", len(failures), len(records))
        for path, reason in failures:
            log.error("  %s: %s", path, reason)
        return 1
    return 0
