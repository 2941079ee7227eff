"""Score folders of predicted label maps against reference ones (``cadiff-evaluate``).

Every ``*_dseg.nii[.gz]`` under the prediction folder is paired with the ``*_dseg.nii[.gz]``
under the reference folder that has the same ``sub``, ``ses``, ``acq``, ``ce``, ``rec`` and
``run`` entities (``desc`` may differ: ``desc-cadiff`` against ``desc-aseg`` or none; see
:mod:`bids_cadiff.evaluation.matching`). Each pair is scored per structure of the label table
(Dice, NSD at a tolerance in mm, HD95 in mm; :mod:`bids_cadiff.evaluation.metrics`); the
per-image scores and their summary can be written as TSV (:mod:`bids_cadiff.evaluation.report`).

Label values: both maps go through ``LabelTable.value_to_index``. With FreeSurfer's merge
(:data:`bids_cadiff.labels.ASEG_MERGE`, the built-in ``synthseg32`` table's) ``aseg`` values
outside the table are first merged; any value still outside the table counts as background
(the values dropped are logged).

Grids: a prediction must be on its reference's voxel grid (same shape, affines equal within
:data:`AFFINE_ATOL`). A mismatch fails that pair with an :class:`~bids_cadiff.errors.InputError`
naming both files; nothing is resampled, because resampling a label map changes the very
boundaries being scored, and a grid mismatch more often means the wrong file or space than a
harmless difference. Resample explicitly (nearest neighbour) if that is what is wanted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

from bids_cadiff.errors import InputError, UsageError
from bids_cadiff.io.nifti import load_label_map
from bids_cadiff.labels import ASEG_MERGE, ASEG_MIDLINE_WM, LabelTable, aseg_to_table_values

if TYPE_CHECKING:
    import pandas as pd

    from bids_cadiff.evaluation.report import ImageScores

logger = logging.getLogger(__name__)

__all__ = ["AFFINE_ATOL", "EvaluationResult", "evaluate_directories", "run_evaluation"]

#: Largest difference (mm, and direction cosines) tolerated between two affines.
AFFINE_ATOL = 1e-3


@dataclass(frozen=True)
class EvaluationResult:
    """What :func:`run_evaluation` scored.

    Attributes:
        images: the scores of each pair that could be scored.
        failed: number of pairs that could not be scored (each logged with its reason).
        summary: one row per structure of the label table, then the average
            (:func:`bids_cadiff.evaluation.report.summary_table`); ``None`` when no pair was
            scored.
    """

    images: list[ImageScores]
    failed: int
    summary: pd.DataFrame | None


def _find_dseg(root: Path) -> list[Path]:
    """``*_dseg.nii[.gz]`` files under root, skipping hidden files and folders, sorted."""
    found = []
    for path in root.rglob("*_dseg.nii*"):
        rel = path.relative_to(root).parts
        if path.is_file() and not any(p.startswith(".") for p in rel):
            found.append(path)
    return sorted(found)


def _check_same_grid(
    pred_path: Path, pred_shape: tuple[int, ...], pred_affine: np.ndarray,
    ref_path: Path, ref_shape: tuple[int, ...], ref_affine: np.ndarray,
) -> None:
    if pred_shape != ref_shape:
        raise InputError(
            pred_path,
            f"shape {pred_shape} differs from reference {ref_path} {ref_shape}; resample the "
            "prediction onto the reference grid (nearest neighbour) before evaluating",
        )
    diff = float(np.abs(pred_affine - ref_affine).max())
    if diff > AFFINE_ATOL:
        raise InputError(
            pred_path,
            f"affine differs from reference {ref_path} (by up to {diff:.3g}); the two are not "
            "on the same voxel grid: resample the prediction onto the reference grid "
            "(nearest neighbour) or check that the right reference and space are used",
        )


def _to_index(
    values: np.ndarray, table: LabelTable, merge: Mapping[int, int], path: Path, what: str,
    affine: np.ndarray,
) -> np.ndarray:
    """Map label values to table indices, logging the values that become background.

    With FreeSurfer's merge, midline and bilateral white matter (corpus callosum, WM
    hypointensities) go to left or right white matter by side, as in training
    (:func:`bids_cadiff.labels.aseg_to_table_values`).
    """
    known = set(table.values) | set(merge)
    if merge == ASEG_MERGE:
        known |= set(ASEG_MIDLINE_WM)
    low, high = int(values.min(initial=0)), int(values.max(initial=0))
    if low >= 0 and high < 1_000_000:  # bincount: one pass, no sort
        counts = np.bincount(values.ravel(), minlength=high + 1)
        present = np.flatnonzero(counts)
        counts = counts[present]
    else:
        present, counts = np.unique(values, return_counts=True)
    dropped = {int(v): int(c) for v, c in zip(present, counts) if int(v) not in known}
    if dropped:
        level = logging.WARNING if what == "prediction" else logging.INFO
        logger.log(
            level,
            "%s %s: values not in the label table counted as background {value: voxels}: %s",
            what, path.name, dropped,
        )
    if merge == ASEG_MERGE:
        return table.value_to_index(aseg_to_table_values(values, affine, table))
    return table.value_to_index(values, merge=merge)


def _entities(path: Path) -> dict[str, str]:
    from bids_cadiff.evaluation.matching import parse_bids_name

    parsed = parse_bids_name(path)
    return dict(parsed.entities) if parsed is not None else {}


def evaluate_directories(
    *,
    pred_dir: Path,
    ref_dir: Path,
    table: LabelTable,
    merge: Mapping[int, int],
    nsd_tolerance_mm: float,
    pred_desc: str | None = None,
    ref_desc: str | None = None,
) -> tuple[list[ImageScores], int]:
    """Match, load and score every pair; returns ``(scored images, number of failed pairs)``.

    Raises:
        UsageError: no prediction could be paired with a reference.
    """
    from bids_cadiff.evaluation.matching import match_files
    from bids_cadiff.evaluation.metrics import class_average, evaluate_pair
    from bids_cadiff.evaluation.report import ImageScores

    result = match_files(
        _find_dseg(pred_dir), _find_dseg(ref_dir), pred_desc=pred_desc, ref_desc=ref_desc
    )
    for path in result.unmatched_predictions:
        logger.warning("no reference for prediction %s", path)
    if result.unmatched_references:
        logger.info(
            "%d reference(s) without prediction: %s",
            len(result.unmatched_references),
            ", ".join(p.name for p in result.unmatched_references),
        )
    for key, paths in result.ambiguous.items():
        logger.warning(
            "skipped %s: several files share these entities (%s); use --pred-desc/--ref-desc",
            "_".join(f"{k}-{v}" for k, v in key),
            ", ".join(str(p) for p in paths),
        )
    if not result.pairs:
        raise UsageError(
            f"no prediction in {pred_dir} matches a reference in {ref_dir} (found "
            f"{len(result.unmatched_predictions)} unmatched prediction(s), "
            f"{len(result.unmatched_references)} unmatched reference(s)); files must be "
            "named like sub-<label>[_ses-<label>]..._dseg.nii.gz with the same entities"
        )
    labels = list(range(1, table.num_classes))
    images: list[ImageScores] = []
    failed = 0
    for n, (pred_path, ref_path) in enumerate(result.pairs, start=1):
        try:
            pred = load_label_map(pred_path)
            ref = load_label_map(ref_path)
            _check_same_grid(
                pred_path, pred.values.shape, pred.affine, ref_path, ref.values.shape, ref.affine
            )
            pred_idx = _to_index(pred.values, table, merge, pred_path, "prediction", pred.affine)
            ref_idx = _to_index(ref.values, table, merge, ref_path, "reference", ref.affine)
            spacing = ref.spacing
            del pred, ref
            by_index = evaluate_pair(
                pred_idx, ref_idx, labels=labels, spacing=spacing, nsd_tolerance_mm=nsd_tolerance_mm
            )
        except InputError as exc:
            logger.error("%s", exc)
            failed += 1
            continue
        scores = {table.values[i]: s for i, s in by_index.items()}
        mean = class_average(scores)
        logger.info(
            "[%d/%d] %s: mean Dice %.3f, NSD %.3f, HD95 %.2f mm",
            n, len(result.pairs), pred_path.name, mean.dice, mean.nsd, mean.hd95,
        )
        images.append(ImageScores(entities=_entities(pred_path), scores=scores))
    return images, failed


def run_evaluation(
    *,
    pred_dir: Path,
    ref_dir: Path,
    table: LabelTable,
    merge: Mapping[int, int],
    nsd_tolerance_mm: float,
    output: Path | None = None,
    pred_desc: str | None = None,
    ref_desc: str | None = None,
) -> EvaluationResult:
    """Score every pair (:func:`evaluate_directories`) and summarise; write TSVs if asked.

    Args:
        pred_dir, ref_dir: folders of predicted and reference ``*_dseg`` label maps.
        table: the structures to score; merge: the value merge that goes with it.
        nsd_tolerance_mm: normalised surface Dice tolerance.
        output: a ``.tsv`` path: per-image scores there, the summary beside it
            (:func:`bids_cadiff.evaluation.report.summary_path`); ``None``: write nothing.
        pred_desc, ref_desc: use only files with this ``desc`` entity.

    Returns:
        the scores, the number of failed pairs and the summary table.

    Raises:
        UsageError: no prediction could be paired with a reference.
    """
    from bids_cadiff.evaluation.report import (
        scores_table,
        summary_path,
        summary_table,
        write_tsv,
    )

    images, failed = evaluate_directories(
        pred_dir=pred_dir, ref_dir=ref_dir, table=table, merge=merge,
        nsd_tolerance_mm=nsd_tolerance_mm, pred_desc=pred_desc, ref_desc=ref_desc,
    )
    if not images:
        return EvaluationResult(images, failed, None)
    scores = scores_table(images, table.abbreviations)
    summary = summary_table(scores)
    if output is not None:
        write_tsv(scores, output)
        write_tsv(summary, summary_path(output))
        logger.info("scores written to %s and %s", output, summary_path(output))
    return EvaluationResult(images, failed, summary)
