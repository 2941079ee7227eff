"""QC figures of one T1w, fMRIPrep style: label overlay, label contours, uncertainty, registration.

Every figure has the same layout: three rows of tiles (sagittal, coronal, axial slices) through
the region of interest (the labelled brain by default), in RAS voxel order and neurological
convention: the subject's left on the picture's left in coronal and axial tiles ("L" and "R"
at the ends of those rows), superior (axial tiles: anterior) at the top, square pixels.
The T1w is drawn in grey (1st-99th percentile of its positive voxels), bilinearly resampled;
labels and masks are sampled nearest-neighbour.

Only the drawn slices are resampled (never the volume), so the four figures of a 256^3 T1w take
a fraction of a second. Drawn with numpy and written with :func:`~.overlay.png_bytes` (no
plotting library, no font or config caches anywhere).

All arrays are ``(X, Y, Z)`` on the T1w's own voxel grid, in its stored axis order.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import nibabel as nib
import numpy as np
from scipy import ndimage

from bids_cadiff.bidsio.derivatives import figure_path
from bids_cadiff.io.atomic import atomic_write
from bids_cadiff.labels import LabelTable
from bids_cadiff.reports.overlay import _colours, png_bytes

logger = logging.getLogger(__name__)

#: Default pixel size of each square tile.
TILE = 256
#: Margin around the region of interest, in mm.
MARGIN_MM = 6.0
#: Colour of the registered atlas's brain outline (RGB in [0, 1]).
REGISTRATION_COLOUR = (1.0, 0.2, 0.2)
#: Uncertainty colour map stops: (value as a fraction of vmax, RGB).
HEAT_STOPS: tuple[tuple[float, tuple[float, float, float]], ...] = (
    (0.0, (0.55, 0.0, 0.0)),
    (0.35, (1.0, 0.15, 0.0)),
    (0.7, (1.0, 0.85, 0.0)),
    (1.0, (1.0, 1.0, 0.75)),
)
#: Uncertainty at or below this fraction of vmax is not drawn (the T1w shows through).
UNCERTAINTY_FLOOR = 0.01


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Tile:
    """Where one slice is drawn and which voxels feed its pixels.

    ``h_*`` index the picture's columns (the first in-plane RAS axis), ``v_*`` its rows (the
    second, flipped so that superior/anterior is at the top). Indices are relative to the crop.
    """

    axis: int
    position: int
    crop: tuple[slice, slice, slice]
    h_index: np.ndarray  # (W,) int, nearest voxel of each column
    v_index: np.ndarray  # (H,) int, nearest voxel of each row
    h_coord: np.ndarray  # (W,) float, continuous voxel coordinate of each column
    v_coord: np.ndarray  # (H,) float
    offset: tuple[int, int]  # (row, col) of the picture within its square tile


@dataclass
class _Scene:
    """The T1w in RAS voxel order (views of the caller's data, never copies) and the tiles."""

    image: np.ndarray
    to_ras: np.ndarray
    window: tuple[float, float]
    tiles: list[list[_Tile]]
    tile: int
    _grey: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    def ras(self, array: np.ndarray) -> np.ndarray:
        """A view of an ``(X, Y, Z)`` array of the T1w's grid in RAS voxel order."""
        return nib.orientations.apply_orientation(np.asanyarray(array), self.to_ras)

    def plane(self, array_ras: np.ndarray, t: _Tile) -> np.ndarray:
        """The cropped slice of ``t``: ``(h, v)`` voxels."""
        index: list[slice | int] = list(t.crop)
        index[t.axis] = t.position
        return array_ras[tuple(index)]

    def linear(self, array_ras: np.ndarray, t: _Tile) -> np.ndarray:
        """``(H, W)`` float32 bilinear samples of a RAS-ordered array on the tile's pixels."""
        plane = np.nan_to_num(np.asarray(self.plane(array_ras, t), dtype=np.float32))
        h = np.broadcast_to(t.h_coord[None, :], (len(t.v_coord), len(t.h_coord)))
        v = np.broadcast_to(t.v_coord[:, None], h.shape)
        return ndimage.map_coordinates(plane, [h, v], order=1, mode="nearest", output=np.float32)

    def grey(self, t: _Tile) -> np.ndarray:
        """``(H, W)`` float32 grey levels in [0, 1] of the T1w (cached: shared by figures)."""
        key = (t.axis, t.position)
        if key not in self._grey:
            lo, hi = self.window
            self._grey[key] = np.clip((self.linear(self.image, t) - lo) / (hi - lo), 0.0, 1.0)
        return self._grey[key]


def _t1_data(t1: nib.Nifti1Image) -> np.ndarray:
    data = np.asanyarray(t1.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"the T1w must be a 3-D image (X, Y, Z), got shape {data.shape}")
    return data


def _check_shape(name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    array = np.asanyarray(array)
    if array.shape != shape:
        raise ValueError(
            f"{name} must be on the T1w's grid, shape {shape}; got {array.shape} "
            "(resample it to the T1w first)"
        )
    return array


def _window(image: np.ndarray) -> tuple[float, float]:
    """1st and 99th percentile of the positive voxels (of a subsample of at most ~1M voxels)."""
    step = max(1, math.ceil((image.size / 1e6) ** (1 / 3)))
    sample = np.asarray(image[::step, ::step, ::step], dtype=np.float32)
    positive = sample[sample > 0]
    if positive.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(positive, [1, 99])
    return float(lo), float(max(hi, lo + 1e-6))


def _bounding_box(mask_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """First and last index of ``mask`` along each axis, or None if it is empty."""
    first, last = [], []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(np.any(mask_ras, axis=others))
        if hits.size == 0:
            return None
        first.append(int(hits[0]))
        last.append(int(hits[-1]))
    return np.array(first), np.array(last)


def _layout(
    shape: tuple[int, ...], zooms: np.ndarray, box: tuple[np.ndarray, np.ndarray], n: int, tile: int
) -> list[list[_Tile]]:
    first, last = box
    margin = np.ceil(MARGIN_MM / zooms).astype(int)
    lo = np.maximum(first - margin, 0)
    hi = np.minimum(last + margin, np.array(shape) - 1)
    rows = []
    for axis in range(3):
        h_axis, v_axis = (a for a in range(3) if a != axis)
        n_h, n_v = hi[h_axis] - lo[h_axis] + 1, hi[v_axis] - lo[v_axis] + 1
        w_mm, h_mm = n_h * zooms[h_axis], n_v * zooms[v_axis]
        scale = tile / max(w_mm, h_mm)  # pixels per mm
        width = max(1, min(tile, int(round(w_mm * scale))))
        height = max(1, min(tile, int(round(h_mm * scale))))
        # pixel centres -> continuous voxel coordinates of the crop (rows flipped)
        h_coord = (np.arange(width) + 0.5) * (n_h / width) - 0.5
        v_coord = (n_v - 0.5) - (np.arange(height) + 0.5) * (n_v / height)
        h_index = np.clip(np.round(h_coord), 0, n_h - 1).astype(np.intp)
        v_index = np.clip(np.round(v_coord), 0, n_v - 1).astype(np.intp)
        crop = tuple(slice(int(lo[a]), int(hi[a]) + 1) for a in range(3))
        offset = ((tile - height) // 2, (tile - width) // 2)
        positions = np.linspace(first[axis], last[axis], n + 2)[1:-1].round().astype(int)
        rows.append([
            _Tile(axis, int(p), crop, h_index, v_index, h_coord.astype(np.float32),
                  v_coord.astype(np.float32), offset)
            for p in positions
        ])
    return rows


def _scene(
    t1: nib.Nifti1Image, data: np.ndarray, focus: np.ndarray | None, slices_per_axis: int,
    tile: int,
) -> _Scene:
    """Orientation, grey window and tiles; ``data`` is ``_t1_data(t1)`` (loaded once)."""
    if slices_per_axis < 1:
        raise ValueError(f"slices_per_axis must be >= 1, got {slices_per_axis}")
    if tile < 16:
        raise ValueError(f"tile must be >= 16 pixels, got {tile}")
    ornt = nib.orientations.io_orientation(t1.affine)
    to_ras = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt("RAS"))
    image = nib.orientations.apply_orientation(data, to_ras)
    zooms = np.abs(nib.affines.voxel_sizes(t1.affine))[np.argsort(ornt[:, 0])]
    box = None
    if focus is not None:
        focus = _check_shape("focus", focus, data.shape)
        box = _bounding_box(nib.orientations.apply_orientation(focus, to_ras))
    if box is None:
        box = (np.zeros(3, int), np.array(image.shape) - 1)
    tiles = _layout(image.shape, zooms, box, slices_per_axis, tile)
    return _Scene(image, to_ras, _window(image), tiles, tile)


# --------------------------------------------------------------------------- drawing

# 3x5 bitmap glyphs, enough for colour bar values and orientation marks.
_GLYPHS: dict[str, tuple[str, ...]] = {
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "001", "001", "001"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
    ".": ("000", "000", "000", "000", "010"),
    "L": ("100", "100", "100", "100", "111"),
    "R": ("110", "101", "110", "101", "101"),
}


def _draw_text(canvas: np.ndarray, text: str, row: int, col: int, scale: int = 2) -> None:
    """Draw ``text`` in white into ``canvas`` (float RGB, modified in place) at (row, col)."""
    for char in text:
        glyph = np.array([[c == "1" for c in line] for line in _GLYPHS[char]])
        big = np.kron(glyph, np.ones((scale, scale), bool))
        region = canvas[row : row + big.shape[0], col : col + big.shape[1]]
        region[big[: region.shape[0], : region.shape[1]]] = 1.0
        col += 4 * scale


def _text_width(text: str, scale: int = 2) -> int:
    return 4 * scale * len(text) - scale


def _outline(plane: np.ndarray) -> np.ndarray:
    """In-plane inner border of every non-zero region of a 2-D label slice.

    A voxel is on the outline when it is non-zero and one of its four in-plane neighbours holds
    another value; the crop's and volume's edges do not count as borders.

    Example:
        >>> p = np.zeros((5, 5), int); p[1:4, 1:4] = 7
        >>> _outline(p).astype(int)[1:4, 1:4].tolist()
        [[1, 1, 1], [1, 0, 1], [1, 1, 1]]
    """
    p = np.pad(plane, 1, mode="edge")
    centre = p[1:-1, 1:-1]
    differs = (
        (p[:-2, 1:-1] != centre) | (p[2:, 1:-1] != centre)
        | (p[1:-1, :-2] != centre) | (p[1:-1, 2:] != centre)
    )
    return differs & (centre != 0)


def heat_colours(values: np.ndarray, vmax: float = 1.0) -> np.ndarray:
    """Heat colour map (dark red, red, yellow, pale yellow) of ``values`` in ``[0, vmax]``.

    Returns:
        ``values.shape + (3,)`` float32 RGB in [0, 1].
    """
    u = np.clip(np.asarray(values, dtype=np.float32) / vmax, 0.0, 1.0)
    xs = [s for s, _ in HEAT_STOPS]
    return np.stack(
        [np.interp(u, xs, [c[i] for _, c in HEAT_STOPS]).astype(np.float32) for i in range(3)],
        axis=-1,
    )


Painter = Callable[[_Tile, np.ndarray], np.ndarray]


def _montage(scene: _Scene, paint: Painter) -> np.ndarray:
    """Compose the tiles painted by ``paint(tile, grey (H, W)) -> (H, W, 3)`` (float RGB)."""
    size = scene.tile
    rows = scene.tiles
    canvas = np.zeros((size * len(rows), size * max(len(r) for r in rows), 3), np.float32)
    for r, row in enumerate(rows):
        for c, t in enumerate(row):
            rgb = paint(t, scene.grey(t))
            top, left = r * size + t.offset[0], c * size + t.offset[1]
            canvas[top : top + rgb.shape[0], left : left + rgb.shape[1]] = rgb
        if row and row[0].axis in (1, 2):  # coronal, axial: the subject's left and right
            _draw_text(canvas, "L", r * size + 4, 4)
            _draw_text(canvas, "R", r * size + 4, len(row) * size - 4 - _text_width("R"))
    return canvas


def _to_uint8(canvas: np.ndarray) -> np.ndarray:
    return (np.clip(canvas, 0.0, 1.0) * 255).round().astype(np.uint8)


def _grey_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def _label_rgb(
    scene: _Scene, labels: np.ndarray, table: LabelTable, *, contours: bool, alpha: float
) -> np.ndarray:
    lab = scene.ras(labels)
    lut = _colours(table, int(max(int(lab.max(initial=0)), max(table.values))))

    def paint(t: _Tile, grey: np.ndarray) -> np.ndarray:
        rgb = _grey_rgb(grey)
        plane = np.asarray(scene.plane(lab, t)).astype(np.int64)
        if contours:
            drawn = np.where(_outline(plane), plane, 0)
            opacity = 1.0
        else:
            drawn, opacity = plane, alpha
        values = np.clip(drawn[t.h_index[None, :], t.v_index[:, None]], 0, len(lut) - 1)
        mask = (values > 0)[..., None]
        return np.where(mask, (1 - opacity) * rgb + opacity * lut[values], rgb)

    return _to_uint8(_montage(scene, paint))


def _colour_bar(height: int, vmax: float) -> np.ndarray:
    """A vertical colour bar strip ``(height, 64, 3)`` float: 0 at the bottom, ``vmax`` on top."""
    strip = np.zeros((height, 64, 3), np.float32)
    top, bottom = 12, height - 12
    values = np.linspace(vmax, 0.0, max(bottom - top, 2))
    strip[top:bottom, 8:22] = heat_colours(values, vmax)[: bottom - top, None, :]
    for value, row in ((vmax, top), (vmax / 2, (top + bottom) // 2), (0.0, bottom)):
        text = f"{value:.2f}".rstrip("0").rstrip(".")
        _draw_text(strip, text, max(0, min(row - 5, height - 10)), 27)
    return strip


def _uncertainty_rgb(scene: _Scene, uncertainty: np.ndarray, vmax: float) -> np.ndarray:
    if not vmax > 0:
        raise ValueError(f"vmax must be > 0, got {vmax}")
    unc = scene.ras(uncertainty)

    def paint(t: _Tile, grey: np.ndarray) -> np.ndarray:
        rgb = _grey_rgb(grey)
        u = scene.linear(unc, t)
        opacity = np.clip((u - UNCERTAINTY_FLOOR * vmax) / (0.1 * vmax), 0.0, 1.0) * 0.85
        return (1 - opacity[..., None]) * rgb + opacity[..., None] * heat_colours(u, vmax)

    canvas = _montage(scene, paint)
    return _to_uint8(np.concatenate([canvas, _colour_bar(canvas.shape[0], vmax)], axis=1))


def _registration_rgb(scene: _Scene, atlas_mask: np.ndarray) -> np.ndarray:
    mask = scene.ras(atlas_mask)
    colour = np.array(REGISTRATION_COLOUR, np.float32)

    def paint(t: _Tile, grey: np.ndarray) -> np.ndarray:
        rgb = _grey_rgb(grey)
        edge = _outline(np.asarray(scene.plane(mask, t)).astype(bool))
        drawn = edge[t.h_index[None, :], t.v_index[:, None]]
        return np.where(drawn[..., None], colour, rgb)

    return _to_uint8(_montage(scene, paint))


# --------------------------------------------------------------------------- public


def label_figure(
    t1: nib.Nifti1Image,
    labels: np.ndarray,
    table: LabelTable,
    *,
    contours: bool = False,
    slices_per_axis: int = 5,
    alpha: float = 0.45,
    tile: int = TILE,
    focus: np.ndarray | None = None,
) -> np.ndarray:
    """Labels over the T1w: filled at ``alpha`` opacity, or only their outlines.

    Args:
        t1: the T1w, 3-D ``(X, Y, Z)``.
        labels: ``(X, Y, Z)`` integer label values on the T1w's grid (0 = background).
        table: label values and colours; values missing from it are drawn black.
        contours: draw only each label's one-voxel (in-plane) inner border, opaque, in its colour.
        slices_per_axis: tiles per row (sagittal, coronal, axial rows).
        alpha: opacity of filled labels.
        tile: pixel size of each square tile.
        focus: ``(X, Y, Z)`` bool, the region to zoom onto and slice through
            (default: ``labels > 0``; the whole volume when empty).

    Returns:
        ``(3 * tile, slices_per_axis * tile, 3)`` uint8 RGB.
    """
    data = _t1_data(t1)
    labels = _check_shape("labels", labels, data.shape)
    scene = _scene(t1, data, labels > 0 if focus is None else focus, slices_per_axis, tile)
    return _label_rgb(scene, labels, table, contours=contours, alpha=alpha)


def uncertainty_figure(
    t1: nib.Nifti1Image,
    uncertainty: np.ndarray,
    *,
    vmax: float = 1.0,
    slices_per_axis: int = 5,
    tile: int = TILE,
    focus: np.ndarray | None = None,
) -> np.ndarray:
    """Voxel uncertainty in a heat colour map over the grey T1w, with a colour bar on the right.

    Values at or below ``UNCERTAINTY_FLOOR * vmax`` are transparent; opacity grows to 0.85 at
    a tenth of ``vmax``.

    Args:
        t1: the T1w, 3-D ``(X, Y, Z)``.
        uncertainty: ``(X, Y, Z)`` float in ``[0, vmax]`` on the T1w's grid (NaN counts as 0).
        vmax: value drawn with the top colour (and written at the top of the colour bar).
        slices_per_axis, tile: as :func:`label_figure`.
        focus: region to zoom onto (default: ``uncertainty > UNCERTAINTY_FLOOR * vmax``).

    Returns:
        ``(3 * tile, slices_per_axis * tile + 64, 3)`` uint8 RGB.
    """
    data = _t1_data(t1)
    uncertainty = _check_shape("uncertainty", uncertainty, data.shape)
    if focus is None:
        focus = np.nan_to_num(uncertainty) > UNCERTAINTY_FLOOR * vmax
    scene = _scene(t1, data, focus, slices_per_axis, tile)
    return _uncertainty_rgb(scene, uncertainty, vmax)


def registration_figure(
    t1: nib.Nifti1Image,
    atlas_mask: np.ndarray,
    *,
    slices_per_axis: int = 5,
    tile: int = TILE,
    focus: np.ndarray | None = None,
) -> np.ndarray:
    """Outline of the registered atlas's brain (:data:`REGISTRATION_COLOUR`) over the T1w.

    Args:
        t1: the T1w, 3-D ``(X, Y, Z)``.
        atlas_mask: ``(X, Y, Z)`` bool, the atlas brain warped onto the T1w's grid.
        slices_per_axis, tile: as :func:`label_figure`.
        focus: region to zoom onto (default: ``atlas_mask``).

    Returns:
        ``(3 * tile, slices_per_axis * tile, 3)`` uint8 RGB.
    """
    data = _t1_data(t1)
    atlas_mask = _check_shape("atlas_mask", atlas_mask, data.shape).astype(bool, copy=False)
    scene = _scene(t1, data, atlas_mask if focus is None else focus, slices_per_axis, tile)
    return _registration_rgb(scene, atlas_mask)


def write_figures(
    output_dir: str | Path,
    entities: Mapping[str, Any],
    t1: nib.Nifti1Image,
    labels: np.ndarray,
    table: LabelTable,
    uncertainty: np.ndarray | None = None,
    atlas_mask: np.ndarray | None = None,
    *,
    slices_per_axis: int = 5,
) -> dict[str, Path]:
    """Write the QC figures of one T1w (:func:`~bids_cadiff.bidsio.derivatives.figure_path`).

    All figures cut the same slices, through the labelled region joined with the atlas mask,
    so that they can be compared tile by tile. A kind whose input is ``None`` is skipped, and
    a figure of that kind left by an earlier run is removed (it would no longer match).

    Args:
        output_dir: the derivatives dataset.
        entities: the source T1w's entities (``subject`` required).
        t1: the T1w, 3-D.
        labels: ``(X, Y, Z)`` label values on the T1w's grid.
        table: label values and colours.
        uncertainty: ``(X, Y, Z)`` float in [0, 1], or None.
        atlas_mask: ``(X, Y, Z)`` bool, the registered atlas's brain, or None.

    Returns:
        ``{kind: path}`` of the figures written, kinds in
        :data:`~bids_cadiff.bidsio.derivatives.FIGURE_KINDS` order.
    """
    data = _t1_data(t1)
    labels = _check_shape("labels", labels, data.shape)
    focus = labels > 0
    if atlas_mask is not None:
        atlas_mask = _check_shape("atlas_mask", atlas_mask, data.shape).astype(bool, copy=False)
        focus = focus | atlas_mask
    if uncertainty is not None:
        uncertainty = _check_shape("uncertainty", uncertainty, data.shape)
    scene = _scene(t1, data, focus, slices_per_axis, TILE)
    pictures: dict[str, Callable[[], np.ndarray] | None] = {
        "dseg": lambda: _label_rgb(scene, labels, table, contours=False, alpha=0.45),
        "contours": lambda: _label_rgb(scene, labels, table, contours=True, alpha=1.0),
        "uncertainty": None if uncertainty is None else (
            lambda: _uncertainty_rgb(scene, uncertainty, 1.0)
        ),
        "registration": None if atlas_mask is None else (
            lambda: _registration_rgb(scene, atlas_mask)
        ),
    }
    written: dict[str, Path] = {}
    for kind, draw in pictures.items():
        path = figure_path(output_dir, entities, kind)
        if draw is None:
            if path.is_file():
                logger.info("removing %s: no %s input this time", path, kind)
                path.unlink()
            continue
        written[kind] = atomic_write(path, png_bytes(draw()))
    return written


__all__ = [
    "heat_colours",
    "label_figure",
    "registration_figure",
    "uncertainty_figure",
    "write_figures",
]
