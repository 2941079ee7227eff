import numpy as np
import pytest

from bids_cadiff.labels import SYNTHSEG32, Label, LabelTable, aseg_to_table_values


def test_synthseg32_table():
    assert SYNTHSEG32.num_classes == 33 and SYNTHSEG32.values[0] == 0
    assert {2, 3, 17, 41, 42, 53, 24, 60} <= set(SYNTHSEG32.values)
    lab = np.array([[0, 2, 60], [999, 41, 3]])
    idx = SYNTHSEG32.value_to_index(lab)
    assert idx[1, 0] == 0  # unknown value -> background
    np.testing.assert_array_equal(SYNTHSEG32.index_to_value(idx), np.where(lab == 999, 0, lab))
    assert LabelTable.from_list(SYNTHSEG32.to_list()) == SYNTHSEG32


def test_table_validation():
    with pytest.raises(ValueError, match="background"):
        LabelTable((Label(2, "a", "A", "#000000"),))
    with pytest.raises(ValueError, match="unique"):
        LabelTable((Label(0, "bg", "BG", "#000000"), Label(0, "x", "X", "#000000")))


def test_aseg_midline_white_matter_goes_to_its_side():
    aseg = np.zeros((9, 3, 3), np.int32)
    aseg[1:8] = 2  # a "brain" centred at voxel 4
    aseg[2, 1, 1] = 251  # corpus callosum, left of centre (RAS x smaller)
    aseg[6, 1, 1] = 255  # right of centre
    aseg[3, 0, 0] = 77  # WM hypointensity, left
    aseg[5, 2, 2] = 31  # choroid plexus -> background
    aseg[4, 2, 0] = 1000  # cortical parcel, not in the table -> background
    out = aseg_to_table_values(aseg, np.eye(4))
    assert out[2, 1, 1] == 2 and out[6, 1, 1] == 41 and out[3, 0, 0] == 2
    assert out[5, 2, 2] == 0 and out[4, 2, 0] == 0
    # an LAS affine flips which voxels are left
    flipped = aseg_to_table_values(aseg, np.diag([-1.0, 1, 1, 1]))
    assert flipped[2, 1, 1] == 41 and flipped[6, 1, 1] == 2
