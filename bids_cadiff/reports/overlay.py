"""Overlay pictures: a label map over its T1w, a few slices per axis, as one PNG."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from bids_cadiff.io.atomic import atomic_path
from bids_cadiff.labels import LabelTable


def _lut(table: LabelTable) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(table.values)
    colours = np.array(
        [[int(e.color[i : i + 2], 16) / 255 for i in (1, 3, 5)] for e in table.entries]
    )
    return values, colours


def overlay_png(
    t1: nib.Nifti1Image,
    labels: np.ndarray,
    table: LabelTable,
    path: str | Path,
    *,
    title: str = "",
    slices_per_axis: int = 3,
    alpha: float = 0.45,
) -> Path:
    """Write a PNG of label-map outlines and fills over the T1w (RAS orientation).

    Args:
        t1: the T1w image ``(X, Y, Z)``.
        labels: ``(X, Y, Z)`` label values on the T1w's grid.
        table: label values and colours.
        path: destination PNG (written atomically).
        title: figure title (e.g. the T1w's file name).
        slices_per_axis: sagittal, coronal and axial slices through the labelled region.
        alpha: opacity of the label colours.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ornt = nib.orientations.io_orientation(t1.affine)
    to_ras = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt("RAS"))
    image = nib.orientations.apply_orientation(np.asanyarray(t1.dataobj, dtype=np.float32), to_ras)
    lab = nib.orientations.apply_orientation(np.asarray(labels), to_ras)
    zooms = np.abs(nib.affines.voxel_sizes(t1.affine))[np.argsort(ornt[:, 0])]
    lo, hi = np.percentile(image[image > 0], [1, 99]) if (image > 0).any() else (0, 1)
    image = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)

    values, colours = _lut(table)
    index = np.zeros(int(max(values.max(), lab.max())) + 1, dtype=np.int64)
    index[values] = np.arange(len(values))
    rgb_lab = colours[index[np.clip(lab, 0, len(index) - 1)]]

    fg = np.argwhere(lab > 0)
    lo_idx, hi_idx = (fg.min(0), fg.max(0)) if len(fg) else (np.zeros(3, int), np.array(lab.shape) - 1)
    fig, axes = plt.subplots(3, slices_per_axis, figsize=(3.2 * slices_per_axis, 9.6))
    names = ("sagittal", "coronal", "axial")
    for axis in range(3):
        positions = np.linspace(lo_idx[axis], hi_idx[axis], slices_per_axis + 2)[1:-1].astype(int)
        for col, pos in enumerate(positions):
            ax = axes[axis, col]
            sl = [slice(None)] * 3
            sl[axis] = pos
            img2d = image[tuple(sl)].T
            lab2d = lab[tuple(sl)].T
            col2d = rgb_lab[tuple(sl)].transpose(1, 0, 2)
            others = [a for a in range(3) if a != axis]
            aspect = zooms[others[1]] / zooms[others[0]]
            ax.imshow(img2d, cmap="gray", origin="lower", aspect=aspect)
            rgba = np.concatenate([col2d, (lab2d > 0)[..., None] * alpha], axis=-1)
            ax.imshow(rgba, origin="lower", aspect=aspect, interpolation="nearest")
            ax.set_title(f"{names[axis]} {pos}", fontsize=8)
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path
