"""The header orientation check: the pure decision on given fits, the header helpers, and the
whole check (ANTs) on a small synthetic head that is mirror-symmetric left to right, as a real
one nearly is."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from bids_cadiff.registration.atlas import AtlasSpec
from bids_cadiff.registration.orientation import (
    CANDIDATES,
    DEFAULT_MARGIN,
    OrientationParams,
    apparent_codes,
    check_orientation,
    corrected_affine,
    decide,
    flip_header,
)

#: The lying headers that reverse A-P and/or S-I (must be flagged) and the one that does not.
DETECTABLE = [name for name, flips in CANDIDATES.items() if any(flips[1:])]
LR_ONLY = "FlipLR"


def _scores(truth: str, good: float = 0.70, bad: float = 0.35, lr_gap: float = 0.01) -> dict:
    """Fits as the check would see them when ``truth`` is the orientation that undoes the
    header: that candidate and its L-R partner fit well, the others badly."""
    target = CANDIDATES[truth]
    out = {}
    for name, flips in CANDIDATES.items():
        if flips[1:] != target[1:]:
            out[name] = bad
        else:
            out[name] = good if flips == target else good - lr_gap
    return out


def test_candidates_are_the_eight_axis_reversals() -> None:
    assert len(CANDIDATES) == 8 and len(set(CANDIDATES.values())) == 8
    assert CANDIDATES["AsGiven"] == (False, False, False)
    # a 180° rotation about an axis reverses the two others
    assert CANDIDATES["Rotate180LR"] == (False, True, True)
    assert CANDIDATES["Rotate180AP"] == (True, False, True)
    assert CANDIDATES["Rotate180SI"] == (True, True, False)


def test_correct_header_is_not_flagged() -> None:
    check = decide(_scores("AsGiven"), "LIA")
    assert not check.flagged and check.best == "AsGiven"
    assert check.margin == pytest.approx(0.35 - 0.70)
    assert check.apparent == ()
    assert "fits the atlas best" in check.message()


@pytest.mark.parametrize("truth", DETECTABLE)
def test_each_ap_or_si_reversal_is_flagged_and_named(truth: str) -> None:
    check = decide(_scores(truth), "RAS")
    assert check.flagged and check.best == truth
    assert check.margin == pytest.approx(0.35)
    true_codes = apparent_codes("RAS", CANDIDATES[truth])
    assert true_codes in check.apparent and len(check.apparent) == 2
    # both readings agree on A-P and S-I, and differ in L-R only
    assert {c[0] for c in check.apparent} == {"R", "L"}
    assert len({c[1:] for c in check.apparent}) == 1
    message = check.message()
    assert "the header says RAS" in message and check.apparent[0] in message
    assert "left and right cannot be told apart" in message and "--overwrite" in message


def test_the_issue_example_lps_header_on_ras_voxels() -> None:
    """Header LPS, voxels RAS: the check sees the image rotated 180° about S-I."""
    check = decide(_scores("Rotate180SI"), "LPS")
    assert check.flagged
    assert check.apparent == ("LAS", "RAS")
    assert "front and back are swapped" in check.message()
    assert "voxel axis 1" in check.message()


def test_left_right_flip_alone_is_never_flagged() -> None:
    # even when the mirrored image fits clearly better: the anatomy cannot tell
    scores = _scores(LR_ONLY, lr_gap=0.2)
    check = decide(scores, "LIA")
    assert not check.flagged
    assert check.left_right_margin == pytest.approx(-0.2)


def test_margin_threshold() -> None:
    near = _scores("FlipSI", good=0.5, bad=0.5 - DEFAULT_MARGIN + 0.01, lr_gap=0.0)
    near["AsGiven"] = near["FlipLR"] = 0.5 - DEFAULT_MARGIN + 0.01
    assert not decide(near, "RAS").flagged  # the S-I flip fits better, by less than the margin
    assert decide(near, "RAS", margin=0.05).flagged


def test_decide_checks_its_input() -> None:
    with pytest.raises(ValueError, match="lack the candidates"):
        decide({"AsGiven": 0.5}, "RAS")
    with pytest.raises(ValueError, match="3 letters"):
        decide(_scores("AsGiven"), "RA")


def test_apparent_codes() -> None:
    assert apparent_codes("LPS", (False, True, False)) == "LAS"
    assert apparent_codes("LIA", (True, False, True)) == "RSA"
    assert apparent_codes("RAS", (False, False, False)) == "RAS"


@pytest.mark.parametrize("name", list(CANDIDATES))
def test_flip_header_mirrors_world_and_corrected_affine_undoes_it(name: str) -> None:
    shape = (30, 40, 20)
    affine = np.eye(4)  # an LIA grid (FreeSurfer's), anisotropic voxels
    affine[:3, :3] = [[-1.2, 0.0, 0.0], [0.0, 0.0, 0.9], [0.0, -1.0, 0.0]]
    affine[:3, 3] = (20.0, -17.0, 31.0)
    lie = flip_header(affine, shape, CANDIDATES[name])
    # same field of view, each reversed world axis mirrored about the volume centre
    corners = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)]).T
    true_world, lie_world = (affine @ corners)[:3], (lie @ corners)[:3]
    np.testing.assert_allclose(np.sort(true_world, axis=1), np.sort(lie_world, axis=1))
    centre = true_world.mean(axis=1, keepdims=True)
    expected = np.where(np.array(CANDIDATES[name])[:, None], 2 * centre - true_world, true_world)
    np.testing.assert_allclose(lie_world, expected, atol=1e-9)
    # what the check would name, and the affine that undoes it (keeping the header's L-R)
    codes = "".join(nib.aff2axcodes(lie))
    assert codes == apparent_codes("LIA", CANDIDATES[name])
    check = decide(_scores(name), codes)
    fixed = corrected_affine(lie, shape, check)
    if check.flagged:
        assert "".join(nib.aff2axcodes(fixed)) in {"LIA", "RIA"}
        keep_lr = flip_header(affine, shape, (CANDIDATES[name][0], False, False))
        np.testing.assert_allclose(fixed, keep_lr, atol=1e-9)
    else:
        np.testing.assert_allclose(fixed, lie)


def test_params_are_checked() -> None:
    with pytest.raises(ValueError, match="one value per level"):
        OrientationParams(iterations=(10,))
    with pytest.raises(ValueError, match="sampling_rate"):
        OrientationParams(sampling_rate=0.0)
    with pytest.raises(ValueError, match="margin"):
        OrientationParams(margin=-0.1)


# --- the whole check on a synthetic head ------------------------------------------------------

SPACING = 4.0
SHAPE = (50, 58, 52)


def _head(*, shift=(0.0, 0.0, 0.0), scale: float = 1.0, skull: bool = True) -> tuple:
    """A head, mirror-symmetric L-R but not A-P or S-I: egg-shaped brain wider at the back,
    cerebellum below the back, ventricles in front of the centre, eyes low in front, a neck.

    Returns:
        ``(data (X, Y, Z) float32, brain mask, RAS affine)`` on a 4 mm grid.
    """
    affine = np.diag([SPACING] * 3 + [1.0])
    affine[:3, 3] = -(np.asarray(SHAPE) - 1) / 2.0 * SPACING
    idx = np.indices(SHAPE, dtype=float).reshape(3, -1)
    world = (affine[:3, :3] @ idx + affine[:3, 3:4]).reshape(3, *SHAPE)
    x, y, z = [(world[i] - shift[i]) / scale for i in range(3)]

    def blob(cx, cy, cz, rx, ry, rz):
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0

    width = 62 + 8 * np.clip(-y / 70, -1, 1)  # wider at the back
    cerebrum = (x / width) ** 2 + (y / 80) ** 2 + ((z - 12) / 58) ** 2 <= 1.0
    cerebellum = blob(0, -52, -38, 46, 22, 16)
    brain = cerebrum | cerebellum
    data = np.where(brain, 70.0, 0.0)
    data[cerebrum & ((x / (width - 12)) ** 2 + (y / 68) ** 2 + ((z - 12) / 46) ** 2 <= 1)] = 110
    data[blob(-9, 14, 16, 5, 22, 9) | blob(9, 14, 16, 5, 22, 9)] = 25.0  # ventricles
    data[blob(0, -52, -38, 8, 10, 8)] = 110.0  # cerebellar white matter
    if skull:
        head = ((x / (width + 20)) ** 2 + (y / 100) ** 2 + ((z - 8) / 80) ** 2 <= 1.0)
        head |= blob(0, -20, -70, 40, 40, 40)  # neck
        shell = head & ~brain
        data = np.where(shell, 30.0, data)
        data = np.where(shell & ~((x / (width + 13)) ** 2 + (y / 93) ** 2
                                  + ((z - 8) / 73) ** 2 <= 1.0), 120.0, data)  # scalp
        data[blob(-32, 78, -18, 12, 12, 12) | blob(32, 78, -18, 12, 12, 12)] = 90.0  # eyes
    return data.astype(np.float32), brain, affine


@pytest.fixture(scope="module")
def head_atlas(tmp_path_factory: pytest.TempPathFactory) -> AtlasSpec:
    folder = tmp_path_factory.mktemp("orientation_atlas")
    data, brain, affine = _head()
    nib.save(nib.Nifti1Image(data, affine), folder / "head.nii.gz")
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), folder / "head_brain.nii.gz")
    return AtlasSpec(name="custom", t1_path=folder / "head.nii.gz",
                     brain_mask_path=folder / "head_brain.nii.gz",
                     brain_mask_source="nonzero voxels of head_brain.nii.gz", has_skull=True,
                     description="synthetic asymmetric head")


@pytest.fixture(scope="module")
def subject() -> nib.Nifti1Image:
    """The head moved and scaled, stored LIA (as FreeSurfer stores it)."""
    data, _, affine = _head(shift=(4.0, -6.0, 3.0), scale=0.93)
    ras = nib.Nifti1Image(data, affine)
    lia = nib.orientations.axcodes2ornt("LIA")
    ornt = nib.orientations.ornt_transform(nib.io_orientation(affine), lia)
    return ras.as_reoriented(ornt)


def _lying(img: nib.Nifti1Image, name: str) -> nib.Nifti1Image:
    return nib.Nifti1Image(np.asanyarray(img.dataobj),
                           flip_header(img.affine, img.shape, CANDIDATES[name]))


def test_check_on_a_synthetic_head(head_atlas: AtlasSpec, subject: nib.Nifti1Image) -> None:
    assert "".join(nib.aff2axcodes(subject.affine)) == "LIA"
    check = check_orientation(subject, head_atlas)  # the app's settings; codes from the image
    assert set(check.scores) == set(CANDIDATES)
    assert not check.flagged, check.scores
    assert check.margin < -DEFAULT_MARGIN
    assert check.left_right_margin == pytest.approx(0.0, abs=0.05)  # symmetric head
    assert check.as_json()["LeftRightDetected"] is False and check.seconds > 0

    rotated = check_orientation(_lying(subject, "Rotate180SI"), head_atlas)
    assert rotated.header_codes == "RIP"
    assert rotated.flagged, rotated.scores
    assert rotated.apparent == ("RIA", "LIA")
    assert rotated.margin > DEFAULT_MARGIN + 0.1


def test_check_flags_a_flipped_top_and_bottom(head_atlas: AtlasSpec,
                                             subject: nib.Nifti1Image) -> None:
    check = check_orientation(_lying(subject, "FlipSI"), head_atlas)
    assert check.header_codes == "LSA" and check.flagged, check.scores
    assert check.apparent == ("LIA", "RIA")
    assert "top and bottom are swapped" in check.message()


def test_left_right_lie_passes(head_atlas: AtlasSpec, subject: nib.Nifti1Image) -> None:
    check = check_orientation(_lying(subject, LR_ONLY), head_atlas)
    assert check.header_codes == "RIA" and not check.flagged


def test_brain_only_image_uses_the_brain_atlas(head_atlas: AtlasSpec) -> None:
    data, _, affine = _head(skull=False, shift=(-3.0, 4.0, 0.0))
    img = nib.Nifti1Image(data, affine)
    assert not check_orientation(img, head_atlas).flagged
    lie = check_orientation(_lying(img, "Rotate180LR"), head_atlas)
    assert lie.brain_only and lie.flagged and lie.apparent == ("RAS", "LAS")
    assert "front and back and top and bottom are swapped" in lie.message()
    assert "reverse voxel axes 1 and 2" in lie.message()


def test_empty_image_is_refused(head_atlas: AtlasSpec) -> None:
    with pytest.raises(ValueError, match="no positive voxel"):
        check_orientation(nib.Nifti1Image(np.zeros(SHAPE, np.float32), np.eye(4)), head_atlas)


def test_second_pass_from_start_pitches_when_nothing_fits(
    head_atlas: AtlasSpec, subject: nib.Nifti1Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A head pitched far from the atlas fits no orientation from the centres of mass: every
    orientation is fitted again from the start pitches, and keeps its better fit."""
    import bids_cadiff.registration.orientation as orientation

    calls: list[tuple[float, ...]] = []
    first = iter(_scores("AsGiven", good=0.3, bad=0.2).values())
    second = iter(_scores("AsGiven", good=0.7, bad=0.35).values())

    def fake_fit(fixed, moving, mask, params, workdir, pitches) -> float:
        calls.append(tuple(pitches))
        return next(first) if tuple(pitches) == (0.0,) else next(second)

    monkeypatch.setattr(orientation, "_fit", fake_fit)
    check = check_orientation(subject, head_atlas)
    assert calls == [(0.0,)] * 8 + [(-25.0, 25.0)] * 8
    assert check.second_pass and check.as_json()["SecondPass"] is True
    assert check.scores["AsGiven"] == 0.7 and not check.flagged

    calls.clear()
    first = iter(_scores("AsGiven").values())  # fits well at once: no second pass
    assert not check_orientation(subject, head_atlas).second_pass
    assert calls == [(0.0,)] * 8
