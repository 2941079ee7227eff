"""Overlay pictures: a label map over its T1w, three slices per axis, as one PNG.

Drawn with numpy and written with zlib (no plotting library, hence no font or config caches
written anywhere): rows are sagittal, coronal and axial slices through the labelled region, in
neurological convention (the subject's left on the picture's left in coronal and axial tiles;
superior, or anterior in axial tiles, at the top). Each slice is resampled to square pixels of the finest voxel size, the T1w in grey (1st-99th
percentile window), the labels in their table colours at ``alpha`` opacity.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from bids_cadiff.io.atomic import atomic_write
from bids_cadiff.labels import LabelTable


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 image as PNG."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(
        b"IDAT", zlib.compress(raw, 6)
    ) + chunk(b"IEND", b"")


def _colours(table: LabelTable, max_value: int) -> np.ndarray:
    lut = np.zeros((max_value + 1, 3), dtype=np.float32)
    for e in table.entries:
        if e.value <= max_value:
            lut[e.value] = [int(e.color[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    return lut


def overlay_montage(
    t1: nib.Nifti1Image,
    labels: np.ndarray,
    table: LabelTable,
    *,
    slices_per_axis: int = 3,
    alpha: float = 0.45,
    tile: int = 256,
) -> np.ndarray:
    """The overlay montage as an ``(H, W, 3)`` uint8 image.

    Args:
        t1: the T1w ``(X, Y, Z)``.
        labels: ``(X, Y, Z)`` label values on the T1w's grid.
        table: label values and colours.
        slices_per_axis: slices per row (sagittal, coronal, axial rows).
        alpha: label opacity.
        tile: pixel size of each (square-padded) tile.
    """
    ornt = nib.orientations.io_orientation(t1.affine)
    to_ras = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt("RAS"))
    image = nib.orientations.apply_orientation(np.asanyarray(t1.dataobj, dtype=np.float32), to_ras)
    lab = nib.orientations.apply_orientation(np.asarray(labels).astype(np.int64), to_ras)
    zooms = np.abs(nib.affines.voxel_sizes(t1.affine))[np.argsort(ornt[:, 0])]
    positive = image[image > 0]
    lo, hi = np.percentile(positive, [1, 99]) if positive.size else (0.0, 1.0)
    grey = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
    lut = _colours(table, int(max(lab.max(initial=0), max(table.values))))
    fg = np.argwhere(lab > 0)
    first, last = (fg.min(0), fg.max(0)) if len(fg) else (np.zeros(3, int), np.array(lab.shape) - 1)

    rows = []
    for axis in range(3):
        others = [a for a in range(3) if a != axis]
        tiles = []
        for pos in np.linspace(first[axis], last[axis], slices_per_axis + 2)[1:-1].astype(int):
            index: list[slice | int] = [slice(None)] * 3
            index[axis] = int(pos)
            for other in others:  # zoom onto the labelled region, with a margin
                index[other] = slice(max(int(first[other]) - 8, 0), int(last[other]) + 9)
            g2 = grey[tuple(index)]
            l2 = lab[tuple(index)]
            rgb = np.repeat(g2[..., None], 3, axis=2)
            colour = lut[np.clip(l2, 0, len(lut) - 1)]
            mask = (l2 > 0)[..., None]
            rgb = np.where(mask, (1 - alpha) * rgb + alpha * colour, rgb)
            # square pixels, then rows = second in-plane axis flipped (superior/anterior up)
            scale = zooms[others] / zooms[others].min()
            rgb = ndimage.zoom(rgb, (*scale, 1), order=0)
            rgb = np.transpose(rgb, (1, 0, 2))[::-1]
            factor = tile / max(rgb.shape[:2])
            rgb = ndimage.zoom(rgb, (factor, factor, 1), order=0)[:tile, :tile]
            padded = np.zeros((tile, tile, 3), dtype=np.float32)
            padded[: rgb.shape[0], : rgb.shape[1]] = rgb
            tiles.append(padded)
        rows.append(np.concatenate(tiles, axis=1))
    return (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)


def overlay_png(
    t1: nib.Nifti1Image,
    labels: np.ndarray,
    table: LabelTable,
    path: str | Path,
    *,
    slices_per_axis: int = 3,
    alpha: float = 0.45,
) -> Path:
    """Write :func:`overlay_montage` as a PNG, atomically. Returns ``path``."""
    montage = overlay_montage(t1, labels, table, slices_per_axis=slices_per_axis, alpha=alpha)
    return atomic_write(path, png_bytes(montage))
