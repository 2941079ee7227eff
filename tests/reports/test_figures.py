"""QC figures: layout, orientation, outlines, uncertainty colours, registration outline, writer."""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from bids_cadiff.bidsio.derivatives import FIGURE_KINDS, figure_path
from bids_cadiff.labels import SYNTHSEG32
from bids_cadiff.reports.figures import (
    _outline,
    label_figure,
    registration_figure,
    uncertainty_figure,
    write_figures,
)
from tests.reports.conftest import synthetic_volumes
from tests.reports.test_overlay import _decode_png

TILE = 64


def _coloured(rgb: np.ndarray, margin: int = 30) -> np.ndarray:
    """Pixels that are not grey (channels differ by more than ``margin``)."""
    rgb = rgb.astype(int)
    return (rgb.max(axis=-1) - rgb.min(axis=-1)) > margin


def _tile(rgb: np.ndarray, row: int, col: int, size: int = TILE) -> np.ndarray:
    return rgb[row * size : (row + 1) * size, col * size : (col + 1) * size]


def test_outline_is_the_inner_border_of_each_label():
    plane = np.zeros((7, 8), int)
    plane[1:6, 1:4] = 3
    plane[1:6, 4:7] = 5
    edge = _outline(plane)
    assert not edge[plane == 0].any()  # background is never outlined
    assert not edge[2:5, 2].any() and not edge[2:5, 5].any()  # interiors stay empty
    assert edge[1, 1:7].all() and edge[5, 1:7].all()  # top and bottom borders
    assert edge[2:5, 3].all() and edge[2:5, 4].all()  # both sides of the 3|5 border
    full = np.full((4, 4), 2)
    assert not _outline(full).any()  # the crop's edge is no border


def test_label_figure_layout_and_fill():
    t1, labels, _, _ = synthetic_volumes()
    rgb = label_figure(t1, labels, SYNTHSEG32, slices_per_axis=5, tile=TILE)
    assert rgb.shape == (3 * TILE, 5 * TILE, 3) and rgb.dtype == np.uint8
    middle = _tile(rgb, 1, 2)  # coronal slice through the centre: hippocampus cube, yellow
    yellow = _coloured(middle) & (middle[..., 2].astype(int) < middle[..., 1] - 60)
    assert yellow.sum() > 20
    assert label_figure(t1, labels, SYNTHSEG32, slices_per_axis=3, tile=32).shape == (96, 96, 3)


def test_contours_lie_only_on_label_borders():
    t1, labels, _, _ = synthetic_volumes()
    labels = np.where(labels == 17, 17, 0).astype(np.int16)  # only the cube (yellow)
    filled = _coloured(label_figure(t1, labels, SYNTHSEG32, tile=TILE, alpha=0.6))
    contour = _coloured(label_figure(t1, labels, SYNTHSEG32, tile=TILE, contours=True))
    assert contour.any()
    assert not (contour & ~filled).any()  # nothing drawn outside the label
    # within one voxel (here <= 7 pixels) of the label's border, never in its interior
    interior = ndimage.binary_erosion(filled, iterations=8)
    assert interior.any() and not (contour & interior).any()
    # and the whole border is drawn: the filled region's rim is covered by the outline
    rim = filled & ~ndimage.binary_erosion(filled)
    assert contour[rim].mean() > 0.95


def test_neurological_convention_for_any_storage_order():
    data = np.zeros((20, 24, 18), np.float32)
    data[2:18, 2:22, 2:16] = 100
    labels = np.zeros(data.shape, np.int16)
    labels[3:9, 4:20, 9:15] = 17  # subject's left (small RAS x), superior half
    labels[11:17, 4:20, 3:8] = 2  # right and inferior: near-white, not "coloured"
    lpi = np.diag([-1.0, 1.0, -1.0, 1.0])  # stored left-right and up-down flipped
    img = nib.Nifti1Image(data[::-1, :, ::-1].copy(), lpi)
    rgb = label_figure(img, labels[::-1, :, ::-1], SYNTHSEG32, slices_per_axis=1, tile=TILE)
    coronal = _coloured(_tile(rgb, 1, 0))
    rows, cols = np.nonzero(coronal)
    assert cols.max() < TILE // 2  # left hemisphere drawn on the left
    assert rows.max() < TILE // 2  # superior drawn at the top


def test_uncertainty_zero_leaves_the_t1w_grey():
    t1, labels, _, _ = synthetic_volumes()
    zero = np.zeros(labels.shape, np.float32)
    rgb = uncertainty_figure(t1, zero, tile=TILE, focus=labels > 0)
    assert rgb.shape == (3 * TILE, 5 * TILE + 64, 3)
    assert not _coloured(rgb[:, : 5 * TILE], margin=0).any()  # every montage pixel grey
    assert _coloured(rgb[:, 5 * TILE :]).sum() > 100  # the colour bar


def test_uncertainty_is_coloured_where_high():
    t1, labels, unc, _ = synthetic_volumes()
    high = np.zeros(unc.shape, np.float32)
    high[16:22, 16:22, 16:22] = 0.9
    rgb = uncertainty_figure(t1, high, tile=TILE, focus=labels > 0)
    middle = _coloured(_tile(rgb, 1, 2))
    assert middle.sum() > 20
    assert not _coloured(_tile(rgb, 1, 0)).any()  # slice outside the cube: no colour
    with pytest.raises(ValueError, match="vmax"):
        uncertainty_figure(t1, high, vmax=0.0, tile=TILE)


def test_registration_figure_draws_the_mask_outline_in_red():
    t1, labels, _, mask = synthetic_volumes()
    rgb = registration_figure(t1, mask, tile=TILE)
    assert rgb.shape == (3 * TILE, 5 * TILE, 3)
    red = (rgb[..., 0] > 200) & (rgb[..., 1] < 100) & (rgb[..., 2] < 100)
    coronal = red[TILE : 2 * TILE, 2 * TILE : 3 * TILE]
    rows, cols = np.nonzero(coronal)
    assert coronal.sum() > 50
    centre = TILE // 2
    assert not coronal[centre - 8 : centre + 8, centre - 8 : centre + 8].any()  # only the rim
    assert cols.min() < centre - 10 < centre + 10 < cols.max()  # ring around the centre
    empty = registration_figure(t1, np.zeros_like(mask), tile=TILE, focus=labels > 0)
    assert not ((empty[..., 0] > 200) & (empty[..., 1] < 100)).any()


def test_arrays_must_be_on_the_t1w_grid():
    t1, labels, unc, mask = synthetic_volumes()
    with pytest.raises(ValueError, match=r"labels must be on the T1w's grid.*\(39, 40, 40\)"):
        label_figure(t1, labels[1:], SYNTHSEG32)
    with pytest.raises(ValueError, match="atlas_mask"):
        registration_figure(t1, mask[:, 1:])


def test_write_figures_writes_each_kind_and_removes_stale_ones(tmp_path):
    t1, labels, unc, mask = synthetic_volumes()
    labels = np.where(labels == 17, 17, 0).astype(np.int16)  # coloured labels only
    ents = {"subject": "01", "session": "2"}
    written = write_figures(tmp_path, ents, t1, labels, SYNTHSEG32, unc, mask)
    assert list(written) == list(FIGURE_KINDS)
    for kind, path in written.items():
        assert path == figure_path(tmp_path, ents, kind)
        image = _decode_png(path.read_bytes())
        assert image.shape[0] == 3 * 256 and image.shape[1] in (5 * 256, 5 * 256 + 64)
    # the same slices in every figure: the grey T1w agrees wherever nothing is drawn
    dseg = _decode_png(written["dseg"].read_bytes())
    reg = _decode_png(written["registration"].read_bytes())
    plain = ~_coloured(dseg, 0) & ~_coloured(reg, 0)
    assert plain.mean() > 0.5 and (dseg[plain] == reg[plain]).all()

    again = write_figures(tmp_path, ents, t1, labels, SYNTHSEG32, None, None)
    assert list(again) == ["dseg", "contours"]
    folder = figure_path(tmp_path, ents).parent
    assert sorted(p.name for p in folder.iterdir()) == [
        "sub-01_ses-2_desc-cadiff_contours.png", "sub-01_ses-2_desc-cadiff_dseg.png",
    ]  # stale uncertainty/registration figures gone, no temporary files left


def test_figures_of_a_256_cube_are_fast(tmp_path):
    shape = (256, 256, 256)
    x, y, z = np.ogrid[:256, :256, :256]
    radius2 = (x - 128.0) ** 2 + (y - 120.0) ** 2 + (z - 130.0) ** 2
    t1 = nib.Nifti1Image(np.where(radius2 < 90**2, 300, 20).astype(np.int16), np.eye(4))
    labels = np.where(radius2 < 85**2, 2, 0).astype(np.uint8)
    labels[radius2 < 20**2] = 17
    unc = np.zeros(shape, np.float32)
    unc[100:150, 100:150, 100:150] = 0.3
    mask = radius2 < 88**2
    start = time.perf_counter()
    written = write_figures(tmp_path, {"subject": "01"}, t1, labels, SYNTHSEG32, unc, mask)
    elapsed = time.perf_counter() - start
    assert len(written) == 4
    assert elapsed < 5.0, f"four figures of a 256^3 T1w took {elapsed:.1f} s"


def test_anisotropic_voxels_are_drawn_square():
    zooms = (1.0, 1.0, 3.0)  # a 24 mm cube: 24 x 24 x 8 voxels
    data = np.full((40, 40, 16), 50, np.float32)
    labels = np.zeros(data.shape, np.int16)
    labels[8:32, 8:32, 4:12] = 17
    img = nib.Nifti1Image(data, np.diag([*zooms, 1.0]))
    rgb = label_figure(img, labels, SYNTHSEG32, slices_per_axis=1, tile=TILE)
    for row in (0, 1):  # sagittal and coronal tiles hold the 3 mm axis vertically
        rows, cols = np.nonzero(_coloured(_tile(rgb, row, 0)))
        height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert abs(height - width) <= 2, (row, height, width)
