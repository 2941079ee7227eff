"""The ``orientation`` QC check: a lying header fails QC with a flag that names the
orientation the voxels appear to have; a correct one passes; without a check, nothing is said."""

from __future__ import annotations

from bids_cadiff.qc.flags import CHECKS, qc_flags
from bids_cadiff.registration.orientation import CANDIDATES, DEFAULT_MARGIN, decide


def _check(truth: str, header: str = "LPS"):
    scores = {name: (0.7 if flips[1:] == CANDIDATES[truth][1:] else 0.35)
              for name, flips in CANDIDATES.items()}
    return decide(scores, header)


def _qc(orientation, reference=None) -> dict:
    return qc_flags([], registration_ncc=0.6, brain_only=True, brain_uncertainty=0.05,
                    reference=reference, orientation=orientation)


def test_orientation_is_a_check() -> None:
    assert "orientation" in CHECKS


def test_a_lying_header_fails_qc_naming_the_voxels_orientation() -> None:
    qc = _qc(_check("Rotate180SI"))
    assert qc["Status"] == "fail"
    [flag] = qc["Flags"]
    assert flag["Check"] == "orientation" and flag["Structure"] is None
    assert flag["Value"] == 0.35 and flag["Threshold"] == f"<= {DEFAULT_MARGIN:.2f}"
    assert "the voxels look like LAS (or RAS" in flag["Reason"]
    assert "the header says LPS" in flag["Reason"]
    [entry] = [c for c in qc["Checks"] if c["Check"] == "orientation"]
    assert "left-right flips are not detectable" in entry["Threshold"]
    assert "16 real T1w" in entry["ChosenOn"]


def test_a_correct_header_passes_and_the_check_is_listed() -> None:
    qc = _qc(_check("AsGiven"))
    assert qc["Status"] == "pass" and qc["Flags"] == []
    assert [c["Check"] for c in qc["Checks"]] == ["orientation", "missing"]


def test_without_the_check_nothing_is_said() -> None:
    qc = _qc(None)
    assert qc["Status"] == "pass"
    assert all(c["Check"] != "orientation" for c in qc["Checks"])
