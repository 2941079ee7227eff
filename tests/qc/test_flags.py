"""QC flags: they fire on a misregistered or mislabelled image and stay quiet on a good one."""

from __future__ import annotations

import numpy as np
import pytest

from bids_cadiff.labels import SYNTHSEG32
from bids_cadiff.qc.flags import DEFAULT_REFERENCE, QCReference, load_reference, qc_flags
from bids_cadiff.qc.structures import structure_rows

STRUCTURES = [e.abbreviation for e in SYNTHSEG32.entries[1:]]


def _reference() -> QCReference:
    return QCReference(
        registration_min={"with_skull": 0.3, "brain_only": 0.4},
        uncertainty_max=0.2,
        volume_fraction={a: (0.001, 0.5) for a in STRUCTURES},
        pieces_max={a: 0.1 for a in STRUCTURES},
        structures=STRUCTURES,
        table=STRUCTURES,
        chosen_on={"registration": "test"},
    )


def _good_labels() -> np.ndarray:
    """Every structure of the table as one 4³ block (same volume each)."""
    labels = np.zeros((40, 40, 12), np.int16)
    for i, entry in enumerate(SYNTHSEG32.entries[1:]):
        x, y = (i % 8) * 5, (i // 8) * 5
        labels[x : x + 4, y : y + 4, 4:8] = entry.value
    return labels


def _flags(labels: np.ndarray, **kwargs) -> tuple[dict, list[dict]]:
    rows = structure_rows(labels, np.zeros(labels.shape, np.float32), SYNTHSEG32, 1.0)
    args = {"registration_ncc": 0.6, "brain_only": False, "brain_uncertainty": 0.05,
            "reference": _reference(), **kwargs}
    return qc_flags(rows, **args), rows


def test_a_good_image_passes_with_every_check_listed():
    qc, rows = _flags(_good_labels())
    assert qc["Status"] == "pass" and qc["Flags"] == []
    assert [c["Check"] for c in qc["Checks"]] == [
        "registration", "uncertainty", "volume", "pieces", "missing"]
    assert all(r["flags"] == [] for r in rows)


def test_a_misregistered_image_fails_registration():
    qc, _ = _flags(_good_labels(), registration_ncc=0.1)
    assert qc["Status"] == "fail"
    (flag,) = qc["Flags"]
    assert flag["Check"] == "registration" and flag["Value"] == 0.1
    assert flag["Threshold"] == ">= 0.300" and "orientation" in flag["Reason"]
    # a brain-only image is held to its own minimum
    assert _flags(_good_labels(), registration_ncc=0.35, brain_only=True)[0]["Status"] == "fail"


def test_a_mislabelled_image_fails_on_missing_pieces_and_volume():
    labels = _good_labels()
    labels[labels == 17] = 0  # L-HI missing
    labels[30:34, 30:34, 0:2] = 53  # a detached piece of R-HI (32 voxels beside its 64)
    labels[labels == 10] = 2  # L-thalamus swallowed by L-WM → L-TH missing, L-WM larger
    qc, rows = _flags(labels, reference=QCReference(
        **{**_reference().__dict__, "volume_fraction": {"L-WM": (0.001, 0.05)}}))
    checks = {(f["Check"], f["Structure"]) for f in qc["Flags"]}
    assert ("missing", "L-HI") in checks
    assert ("missing", "L-TH") in checks
    assert ("pieces", "R-HI") in checks
    assert ("volume", "L-WM") in checks
    by = {r["abbreviation"]: r for r in rows}
    assert by["R-HI"]["flags"] == ["pieces"] and "volume" in by["L-WM"]["flags"]
    assert qc["Status"] == "fail"


def test_high_uncertainty_is_flagged():
    qc, _ = _flags(_good_labels(), brain_uncertainty=0.5)
    assert [f["Check"] for f in qc["Flags"]] == ["uncertainty"]


def test_without_a_reference_only_missing_structures_are_checked():
    labels = _good_labels()
    labels[labels == 17] = 0
    qc, _ = _flags(labels, reference=None, registration_ncc=0.0)
    assert [c["Check"] for c in qc["Checks"]] == ["missing"]
    assert [(f["Check"], f["Structure"]) for f in qc["Flags"]] == [("missing", "L-HI")]


def test_the_bundled_reference_covers_the_32_structures():
    if not DEFAULT_REFERENCE.is_file():
        pytest.fail(f"{DEFAULT_REFERENCE} missing: scripts/build_qc_reference.py builds it")
    ref = load_reference()
    assert ref.fits(STRUCTURES) and not ref.fits(STRUCTURES[:4])
    assert set(ref.structures) <= set(STRUCTURES) and len(ref.structures) >= 30
    assert set(ref.volume_fraction) == set(STRUCTURES) - {"CSF"}
    for lo, hi in ref.volume_fraction.values():
        assert 0 < lo < hi < 1
    assert set(ref.chosen_on) >= {"registration", "uncertainty", "volume", "pieces", "missing"}
    assert set(ref.registration_min) == {"with_skull", "brain_only"}
    assert QCReference.from_json(ref.to_json()) == ref


def test_structures_outside_the_reference_list_are_named_and_not_flagged_missing():
    labels = _good_labels()
    labels[labels == 5] = 0  # L-ILV absent, as the shipped model leaves it out
    reference = QCReference(**{**_reference().__dict__,
                               "structures": [a for a in STRUCTURES if a != "L-ILV"],
                               "chosen_on": {"missing": "what the model labels in training"}})
    qc, _ = _flags(labels, reference=reference)
    assert qc["Status"] == "pass"
    (missing,) = [c for c in qc["Checks"] if c["Check"] == "missing"]
    assert "not checked: L-ILV" in missing["Threshold"]
    assert missing["ChosenOn"] == "what the model labels in training"


@pytest.mark.parametrize("zooms, status", [((1.0, 1.0, 1.0), "pass"), ((0.7, 0.7, 0.7), "pass"),
                                           ((1.0, 1.0, 2.0), "pass"), ((1.0, 3.0, 1.0), "fail")])
def test_thick_slices_fail_the_resolution_check(zooms, status) -> None:
    qc = qc_flags([], registration_ncc=1.0, brain_only=False, brain_uncertainty=0.0,
                  reference=None, voxel_size=zooms)
    assert qc["Status"] == status
    assert "resolution" in [c["Check"] for c in qc["Checks"]]
    if status == "fail":
        (flag,) = qc["Flags"]
        assert flag["Check"] == "resolution" and "1 x 3 x 1 mm" in flag["Reason"]
