"""Per-structure measurements of one label map: the rows of the QC table.

All measurements are on the T1w's own grid:

* ``volume_mm3``: voxels carrying the label × voxel volume;
* ``volume_soft_mm3``: the sum of the structure's probability over all voxels × voxel volume
  (the mean over samples of these probabilities when several samples are drawn);
* ``volume_sd_mm3``: the standard deviation of ``volume_mm3`` over samples (``None`` with one);
* ``uncertainty``: the mean voxel uncertainty over the structure's voxels **and its boundary**
  (the voxels one step outside it, 6-connected), so a structure whose outline is uncertain
  scores high even when its interior is certain;
* ``volume_fraction``: ``volume_mm3`` / total brain volume
  (:data:`bids_cadiff.bidsio.derivatives.TOTAL_BRAIN`);
* ``outside_largest_piece``: the fraction of the volume outside its largest connected piece
  (26-connected), 0 for a structure in one piece.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from bids_cadiff.labels import LabelTable

__all__ = ["QC_COLUMNS", "pieces_fraction", "structure_rows", "structure_uncertainty"]

#: Columns of the QC table, in order.
QC_COLUMNS: tuple[str, ...] = (
    "index",
    "name",
    "abbreviation",
    "volume_mm3",
    "volume_soft_mm3",
    "volume_sd_mm3",
    "uncertainty",
    "volume_fraction",
    "outside_largest_piece",
    "flags",
)

_SHELL = ndimage.generate_binary_structure(3, 1)
_PIECES = ndimage.generate_binary_structure(3, 3)


def _boxes(labels: np.ndarray) -> dict[int, tuple[slice, ...]]:
    """Bounding box of every positive label value, one voxel wider (clipped)."""
    out: dict[int, tuple[slice, ...]] = {}
    top = int(labels.max(initial=0))
    if top <= 0:
        return out
    for value, box in enumerate(ndimage.find_objects(labels.astype(np.int32, copy=False)), 1):
        if box is None:
            continue
        out[value] = tuple(
            slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, labels.shape)
        )
    return out


def structure_uncertainty(mask: np.ndarray, uncertainty: np.ndarray) -> float:
    """Mean of ``uncertainty`` over ``mask`` and its 6-connected one-voxel outer shell.

    Args:
        mask: ``(X, Y, Z)`` bool, the structure (a crop with one voxel of margin is enough).
        uncertainty: ``(X, Y, Z)`` float, the same crop.

    Example:
        >>> m = np.zeros((5, 5, 5), bool); m[2, 2, 2] = True
        >>> u = np.zeros((5, 5, 5)); u[2, 2, 3] = 0.7
        >>> round(structure_uncertainty(m, u), 3)   # 1 voxel + 6 neighbours, one at 0.7
        0.1
    """
    region = ndimage.binary_dilation(mask, structure=_SHELL)
    if not region.any():
        return float("nan")
    return float(uncertainty[region].mean())


def pieces_fraction(mask: np.ndarray) -> float:
    """Fraction of ``mask`` outside its largest 26-connected piece (0 when empty or whole).

    Example:
        >>> m = np.zeros((6, 1, 1), bool); m[[0, 1, 2, 4], 0, 0] = True
        >>> pieces_fraction(m)
        0.25
    """
    components, n = ndimage.label(mask, structure=_PIECES)
    if n <= 1:
        return 0.0
    sizes = np.bincount(components.ravel())[1:]
    return float(1.0 - sizes.max() / sizes.sum())


def structure_rows(
    labels: np.ndarray,
    uncertainty: np.ndarray,
    table: LabelTable,
    voxel_mm3: float,
    *,
    soft_counts: Mapping[int, float] | None = None,
    sample_volumes: Sequence[Mapping[int, float]] = (),
) -> list[dict[str, Any]]:
    """One QC row per structure of ``table`` (background excluded), in table order.

    Args:
        labels: ``(X, Y, Z)`` label *values* (as written to the dseg).
        uncertainty: ``(X, Y, Z)`` voxel uncertainty in [0, 1].
        table: the label table.
        voxel_mm3: volume of one voxel.
        soft_counts: label value → sum of its probability over all voxels (voxels), or
            ``None`` (soft volumes then ``None``).
        sample_volumes: one ``{value: mm3}`` per sample when several samples were drawn.

    Returns:
        rows with the keys of :data:`QC_COLUMNS` (``flags`` left empty for
        :func:`bids_cadiff.qc.flags.qc_flags`).
    """
    if labels.shape != uncertainty.shape:
        raise ValueError(f"labels {labels.shape} and uncertainty {uncertainty.shape} differ")
    values, counts = np.unique(labels, return_counts=True)
    count_of = dict(zip(values.tolist(), counts.tolist()))
    boxes = _boxes(labels)
    total = sum(
        count_of.get(e.value, 0) for e in table.entries if e.bids_label not in ("BG", "CSF")
    ) * voxel_mm3
    rows = []
    for entry in table.entries:
        if entry.value == 0:
            continue
        volume = count_of.get(entry.value, 0) * voxel_mm3
        unc = pieces = None
        box = boxes.get(entry.value)
        if box is not None and volume > 0:
            mask = labels[box] == entry.value
            unc = structure_uncertainty(mask, uncertainty[box])
            pieces = pieces_fraction(mask)
        spread = None
        if len(sample_volumes) >= 2:
            spread = float(np.std([v.get(entry.value, 0.0) for v in sample_volumes], ddof=1))
        rows.append({
            "index": entry.value,
            "name": entry.name,
            "abbreviation": entry.abbreviation,
            "volume_mm3": float(volume),
            "volume_soft_mm3": None if soft_counts is None
            else float(soft_counts.get(entry.value, 0.0)) * voxel_mm3,
            "volume_sd_mm3": spread,
            "uncertainty": unc,
            "volume_fraction": float(volume / total) if total > 0 else None,
            "outside_largest_piece": pieces,
            "flags": [],
        })
    return rows
