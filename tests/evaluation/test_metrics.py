"""Metrics on constructed label maps whose scores are worked out by hand below."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

from bids_cadiff.evaluation.metrics import (
    StructureScores,
    class_average,
    dice_score,
    evaluate_pair,
    nanmean_scores,
    structure_scores,
)

SPACING = (0.5, 1.0, 2.0)

# MONAI 1.6 warns about its own use of a deprecated argument when called directly below.
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")


def _cubes() -> tuple[np.ndarray, np.ndarray]:
    """Reference cube [2:6]^3 (label 1); prediction = same cube moved one voxel along axis 2.

    Shape (9, 10, 11), odd on purpose; the cubes stay off the volume border.
    """
    ref = np.zeros((9, 10, 11), dtype=np.int16)
    ref[2:6, 2:6, 2:6] = 1
    pred = np.zeros_like(ref)
    pred[2:6, 2:6, 3:7] = 1
    return pred, ref


# Hand computation for _cubes() with spacing (0.5, 1, 2) mm.
#
# Dice: each cube has 4*4*4 = 64 voxels; they overlap in k = 3..5, 4*4*3 = 48 voxels.
#   Dice = 2 * 48 / (64 + 64) = 0.75.
#
# Surfaces (voxels with a face neighbour outside the cube): 64 - 2*2*2 interior = 56 each.
# Prediction surface -> reference surface (nearest distance, mm):
#   * k = 6 face (16 voxels): outside the reference; nearest reference surface voxel is the
#     k = 5 face, one voxel along axis 2 -> 2.0 mm.
#   * k = 3 face, interior (i, j in {3, 4}; 4 voxels): inside the reference interior; nearest
#     reference surface is one voxel along axis 0 (i = 2 or 5) -> 0.5 mm
#     (axis 1 would be 1 mm, axis 2 2 mm).
#   * the other 36 prediction surface voxels (k = 3 rim 12, k = 4 rim 12, k = 5 rim 12) are
#     reference surface voxels too -> 0 mm.
# Reference surface -> prediction surface is the mirror image: k = 2 face 16 x 2.0 mm,
# k = 5 face interior 4 x 0.5 mm, 36 x 0 mm.
#
# NSD(tau) = (#{d_PR <= tau} + #{d_RP <= tau}) / (56 + 56):
#   tau = 0.4 mm: (36 + 36) / 112 = 9/14
#   tau = 1.0 mm: (40 + 40) / 112 = 5/7
#   tau = 2.0 mm: 112 / 112 = 1
# HD95: each direction has 56 sorted distances [0]*36 + [0.5]*4 + [2.0]*16; torch.quantile
#   at 0.95 interpolates at position 0.95 * 55 = 52.25, between elements 52 and 53, both 2.0
#   -> 2.0 mm in both directions, HD95 = 2.0 mm.
# Had the spacing been ignored (1 mm isotropic) the k = 3 interior voxels would be 1 voxel
# from i = 2 and the shift 1 mm: HD95 would be 1.0 and NSD(1.0) would be 1.


@pytest.mark.parametrize(
    ("tolerance", "expected_nsd"), [(0.4, 9 / 14), (1.0, 5 / 7), (2.0, 1.0)]
)
def test_shifted_cubes_anisotropic(tolerance: float, expected_nsd: float) -> None:
    pred, ref = _cubes()
    scores = evaluate_pair(pred, ref, labels=[1], spacing=SPACING, nsd_tolerance_mm=tolerance)
    s = scores[1]
    assert s.dice == pytest.approx(0.75)
    assert s.nsd == pytest.approx(expected_nsd, rel=1e-6)
    assert s.hd95 == pytest.approx(2.0)


def test_shift_along_fine_axis() -> None:
    # Same cubes moved along axis 0 (0.5 mm) instead: the moved faces are 0.5 mm apart and
    # every other unmatched surface voxel is 0.5 mm (axis 0) from the other surface, so the
    # distances are [0]*36 + [0.5]*20 each way: NSD(0.4) = 72/112 = 9/14, NSD(0.5) = 1,
    # HD95 = 0.5 (position 52.25 lies among the 0.5s).
    _, ref = _cubes()
    pred = np.zeros_like(ref)
    pred[3:7, 2:6, 2:6] = 1
    s04 = evaluate_pair(pred, ref, labels=[1], spacing=SPACING, nsd_tolerance_mm=0.4)[1]
    s05 = evaluate_pair(pred, ref, labels=[1], spacing=SPACING, nsd_tolerance_mm=0.5)[1]
    assert s04.dice == pytest.approx(0.75)
    assert s04.nsd == pytest.approx(9 / 14, rel=1e-6)
    assert s05.nsd == pytest.approx(1.0)
    assert s04.hd95 == pytest.approx(0.5)


def test_identical_maps_are_perfect() -> None:
    _, ref = _cubes()
    ref = ref.copy()
    ref[6:8, 6:9, 1:10] = 7
    scores = evaluate_pair(ref, ref, labels=[1, 7], spacing=SPACING, nsd_tolerance_mm=0.0)
    for s in scores.values():
        assert (s.dice, s.nsd, s.hd95) == (pytest.approx(1.0), pytest.approx(1.0), 0.0)


def test_absent_structures() -> None:
    pred, ref = _cubes()
    pred = pred.copy()
    ref = ref.copy()
    pred[7, 7, 7] = 3  # label 3 only in the prediction (false alarm)
    ref[7, 8, 8] = 4  # label 4 only in the reference (missed)
    scores = evaluate_pair(pred, ref, labels=[1, 2, 3, 4], spacing=SPACING)
    both_absent = scores[2]
    assert math.isnan(both_absent.dice) and math.isnan(both_absent.nsd)
    assert math.isnan(both_absent.hd95)
    assert not both_absent.is_defined
    for label in (3, 4):
        assert scores[label] == StructureScores(dice=0.0, nsd=0.0, hd95=math.inf)
    assert list(scores) == [1, 2, 3, 4]


def test_class_average_skips_undefined_and_propagates_inf() -> None:
    scores = {
        1: StructureScores(0.8, 0.6, 2.0),
        2: StructureScores(math.nan, math.nan, math.nan),
        3: StructureScores(0.4, 0.2, 4.0),
    }
    avg = class_average(scores)
    assert (avg.dice, avg.nsd, avg.hd95) == pytest.approx((0.6, 0.4, 3.0))
    scores[4] = StructureScores(0.0, 0.0, math.inf)
    avg = class_average(scores)
    assert avg.dice == pytest.approx(0.4)
    assert avg.hd95 == math.inf
    assert math.isnan(nanmean_scores([]).dice)


def test_2d_squares() -> None:
    # Reference square [2:6, 2:6]; prediction moved one pixel along axis 1; spacing (1, 2) mm.
    # Dice = 2 * 12 / 32 = 0.75. Each square has 16 - 4 = 12 edge pixels.
    # Prediction -> reference: column j = 6 (4 px) is 2 mm away (axis 1); column j = 3
    # interior (i in {3, 4}, 2 px) is 1 mm from row i = 2 or 5 (axis 0); the other 6 are on
    # the reference edge (0 mm). Mirror image the other way.
    # NSD(1.0) = (8 + 8) / 24 = 2/3; NSD(0.5) = (6 + 6) / 24 = 1/2.
    # HD95: 12 sorted distances [0]*6 + [1]*2 + [2]*4, position 0.95 * 11 = 10.45 -> 2.0 mm.
    ref = np.zeros((8, 9), dtype=np.int32)
    ref[2:6, 2:6] = 5
    pred = np.zeros_like(ref)
    pred[2:6, 3:7] = 5
    s1 = evaluate_pair(pred, ref, labels=[5], spacing=(1.0, 2.0), nsd_tolerance_mm=1.0)[5]
    s05 = evaluate_pair(pred, ref, labels=[5], spacing=(1.0, 2.0), nsd_tolerance_mm=0.5)[5]
    assert s1.dice == pytest.approx(0.75)
    assert s1.nsd == pytest.approx(2 / 3, rel=1e-6)
    assert s05.nsd == pytest.approx(0.5)
    assert s1.hd95 == pytest.approx(2.0)


def test_structure_touching_the_border() -> None:
    # A structure on the volume edge: the crop margin is clipped, and the result equals
    # MONAI on the whole (uncropped) volume.
    ref = np.zeros((5, 6, 7), dtype=bool)
    ref[0:3, 0:4, 2:7] = True
    pred = np.zeros_like(ref)
    pred[0:4, 1:4, 3:7] = True
    got = structure_scores(pred, ref, spacing=SPACING, nsd_tolerance_mm=0.7)
    full = _monai_full(pred, ref, SPACING, 0.7)
    assert (got.nsd, got.hd95) == pytest.approx(full)
    assert got.dice == pytest.approx(dice_score(pred, ref))


def _monai_full(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], tolerance: float
) -> tuple[float, float]:
    p = torch.from_numpy(pred)[None, None].float()
    r = torch.from_numpy(ref)[None, None].float()
    nsd = compute_surface_dice(p, r, [tolerance], include_background=True, spacing=list(spacing))
    hd = compute_hausdorff_distance(
        p, r, include_background=True, percentile=95, spacing=list(spacing)
    )
    return float(nsd[0, 0]), float(hd[0, 0])


def test_cropping_matches_monai_on_whole_volume() -> None:
    # Random blobs of several labels: per-label cropped scores equal MONAI on the full grid.
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 4, size=(7, 8, 9))
    pred = np.where(rng.random(ref.shape) < 0.2, rng.integers(0, 4, size=ref.shape), ref)
    scores = evaluate_pair(pred, ref, labels=[1, 2, 3], spacing=SPACING, nsd_tolerance_mm=1.0)
    for label, s in scores.items():
        nsd, hd = _monai_full(pred == label, ref == label, SPACING, 1.0)
        assert s.nsd == pytest.approx(nsd)
        assert s.hd95 == pytest.approx(hd)
        assert s.dice == pytest.approx(dice_score(pred == label, ref == label))


def test_inputs_are_not_modified_and_errors_are_clear() -> None:
    pred, ref = _cubes()
    before = pred.copy()
    evaluate_pair(pred, ref, labels=[1], spacing=SPACING)
    np.testing.assert_array_equal(pred, before)
    with pytest.raises(ValueError, match="same shape"):
        evaluate_pair(pred[:-1], ref, labels=[1], spacing=SPACING)
    with pytest.raises(ValueError, match="one value per axis"):
        evaluate_pair(pred, ref, labels=[1], spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="> 0"):
        evaluate_pair(pred, ref, labels=[1], spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="tolerance"):
        evaluate_pair(pred, ref, labels=[1], spacing=SPACING, nsd_tolerance_mm=-1)
    with pytest.raises(ValueError, match="unique"):
        evaluate_pair(pred, ref, labels=[1, 1], spacing=SPACING)
    with pytest.raises(ValueError, match="2D"):
        evaluate_pair(pred[..., None], ref[..., None], labels=[1], spacing=SPACING + (1.0,))
