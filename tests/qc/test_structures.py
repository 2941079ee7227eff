"""Per-structure QC measurements."""

from __future__ import annotations

import numpy as np
import pytest

from bids_cadiff.labels import SYNTHSEG32
from bids_cadiff.qc.structures import QC_COLUMNS, pieces_fraction, structure_rows, structure_uncertainty


def _two_structures() -> np.ndarray:
    labels = np.zeros((20, 20, 20), np.int16)
    labels[2:10, 2:10, 2:10] = 2  # L-WM, 512 voxels
    labels[12:15, 12:15, 12:15] = 17  # L-HIP, 27 voxels
    return labels


def test_rows_give_volumes_fractions_and_soft_volumes_in_table_order():
    labels = _two_structures()
    rows = structure_rows(labels, np.zeros(labels.shape, np.float32), SYNTHSEG32, 2.0,
                          soft_counts={2: 500.5, 17: 30.0})
    assert [r["abbreviation"] for r in rows] == [e.abbreviation for e in SYNTHSEG32.entries[1:]]
    by = {r["abbreviation"]: r for r in rows}
    assert by["L-WM"]["volume_mm3"] == 1024 and by["L-HI"]["volume_mm3"] == 54
    assert by["L-WM"]["volume_fraction"] == pytest.approx(512 / 539)
    assert by["L-WM"]["volume_soft_mm3"] == pytest.approx(1001)
    assert by["L-WM"]["volume_sd_mm3"] is None  # one sample
    assert by["L-WM"]["uncertainty"] == 0 and by["L-WM"]["outside_largest_piece"] == 0
    assert by["R-WM"]["volume_mm3"] == 0 and by["R-WM"]["uncertainty"] is None
    assert set(rows[0]) == set(QC_COLUMNS)


def test_uncertainty_counts_the_structure_and_its_outer_shell():
    labels = _two_structures()
    unc = np.zeros(labels.shape, np.float32)
    unc[11, 13, 13] = 1.0  # just outside the hippocampus cube: in its shell
    unc[0, 0, 0] = 1.0  # far from both
    by = {r["abbreviation"]: r for r in structure_rows(labels, unc, SYNTHSEG32, 1.0)}
    shell = 27 + 6 * 9  # the cube plus one voxel on each face
    assert by["L-HI"]["uncertainty"] == pytest.approx(1 / shell)
    assert by["L-WM"]["uncertainty"] == 0
    m = labels == 17
    assert structure_uncertainty(m, unc) == pytest.approx(1 / shell)


def test_volume_spread_over_samples():
    labels = _two_structures()
    samples = [{2: 1000.0}, {2: 1010.0}, {2: 990.0}]
    by = {r["abbreviation"]: r for r in structure_rows(
        labels, np.zeros(labels.shape, np.float32), SYNTHSEG32, 1.0, sample_volumes=samples)}
    assert by["L-WM"]["volume_sd_mm3"] == pytest.approx(10.0)
    assert by["L-HI"]["volume_sd_mm3"] == 0


def test_pieces_fraction_counts_what_lies_outside_the_largest_piece():
    m = np.zeros((10, 10, 10), bool)
    m[0:3, 0:3, 0:3] = True  # 27
    m[6, 6, 6] = True  # 1, not touching
    assert pieces_fraction(m) == pytest.approx(1 / 28)
    m[3, 3, 3] = True  # diagonal neighbour of the cube: 26-connected
    assert pieces_fraction(m) == pytest.approx(1 / 29)
    assert pieces_fraction(np.zeros((3, 3, 3), bool)) == 0
