"""Label tables: which integer values a label map holds, and what they mean.

A :class:`LabelTable` lists the structures a model segments, in channel order: channel ``i``
of the model output is ``table.entries[i]``, and the value written into the label map is
``table.entries[i].value``. The background (value 0) is always channel 0.

The built-in :data:`SYNTHSEG32` table is the 32-structure set that SynthSeg and FastSurfer
users know, with FreeSurfer's label values, names and ``FreeSurferColorLUT`` colours, so that
our label maps drop in wherever ``aseg`` is used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import numpy as np


@dataclass(frozen=True)
class Label:
    """One structure of a label table.

    Attributes:
        value: integer written into the label map (FreeSurfer's value for the built-in table).
        name: full name (FreeSurfer's ``FreeSurferColorLUT`` name for the built-in table).
        abbreviation: short name used as a column header in volume tables.
        color: ``#rrggbb`` display colour.
        bids_label: the BIDS common image-derived label abbreviation it maps to, or ``""``:
            one of BG, GM, WM, CSF, B, ST, NB, L, CGM, SGM, BS, CBM (BIDS specification,
            derivatives "Common image-derived labels"; integer values 0-11 in that order,
            written to the ``mapping`` column of ``dseg.tsv``). The most specific one applies:
            cerebral cortex is CGM, deep grey nuclei, hippocampus, amygdala and ventral DC are
            SGM, all cerebellar labels are CBM.
    """

    value: int
    name: str
    abbreviation: str
    color: str
    bids_label: str = ""


@dataclass(frozen=True)
class LabelTable:
    """An ordered list of labels; index ``i`` is model output channel ``i``."""

    entries: tuple[Label, ...]

    def __post_init__(self) -> None:
        values = [e.value for e in self.entries]
        if not values or values[0] != 0:
            raise ValueError("a label table must start with the background, value 0")
        if len(set(values)) != len(values):
            raise ValueError(f"label values must be unique, got {values}")
        abbrevs = [e.abbreviation for e in self.entries]
        if len(set(abbrevs)) != len(abbrevs):
            raise ValueError(f"label abbreviations must be unique, got {abbrevs}")

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def values(self) -> list[int]:
        return [e.value for e in self.entries]

    @property
    def abbreviations(self) -> dict[int, str]:
        """Label value → abbreviation, background included."""
        return {e.value: e.abbreviation for e in self.entries}

    @property
    def num_classes(self) -> int:
        """Number of model output channels, background included."""
        return len(self.entries)

    def to_list(self) -> list[dict[str, Any]]:
        """Plain JSON-able form (stored in checkpoints)."""
        return [asdict(e) for e in self.entries]

    @classmethod
    def from_list(cls, rows: Iterable[Mapping[str, Any]]) -> "LabelTable":
        return cls(
            tuple(
                Label(
                    value=int(r["value"]),
                    name=str(r["name"]),
                    abbreviation=str(r["abbreviation"]),
                    color=str(r["color"]),
                    bids_label=str(r.get("bids_label", "")),
                )
                for r in rows
            )
        )

    def index_to_value(self, index_map: np.ndarray) -> np.ndarray:
        """Map channel indices ``(…)`` int to label values ``(…)`` int32."""
        lut = np.asarray(self.values, dtype=np.int32)
        return lut[np.asarray(index_map, dtype=np.int64)]

    def value_to_index(
        self, label_map: np.ndarray, merge: Mapping[int, int] | None = None
    ) -> np.ndarray:
        """Map label values ``(…)`` to channel indices ``(…)`` int64.

        Args:
            label_map: integer label values (e.g. a FreeSurfer ``aseg``).
            merge: optional ``{source_value: table_value}`` applied first, for values that are
                not in the table but belong to one of its structures. Values that are in
                neither the table nor ``merge`` become background (index 0).
        """
        label_map = np.asarray(label_map).astype(np.int64)
        if merge:
            mapped = label_map.copy()
            for src, dst in merge.items():
                mapped[label_map == src] = dst
            label_map = mapped
        max_value = max(int(label_map.max(initial=0)), max(self.values)) + 1
        lut = np.zeros(max_value, dtype=np.int64)
        for i, v in enumerate(self.values):
            lut[v] = i
        label_map = np.where(label_map < 0, 0, label_map)
        return lut[label_map]


def _fs(value: int, name: str, abbreviation: str, rgb: tuple[int, int, int], bids: str) -> Label:
    return Label(value, name, abbreviation, "#{:02x}{:02x}{:02x}".format(*rgb), bids)


#: The 32 structures of SynthSeg 2.0 / FastSurfer's aseg set plus background, FreeSurfer values.
SYNTHSEG32 = LabelTable(
    (
        _fs(0, "Unknown", "BG", (0, 0, 0), "BG"),
        _fs(2, "Left-Cerebral-White-Matter", "L-WM", (245, 245, 245), "WM"),
        _fs(3, "Left-Cerebral-Cortex", "L-CTX", (205, 62, 78), "CGM"),
        _fs(4, "Left-Lateral-Ventricle", "L-LV", (120, 18, 134), "CSF"),
        _fs(5, "Left-Inf-Lat-Vent", "L-ILV", (196, 58, 250), "CSF"),
        _fs(7, "Left-Cerebellum-White-Matter", "L-CBWM", (220, 248, 164), "CBM"),
        _fs(8, "Left-Cerebellum-Cortex", "L-CBCTX", (230, 148, 34), "CBM"),
        _fs(10, "Left-Thalamus", "L-TH", (0, 118, 14), "SGM"),
        _fs(11, "Left-Caudate", "L-CA", (122, 186, 220), "SGM"),
        _fs(12, "Left-Putamen", "L-PU", (236, 13, 176), "SGM"),
        _fs(13, "Left-Pallidum", "L-PA", (12, 48, 255), "SGM"),
        _fs(14, "3rd-Ventricle", "3V", (204, 182, 142), "CSF"),
        _fs(15, "4th-Ventricle", "4V", (42, 204, 164), "CSF"),
        _fs(16, "Brain-Stem", "BS", (119, 159, 176), "BS"),
        _fs(17, "Left-Hippocampus", "L-HI", (220, 216, 20), "SGM"),
        _fs(18, "Left-Amygdala", "L-AM", (103, 255, 255), "SGM"),
        _fs(24, "CSF", "CSF", (60, 60, 60), "CSF"),
        _fs(26, "Left-Accumbens-area", "L-AC", (255, 165, 0), "SGM"),
        _fs(28, "Left-VentralDC", "L-VDC", (165, 42, 42), "SGM"),
        _fs(41, "Right-Cerebral-White-Matter", "R-WM", (245, 245, 245), "WM"),
        _fs(42, "Right-Cerebral-Cortex", "R-CTX", (205, 62, 78), "CGM"),
        _fs(43, "Right-Lateral-Ventricle", "R-LV", (120, 18, 134), "CSF"),
        _fs(44, "Right-Inf-Lat-Vent", "R-ILV", (196, 58, 250), "CSF"),
        _fs(46, "Right-Cerebellum-White-Matter", "R-CBWM", (220, 248, 164), "CBM"),
        _fs(47, "Right-Cerebellum-Cortex", "R-CBCTX", (230, 148, 34), "CBM"),
        _fs(49, "Right-Thalamus", "R-TH", (0, 118, 14), "SGM"),
        _fs(50, "Right-Caudate", "R-CA", (122, 186, 220), "SGM"),
        _fs(51, "Right-Putamen", "R-PU", (236, 13, 176), "SGM"),
        _fs(52, "Right-Pallidum", "R-PA", (13, 48, 255), "SGM"),
        _fs(53, "Right-Hippocampus", "R-HI", (220, 216, 20), "SGM"),
        _fs(54, "Right-Amygdala", "R-AM", (103, 255, 255), "SGM"),
        _fs(58, "Right-Accumbens-area", "R-AC", (255, 165, 0), "SGM"),
        _fs(60, "Right-VentralDC", "R-VDC", (165, 42, 42), "SGM"),
    )
)

#: FreeSurfer aseg values outside SYNTHSEG32 merged into one of its structures (as SynthSeg does).
ASEG_MERGE: dict[int, int] = {
    31: 0,  # Left-choroid-plexus -> background (SynthSeg leaves it out)
    63: 0,  # Right-choroid-plexus
    30: 0,  # Left-vessel
    62: 0,  # Right-vessel
    77: 2,  # WM-hypointensities -> (left) cerebral white matter; remapped by side in training
    85: 0,  # Optic-Chiasm
    72: 24,  # 5th-Ventricle -> CSF
    80: 0,  # non-WM-hypointensities
}


#: aseg values that are white matter on the midline or of either side (corpus callosum,
#: hypointensities): assigned to left (2) or right (41) cerebral white matter by hemisphere.
ASEG_MIDLINE_WM: tuple[int, ...] = (77, 78, 79, 251, 252, 253, 254, 255)


def aseg_to_table_values(
    aseg: np.ndarray, affine: np.ndarray, table: LabelTable | None = None
) -> np.ndarray:
    """FreeSurfer aseg values → the values of ``table`` (default :data:`SYNTHSEG32`).

    Midline and bilateral white-matter values (:data:`ASEG_MIDLINE_WM`) become left or right
    cerebral white matter by the sign of the RAS x coordinate relative to the brain's centre;
    the other values of :data:`ASEG_MERGE` are merged as listed; values in neither the table
    nor the merge list become background (0).

    Args:
        aseg: ``(X, Y, Z)`` integer label values.
        affine: ``(4, 4)`` voxel-to-world matrix of ``aseg``.

    Returns:
        ``(X, Y, Z)`` int32 values of ``table``.
    """
    table = table or SYNTHSEG32
    aseg = np.asarray(aseg).astype(np.int32)
    out = aseg.copy()
    for src, dst in ASEG_MERGE.items():
        out[aseg == src] = dst
    midline = np.isin(aseg, ASEG_MIDLINE_WM)
    if midline.any():
        idx = np.argwhere(midline)
        world_x = (np.c_[idx, np.ones(len(idx))] @ np.asarray(affine).T)[:, 0]
        brain = np.argwhere(aseg > 0)
        centre_x = float((np.r_[brain.mean(0), 1.0] @ np.asarray(affine).T)[0])
        out[tuple(idx.T)] = np.where(world_x < centre_x, 2, 41)
    known = np.isin(out, table.values)
    out[~known] = 0
    return out


#: FreeSurfer left-hemisphere values and their right-hemisphere counterparts.
LEFT_TO_RIGHT: dict[int, int] = {
    2: 41, 3: 42, 4: 43, 5: 44, 7: 46, 8: 47, 10: 49, 11: 50, 12: 51, 13: 52, 17: 53, 18: 54,
    26: 58, 28: 60,
}


def split_left_codes_at_midline(values: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Label maps whose two hemispheres both carry left codes (older SynthSeg training maps)
    → right codes on the right side of the mid-sagittal plane.

    The plane is ``x = c`` in world (RAS) coordinates, ``c`` the mean x of the voxels that
    carry a left code. Voxels with a left code and ``x > c`` get the right code of
    :data:`LEFT_TO_RIGHT`.

    Args:
        values: ``(X, Y, Z)`` integer label values.
        affine: ``(4, 4)`` voxel-to-world matrix.

    Returns:
        ``(X, Y, Z)`` int32 copy.

    Example:
        >>> v = np.zeros((4, 1, 1), int); v[:, 0, 0] = [17, 17, 17, 17]
        >>> split_left_codes_at_midline(v, np.eye(4))[:, 0, 0].tolist()
        [17, 17, 53, 53]
    """
    out = np.asarray(values).astype(np.int32)
    left = np.isin(out, list(LEFT_TO_RIGHT))
    if not left.any():
        return out.copy()
    idx = np.argwhere(left)
    world_x = (np.c_[idx, np.ones(len(idx))] @ np.asarray(affine, dtype=np.float64).T)[:, 0]
    right = world_x > world_x.mean()
    out = out.copy()
    lut = np.vectorize(LEFT_TO_RIGHT.get)
    pos = tuple(idx[right].T)
    out[pos] = lut(out[pos])
    return out
