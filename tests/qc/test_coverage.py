"""The coverage check: labelled brain on a face of the grid means a cut field of view."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from bids_cadiff.labels import SYNTHSEG32
from bids_cadiff.qc.coverage import MAX_FACE_AREA_MM2, face_cuts
from bids_cadiff.qc.flags import qc_flags

ABBREV = SYNTHSEG32.abbreviations


def _brain(shape=(40, 40, 40)) -> np.ndarray:
    """A ball of cortex (3) with a brain-stem (16) running out of the bottom (RAS grid)."""
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    labels = np.zeros(shape, np.int32)
    labels[((grid - centre[:, None, None, None]) ** 2).sum(0) < 15 ** 2] = 3
    labels[18:22, 18:22, :20] = 16
    return labels


def test_a_whole_brain_has_only_the_brain_stem_on_its_edge() -> None:
    labels = _brain()
    assert labels[:, :, 0].max() == 16  # the brain-stem leaves the field of view: normal
    assert face_cuts(labels, np.eye(4), (1, 1, 1), ABBREV) == []


@pytest.mark.parametrize("axcodes", [("R", "A", "S"), ("L", "I", "A"), ("P", "S", "R")])
def test_a_cut_is_measured_in_mm2_and_named_by_its_side_in_the_world(axcodes) -> None:
    ras = _brain()[:, :, 12:]  # the bottom of the ball cut off
    ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                           nib.orientations.axcodes2ornt(axcodes))
    labels = nib.orientations.apply_orientation(ras, ornt)
    affine = _affine(ornt, ras.shape)
    assert nib.aff2axcodes(affine) == axcodes
    cuts = face_cuts(labels, affine, (2.0, 2.0, 2.0), ABBREV)
    assert [c.side for c in cuts] == ["inferior"]  # whatever the voxel order
    assert cuts[0].area_mm2 == pytest.approx(4.0 * np.sum(ras[:, :, 0] == 3))
    assert cuts[0].structures == ("L-CTX",) and cuts[0].flagged


def _affine(ornt: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Voxel-to-world matrix (2 mm) of the RAS array of ``shape`` reoriented by ``ornt``."""
    return np.diag([2.0, 2.0, 2.0, 1.0]) @ nib.orientations.inv_ornt_aff(ornt, shape)


def test_a_small_touch_passes_and_a_large_cut_fails_qc() -> None:
    labels = np.zeros((30, 30, 30), np.int32)
    labels[10:20, 10:20, :15] = 8  # cerebellum cortex on the bottom face, 100 voxels
    small = qc_flags([], registration_ncc=1.0, brain_only=False, brain_uncertainty=0.0,
                     reference=None, coverage=face_cuts(labels, np.eye(4), (1, 1, 1), ABBREV))
    assert small["Status"] == "pass"
    assert [c["Check"] for c in small["Checks"]] == ["coverage", "missing"]
    large = qc_flags([], registration_ncc=1.0, brain_only=False, brain_uncertainty=0.0,
                     reference=None, coverage=face_cuts(labels, np.eye(4), (3, 3, 3), ABBREV))
    assert large["Status"] == "fail"
    (flag,) = large["Flags"]
    assert flag["Check"] == "coverage" and flag["Value"] == 900.0 > MAX_FACE_AREA_MM2
    assert "inferior side" in flag["Reason"] and "L-CBCTX" in flag["Reason"]

