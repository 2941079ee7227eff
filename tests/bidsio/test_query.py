"""find_t1w: selection by participant, session, filters; records and BIDS URIs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bids_cadiff.bidsio.query import T1wRecord, find_t1w, validate_dataset
from bids_cadiff.errors import UsageError

SPEC = {
    "01": [{}, {"run": "02"}],
    "02": {"pre": [{}], "post": [{"acq": "fast", "rec": "norm"}, {"acq": "fast", "run": "1"}]},
}


@pytest.fixture
def dataset(bids_skeleton) -> Path:
    return bids_skeleton(SPEC)


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_finds_every_t1w_sorted_with_entities(dataset):
    before = _snapshot(dataset)
    records = find_t1w(dataset)
    assert [r.path.name for r in records] == sorted(r.path.name for r in records)
    assert len(records) == 5
    by_name = {r.path.name: r for r in records}
    assert by_name["sub-01_run-02_T1w.nii.gz"].entities == {"subject": "01", "run": "02"}
    assert by_name["sub-02_ses-post_acq-fast_rec-norm_T1w.nii.gz"].entities == {
        "subject": "02", "session": "post", "acquisition": "fast", "reconstruction": "norm"}
    assert all(r.path.is_absolute() for r in records)
    assert _snapshot(dataset) == before  # PyBIDS wrote nothing into the dataset


def test_bids_uri():
    rec = T1wRecord(Path("/x/ds/sub-02/ses-pre/anat/sub-02_ses-pre_T1w.nii.gz"),
                    {"subject": "02", "session": "pre"})
    assert rec.bids_uri == "bids:raw:sub-02/ses-pre/anat/sub-02_ses-pre_T1w.nii.gz"
    assert rec.subject == "02" and rec.session == "pre"


def test_participant_and_session_labels_with_prefixes(dataset):
    records = find_t1w(dataset, participant_labels=["sub-02"], session_labels=["ses-post"])
    assert {r.entities["session"] for r in records} == {"post"}
    assert len(records) == 2
    assert len(find_t1w(dataset, participant_labels=["01"])) == 2


def test_unknown_participant_lists_available(dataset):
    with pytest.raises(UsageError, match=r"99.*available: 01, 02"):
        find_t1w(dataset, participant_labels=["99"])


def test_unknown_session_lists_available(dataset):
    with pytest.raises(UsageError, match=r"session.*x.*available: post, pre"):
        find_t1w(dataset, session_labels=["x"])


def test_filters(dataset):
    recs = find_t1w(dataset, bids_filters={"t1w": {"acquisition": "fast"}})
    assert {r.entities["acquisition"] for r in recs} == {"fast"} and len(recs) == 2
    recs = find_t1w(dataset, bids_filters={"t1w": {"acquisition": None}})
    assert all("acquisition" not in r.entities for r in recs) and len(recs) == 3
    recs = find_t1w(dataset, bids_filters={"t1w": {"run": "*"}})
    assert {r.path.name for r in recs} == {"sub-01_run-02_T1w.nii.gz",
                                         "sub-02_ses-post_acq-fast_run-1_T1w.nii.gz"}


@pytest.mark.parametrize("filters, match", [
    ({"bold": {}}, "unknown queries"),
    ({"t1w": {"nonsense": "x"}}, "unknown BIDS entities"),
    ({"t1w": {"subject": "01"}}, "participant-label"),
])
def test_bad_filters(dataset, filters, match):
    with pytest.raises(UsageError, match=match):
        find_t1w(dataset, bids_filters=filters)


def test_filters_matching_nothing(dataset):
    with pytest.raises(UsageError, match="no T1w"):
        find_t1w(dataset, bids_filters={"t1w": {"acquisition": "nope"}})


def test_no_t1w_at_all(bids_skeleton, tmp_path):
    ds = bids_skeleton({"01": []})
    (ds / "sub-01" / "anat").mkdir(parents=True)
    (ds / "sub-01" / "anat" / "sub-01_T2w.nii.gz").write_bytes(b"")
    with pytest.raises(UsageError, match="no T1w"):
        find_t1w(ds)


def test_not_a_dataset(tmp_path):
    with pytest.raises(UsageError, match="dataset_description.json"):
        find_t1w(tmp_path)


def test_derivatives_and_output_dirs_ignored(dataset, make_nifti):
    make_nifti(dataset / "derivatives" / "fmriprep" / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    out = dataset / "derivatives" / "cadiff"
    make_nifti(out / "sub-01" / "anat" / "sub-01_run-9_T1w.nii.gz")
    work = dataset / "work"
    make_nifti(work / "sub-01" / "anat" / "sub-01_run-8_T1w.nii.gz")
    make_nifti(dataset / "sourcedata" / "sub-01" / "anat" / "sub-01_run-7_T1w.nii.gz")
    records = find_t1w(dataset, ignore_dirs=[out, work])
    assert len(records) == 5
    assert all("derivatives" not in r.path.parts and "work" not in r.path.parts for r in records)


def test_validate_dataset_passes(dataset, validator_exe):
    validate_dataset(dataset)


def test_validate_dataset_reports_errors(dataset, validator_exe):
    (dataset / "sub-01" / "anat" / "sub-01_foo.nii.gz").write_bytes(b"")
    with pytest.raises(UsageError, match=r"not valid BIDS.*--skip-bids-validation") as info:
        validate_dataset(dataset)
    assert str(dataset) in str(info.value)


def test_only_the_selected_participants_are_validated(dataset, validator_exe):
    """As fMRIPrep: a broken file of sub-02 stops a run of sub-02 (or of everyone), not one of
    sub-01; participants.tsv listing everyone is not an error of the subset."""
    (dataset / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\n")
    bad = dataset / "sub-02" / "anat" / "sub-02_foo.nii.gz"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"")
    validate_dataset(dataset, participant_labels=["01"])
    with pytest.raises(UsageError, match="not valid BIDS") as info:
        validate_dataset(dataset, participant_labels=["02"])
    assert str(dataset) in str(info.value) and "cadiff-validate" not in str(info.value)
    with pytest.raises(UsageError, match="not valid BIDS"):
        validate_dataset(dataset)
    assert not list(dataset.glob("**/cadiff-validate*"))


def test_validate_without_validator(dataset, monkeypatch, caplog):
    monkeypatch.setattr("bids_cadiff.bidsio.query.find_validator", lambda: None)
    validate_dataset(dataset)
    assert "not found" in caplog.text


def test_contrast_and_echo_entities_keep_outputs_apart(bids_skeleton, tmp_path):
    from bids_cadiff.bidsio.derivatives import dseg_path
    from bids_cadiff.bidsio.query import find_t1w

    raw = bids_skeleton({"01": [{}, {"ce": "gad"}, {"echo": "1"}, {"echo": "2"}]})
    records = find_t1w(raw)
    assert len(records) == 4
    names = {dseg_path(tmp_path, r.entities).name for r in records}
    assert names == {
        "sub-01_desc-cadiff_dseg.nii.gz", "sub-01_ce-gad_desc-cadiff_dseg.nii.gz",
        "sub-01_echo-1_desc-cadiff_dseg.nii.gz", "sub-01_echo-2_desc-cadiff_dseg.nii.gz",
    }


def test_two_files_with_one_output_name_are_a_usage_error(bids_skeleton):
    import gzip

    from bids_cadiff.bidsio.query import find_t1w
    from bids_cadiff.errors import UsageError

    raw = bids_skeleton({"01": [{}]})
    anat = raw / "sub-01" / "anat"
    (anat / "sub-01_T1w.nii").write_bytes(gzip.decompress((anat / "sub-01_T1w.nii.gz").read_bytes()))
    with pytest.raises(UsageError, match="same output name"):
        find_t1w(raw)
