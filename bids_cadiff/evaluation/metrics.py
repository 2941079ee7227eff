"""Overlap and surface metrics for label maps: Dice, normalised surface Dice (NSD) and HD95.

Pure functions on arrays (numpy, torch, MONAI); no file access. Both label maps must be on the
same voxel grid; ``spacing`` gives the voxel size in mm along each array axis so that surface
distances are in mm for anisotropic voxels too. 2D ``(X, Y)`` and 3D ``(X, Y, Z)`` maps work.

Surfaces follow MONAI (:func:`monai.metrics.compute_surface_dice`,
:func:`monai.metrics.compute_hausdorff_distance`): the surface of a structure is the set of its
voxels that have at least one face neighbour outside it (``mask ^ binary_erosion(mask)``), and
distances are Euclidean, in mm, between voxel centres of the two surfaces.

* **Dice** ``2|P ∩ R| / (|P| + |R|)`` over voxels.
* **NSD** at tolerance ``τ`` mm: the fraction of surface voxels of both maps that lie within
  ``τ`` of the other map's surface, ``(|{d_PR <= τ}| + |{d_RP <= τ}|) / (|S_P| + |S_R|)``.
* **HD95**: ``max(q95(d_PR), q95(d_RP))``, the larger of the two directed 95th percentiles
  (``torch.quantile``, linear interpolation) of surface-to-surface distances, in mm.

Structures missing from one or both maps (decided here, once, for every caller):

================================  ======  ======  ======
label present in                  Dice    NSD     HD95
================================  ======  ======  ======
both maps                         value   value   value
reference only (missed)           0.0     0.0     inf
prediction only (false alarm)     0.0     0.0     inf
neither map                       NaN     NaN     NaN
================================  ======  ======  ======

``inf`` says "no surface to measure a distance to": the error is unbounded, not unknown. NaN
means "nothing to score" and is left out of every average (:func:`class_average`,
:func:`nanmean_scores`); ``inf`` is not, so averages of HD95 over a set with a missed structure
are ``inf`` (report code may count those separately).

Speed: each structure is cropped to the bounding box of its union in both maps, plus a
one-voxel margin, before MONAI sees it, and no one-hot volume of the whole image is ever built,
so a 256³ map with 32 structures takes seconds, not minutes, and little memory.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice
from scipy import ndimage

__all__ = [
    "StructureScores",
    "class_average",
    "dice_score",
    "evaluate_pair",
    "nanmean_scores",
    "structure_scores",
]

#: Voxels of margin kept around each structure's bounding box before MONAI computes surfaces.
CROP_MARGIN = 1


@dataclass(frozen=True)
class StructureScores:
    """Scores of one structure in one image (or an average of such scores).

    Attributes:
        dice: Dice coefficient in ``[0, 1]``; NaN when the structure is in neither map.
        nsd: normalised surface Dice in ``[0, 1]`` at the tolerance used; NaN as for ``dice``.
        hd95: 95th-percentile symmetric Hausdorff distance in mm, ``>= 0``; ``inf`` when the
            structure is in one map only, NaN when in neither.
    """

    dice: float
    nsd: float
    hd95: float

    @property
    def is_defined(self) -> bool:
        """False when the structure was in neither map (all scores NaN)."""
        return not math.isnan(self.dice)


_UNDEFINED = StructureScores(dice=math.nan, nsd=math.nan, hd95=math.nan)
_ONE_SIDED = StructureScores(dice=0.0, nsd=0.0, hd95=math.inf)


def _check_pair(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[float, ...]:
    if pred.shape != ref.shape:
        raise ValueError(
            f"prediction and reference must have the same shape, got {pred.shape} and {ref.shape}"
            "; resample the prediction onto the reference grid first."
        )
    if pred.ndim not in (2, 3):
        raise ValueError(f"label maps must be 2D (X, Y) or 3D (X, Y, Z), got shape {pred.shape}")
    spacing_t = tuple(float(s) for s in spacing)
    if len(spacing_t) != pred.ndim:
        raise ValueError(
            f"spacing needs one value per axis ({pred.ndim}), got {spacing_t}"
        )
    if not all(math.isfinite(s) and s > 0 for s in spacing_t):
        raise ValueError(f"spacing values must be finite and > 0 mm, got {spacing_t}")
    return spacing_t


def dice_score(pred_mask: np.ndarray, ref_mask: np.ndarray) -> float:
    """Dice coefficient of two boolean masks of the same shape ``(X, Y[, Z])``.

    Returns:
        ``2|P ∩ R| / (|P| + |R|)`` in ``[0, 1]``, or NaN when both masks are empty.
    """
    pred_mask = np.asarray(pred_mask, dtype=bool)
    ref_mask = np.asarray(ref_mask, dtype=bool)
    total = int(pred_mask.sum()) + int(ref_mask.sum())
    if total == 0:
        return math.nan
    return 2.0 * int(np.logical_and(pred_mask, ref_mask).sum()) / total


def _surface_scores(
    pred_mask: np.ndarray,
    ref_mask: np.ndarray,
    spacing: tuple[float, ...],
    nsd_tolerance_mm: float,
) -> tuple[float, float]:
    """NSD and HD95 of two non-empty boolean masks (already cropped), via MONAI."""
    y_pred = torch.from_numpy(np.ascontiguousarray(pred_mask))[None, None]
    y_ref = torch.from_numpy(np.ascontiguousarray(ref_mask))[None, None]
    with warnings.catch_warnings():
        # Empty masks are handled before we get here; MONAI's warnings would be noise.
        warnings.simplefilter("ignore", UserWarning)
        # MONAI 1.5/1.6 warns about its own internal use of a deprecated argument.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        nsd = compute_surface_dice(
            y_pred.float(),
            y_ref.float(),
            class_thresholds=[float(nsd_tolerance_mm)],
            include_background=True,
            spacing=list(spacing),
        )
        hd95 = compute_hausdorff_distance(
            y_pred,
            y_ref,
            include_background=True,
            percentile=95,
            spacing=list(spacing),
        )
    return float(nsd[0, 0]), float(hd95[0, 0])


def _crop_box(
    box: tuple[slice, ...] | None, other: tuple[slice, ...] | None, shape: tuple[int, ...]
) -> tuple[slice, ...]:
    """Union of two bounding boxes (either may be None), grown by CROP_MARGIN within shape."""
    boxes = [b for b in (box, other) if b is not None]
    return tuple(
        slice(
            max(min(b[ax].start for b in boxes) - CROP_MARGIN, 0),
            min(max(b[ax].stop for b in boxes) + CROP_MARGIN, shape[ax]),
        )
        for ax in range(len(shape))
    )


def structure_scores(
    pred_mask: np.ndarray,
    ref_mask: np.ndarray,
    *,
    spacing: Sequence[float],
    nsd_tolerance_mm: float = 1.0,
) -> StructureScores:
    """Dice, NSD and HD95 of one structure given as two boolean masks.

    Args:
        pred_mask: predicted mask ``(X, Y[, Z])`` bool (or 0/1).
        ref_mask: reference mask, same shape.
        spacing: voxel size in mm per axis, e.g. ``(0.5, 1.0, 2.0)``.
        nsd_tolerance_mm: NSD tolerance ``τ`` in mm (distances ``<= τ`` count as correct).

    Returns:
        The scores; see the module docstring for structures missing from one or both masks.
    """
    pred_mask = np.asarray(pred_mask, dtype=bool)
    ref_mask = np.asarray(ref_mask, dtype=bool)
    spacing_t = _check_pair(pred_mask, ref_mask, spacing)
    _check_tolerance(nsd_tolerance_mm)
    pred_box = ndimage.find_objects(pred_mask.astype(np.uint8), max_label=1)[0]
    ref_box = ndimage.find_objects(ref_mask.astype(np.uint8), max_label=1)[0]
    missing = _missing_scores(pred_box, ref_box)
    if missing is not None:
        return missing
    box = _crop_box(pred_box, ref_box, pred_mask.shape)
    return _scores_present(pred_mask[box], ref_mask[box], spacing_t, nsd_tolerance_mm)


def _check_tolerance(nsd_tolerance_mm: float) -> None:
    if not (math.isfinite(nsd_tolerance_mm) and nsd_tolerance_mm >= 0):
        raise ValueError(f"nsd_tolerance_mm must be a finite number >= 0, got {nsd_tolerance_mm}")


def _missing_scores(
    pred_box: tuple[slice, ...] | None, ref_box: tuple[slice, ...] | None
) -> StructureScores | None:
    """Scores for a structure absent from one or both maps, or None when in both."""
    if pred_box is None and ref_box is None:
        return _UNDEFINED
    if pred_box is None or ref_box is None:
        return _ONE_SIDED
    return None


def _scores_present(
    pred_mask: np.ndarray,
    ref_mask: np.ndarray,
    spacing: tuple[float, ...],
    nsd_tolerance_mm: float,
) -> StructureScores:
    """Scores of a structure present in both (cropped) masks."""
    nsd, hd95 = _surface_scores(pred_mask, ref_mask, spacing, nsd_tolerance_mm)
    return StructureScores(dice=dice_score(pred_mask, ref_mask), nsd=nsd, hd95=hd95)


def evaluate_pair(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    labels: Sequence[int],
    spacing: Sequence[float],
    nsd_tolerance_mm: float = 1.0,
) -> dict[int, StructureScores]:
    """Score every structure of a predicted label map against a reference label map.

    Args:
        pred: predicted label map ``(X, Y[, Z])`` of integer label values.
        ref: reference label map, same shape and grid.
        labels: the label values to score (normally without the background, 0).
        spacing: voxel size in mm per axis (length 2 or 3, matching the maps).
        nsd_tolerance_mm: NSD tolerance in mm (default 1 mm).

    Returns:
        ``{label value: StructureScores}`` in the order of ``labels``. A label missing from both
        maps gets NaN scores; one missing from one map gets Dice 0, NSD 0, HD95 inf.

    Raises:
        ValueError: shapes differ, maps are not 2D/3D, or spacing/tolerance are invalid.

    Examples::

        >>> ref = np.zeros((6, 6), int); ref[1:4, 1:4] = 1
        >>> evaluate_pair(ref, ref, labels=[1, 2], spacing=(1.0, 1.0))[1]
        StructureScores(dice=1.0, nsd=1.0, hd95=0.0)
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    spacing_t = _check_pair(pred, ref, spacing)
    _check_tolerance(nsd_tolerance_mm)
    labels = [int(v) for v in labels]
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be unique, got {labels}")
    pred_idx = _compact(pred, labels)
    ref_idx = _compact(ref, labels)
    # One pass over the volume finds every structure's bounding box in each map.
    pred_boxes = ndimage.find_objects(pred_idx, max_label=len(labels))
    ref_boxes = ndimage.find_objects(ref_idx, max_label=len(labels))
    results: dict[int, StructureScores] = {}
    for i, value in enumerate(labels):
        pb, rb = pred_boxes[i], ref_boxes[i]
        missing = _missing_scores(pb, rb)
        if missing is not None:
            results[value] = missing
            continue
        box = _crop_box(pb, rb, pred.shape)
        results[value] = _scores_present(
            pred_idx[box] == i + 1, ref_idx[box] == i + 1, spacing_t, nsd_tolerance_mm
        )
    return results


def _compact(label_map: np.ndarray, labels: list[int]) -> np.ndarray:
    """Map ``labels[i]`` to ``i + 1`` and everything else to 0; ``(…)`` int32."""
    out = np.zeros(label_map.shape, dtype=np.int32)
    for i, value in enumerate(labels):
        out[label_map == value] = i + 1
    return out


def nanmean_scores(scores: Sequence[StructureScores]) -> StructureScores:
    """Mean of each score over the entries where it is not NaN (``inf`` propagates).

    Returns:
        The means; NaN for a score that is NaN everywhere (or when ``scores`` is empty).
    """

    def _mean(values: list[float]) -> float:
        kept = [v for v in values if not math.isnan(v)]
        return float(np.mean(kept)) if kept else math.nan

    return StructureScores(
        dice=_mean([s.dice for s in scores]),
        nsd=_mean([s.nsd for s in scores]),
        hd95=_mean([s.hd95 for s in scores]),
    )


def class_average(scores: Mapping[int, StructureScores]) -> StructureScores:
    """Average over structures of one image's scores, leaving out structures in neither map.

    Args:
        scores: the output of :func:`evaluate_pair`.

    Returns:
        Mean Dice, NSD and HD95 over the structures present in at least one map. HD95 is
        ``inf`` when any such structure is missing from one map (see the module docstring).
    """
    return nanmean_scores([s for s in scores.values() if s.is_defined])
