"""Pairing predictions with references by BIDS entities."""

from __future__ import annotations

from pathlib import Path

from bids_cadiff.evaluation.matching import match_files, parse_bids_name


def test_parse_bids_name() -> None:
    parsed = parse_bids_name("/d/sub-01/ses-pre/anat/sub-01_ses-pre_run-02_desc-aseg_dseg.nii.gz")
    assert parsed is not None
    assert parsed.entities == {"sub": "01", "ses": "pre", "run": "02", "desc": "aseg"}
    assert (parsed.suffix, parsed.extension) == ("dseg", ".nii.gz")
    assert parsed.key() == (("sub", "01"), ("ses", "pre"), ("run", "2"))
    assert parse_bids_name("sub-01_T1w.nii").suffix == "T1w"
    for bad in ("aseg.nii.gz", "sub-01_dseg.mgz", "ses-1_sub-01_dseg.nii.gz", "sub-01_bad_dseg.nii",
                "sub-01_sub-02_dseg.nii.gz", "dseg.nii.gz"):
        assert parse_bids_name(bad) is None, bad


def test_match_ignores_desc_and_reports_leftovers() -> None:
    preds = [
        "p/sub-01/anat/sub-01_desc-cadiff_dseg.nii.gz",
        "p/sub-02/ses-1/anat/sub-02_ses-1_acq-fast_run-1_desc-cadiff_dseg.nii.gz",
        "p/sub-03/anat/sub-03_desc-cadiff_dseg.nii.gz",  # no reference
        "p/sub-01/anat/sub-01_desc-cadiff_probseg.nii.gz",  # wrong suffix
        "p/sub-04/ses-1/anat/sub-04_ses-1_desc-cadiff_dseg.nii.gz",  # ref has no session
    ]
    refs = [
        "r/sub-01/anat/sub-01_desc-aseg_dseg.nii.gz",
        "r/sub-02/ses-1/anat/sub-02_ses-1_acq-fast_run-01_dseg.nii",
        "r/sub-04/anat/sub-04_dseg.nii.gz",
        "r/sub-05/anat/sub-05_dseg.nii.gz",  # no prediction
    ]
    result = match_files(preds, refs)
    assert result.pairs == [
        (Path(preds[0]), Path(refs[0])),
        (Path(preds[1]), Path(refs[1])),
    ]
    assert result.unmatched_predictions == [Path(preds[2]), Path(preds[4])]
    assert result.unmatched_references == [Path(refs[2]), Path(refs[3])]
    assert result.unparsed == [Path(preds[3])]
    assert result.ambiguous == {}


def test_ambiguous_and_desc_filter() -> None:
    preds = [
        "p/sub-01_desc-cadiff_dseg.nii.gz",
        "p/sub-01_desc-other_dseg.nii.gz",
    ]
    refs = ["r/sub-01_desc-aseg_dseg.nii.gz"]
    result = match_files(preds, refs)
    assert result.pairs == []
    key = (("sub", "01"),)
    assert result.ambiguous == {key: [Path(preds[0]), Path(preds[1]), Path(refs[0])]}
    assert result.unmatched_references == []
    result = match_files(preds, refs, pred_desc="cadiff", ref_desc="aseg")
    assert result.pairs == [(Path(preds[0]), Path(refs[0]))]
    assert result.unmatched_predictions == [] and result.ambiguous == {}


def test_match_entities_can_be_narrowed() -> None:
    preds = ["p/sub-01_acq-a_dseg.nii.gz"]
    refs = ["r/sub-01_acq-b_dseg.nii.gz"]
    assert match_files(preds, refs).pairs == []
    assert len(match_files(preds, refs, match_entities=("sub", "ses")).pairs) == 1
