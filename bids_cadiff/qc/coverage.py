"""Does the field of view cut the brain? Labelled brain on the faces of the T1w's grid.

A T1w whose field of view ends inside the brain (the cerebellum or the top of the head cut
off) gives labels only for the part it shows: the structures at the cut are incomplete and
their volumes too small, although every voxel that is there may be labelled well. The check
measures, on each of the six faces of the voxel grid, the area (mm²) of labelled brain in the
outermost slice, leaving out the structures that normally run out of a field of view (the
brain-stem, which continues into the spinal cord, and CSF). An area above
:data:`MAX_FACE_AREA_MM2` on any face fails the ``coverage`` check, naming the side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["COVERAGE_CHOSEN_ON", "FaceCut", "MAX_FACE_AREA_MM2", "NOT_COUNTED", "face_cuts"]

#: Labelled brain (mm²) allowed on a face of the grid.
MAX_FACE_AREA_MM2 = 400.0
#: How :data:`MAX_FACE_AREA_MM2` was chosen (shown in the sidecar's ``Checks``).
COVERAGE_CHOSEN_ON = (
    "bundled model's label maps: at most 62 mm2 on the real T1w images of the shared data "
    "(chris_t1, whose field of view ends just below the cerebellum), 323 mm2 on a 0.7 mm 320^3 "
    "grid that shaves the occipital pole; a field of view cut through the cerebellum 7066 mm2, "
    "cut 15 mm below the top of the brain 6922 mm2 (benchmarks/unusual_images.py, docs/qc.md)"
)
#: Abbreviations not counted: structures that normally reach the edge of a field of view.
NOT_COUNTED: tuple[str, ...] = ("BS", "CSF")

#: World direction (RAS axis, sign) → name.
_SIDES = {(0, -1): "right", (0, 1): "left", (1, -1): "posterior", (1, 1): "anterior",
          (2, -1): "inferior", (2, 1): "superior"}


@dataclass(frozen=True)
class FaceCut:
    """Labelled brain on one face of the grid.

    Attributes:
        side: the side of the head the face lies on (``"inferior"``, ``"left"``, …).
        axis: voxel axis of the face; ``end``: 0 (first slice) or -1 (last slice).
        area_mm2: labelled brain in the face's slice (structures of :data:`NOT_COUNTED` left
            out).
        structures: abbreviations of the counted structures on the face, largest first.
    """

    side: str
    axis: int
    end: int
    area_mm2: float
    structures: tuple[str, ...]

    @property
    def flagged(self) -> bool:
        return self.area_mm2 > MAX_FACE_AREA_MM2

    def message(self) -> str:
        names = ", ".join(self.structures[:4]) + (", …" if len(self.structures) > 4 else "")
        return (f"the field of view cuts the brain on the {self.side} side: {self.area_mm2:.0f} "
                f"mm² of labelled brain ({names}) lie on the image's edge, so those structures "
                "are cut off and their volumes are too small; use an image that covers the "
                "whole brain")


def _side(affine: np.ndarray, axis: int, end: int) -> str:
    """Which side of the head the first (``end`` 0) or last (-1) slice of ``axis`` lies on."""
    column = np.asarray(affine, dtype=float)[:3, axis]
    world = int(np.argmax(np.abs(column)))
    towards = int(np.sign(column[world])) * (1 if end == -1 else -1)
    return _SIDES[(world, towards)]


def face_cuts(
    labels: np.ndarray,
    affine: np.ndarray,
    zooms: Sequence[float],
    abbreviations: dict[int, str],
) -> list[FaceCut]:
    """Labelled brain on each of the six faces of a label map's grid.

    Args:
        labels: ``(X, Y, Z)`` label values (0 background).
        affine: ``(4, 4)`` voxel-to-world matrix of ``labels``.
        zooms: voxel size (mm) per axis.
        abbreviations: label value → abbreviation (values not in it are not counted).

    Returns:
        One :class:`FaceCut` per face with any counted structure, largest area first.
    """
    labels = np.asarray(labels)
    counted = {v: a for v, a in abbreviations.items() if v != 0 and a not in NOT_COUNTED}
    cuts = []
    for axis in range(3):
        pixel = float(np.prod([zooms[i] for i in range(3) if i != axis]))
        for end in (0, -1):
            face = np.take(labels, end, axis=axis)
            values, counts = np.unique(face[np.isin(face, list(counted))], return_counts=True)
            if values.size == 0:
                continue
            order = np.argsort(-counts)
            cuts.append(FaceCut(
                side=_side(affine, axis, end), axis=axis, end=end,
                area_mm2=float(counts.sum()) * pixel,
                structures=tuple(counted[int(values[i])] for i in order),
            ))
    return sorted(cuts, key=lambda c: -c.area_mm2)
