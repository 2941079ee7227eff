"""Group level: aggregation of per-image volume tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bids_cadiff.app.group import run_group
from bids_cadiff.bidsio import derivatives as d
from bids_cadiff.config import RunConfig
from bids_cadiff.errors import UsageError
from bids_cadiff.labels import SYNTHSEG32


def _config(tmp_path: Path, **kw) -> RunConfig:
    return RunConfig(tmp_path / "raw", tmp_path / "out", "group", work_dir=tmp_path / "w", **kw)


def _write(out: Path, ents: dict, fill: int, *, finished: bool = True) -> None:
    """One image's volume table; ``finished``: also its label map and dseg sidecar (written
    last by the participant level), without a QC entry."""
    lab = np.zeros((9, 10, 11), dtype=np.int16)
    lab[:fill] = 17
    d.write_volumes_tsv(d.volumes_path(out, ents), d.compute_volumes(lab, 1.0, SYNTHSEG32), ents)
    if finished:
        d.save_label_map(d.dseg_path(out, ents), lab, np.eye(4))
        d.write_dseg_sidecar(d.dseg_sidecar_path(out, ents), {})


def test_aggregates_with_only_present_entity_columns(tmp_path):
    out = tmp_path / "out"
    d.write_dseg_tsv(out, SYNTHSEG32)
    _write(out, {"subject": "02", "session": "1"}, 2)
    _write(out, {"subject": "01", "session": "1", "run": "2"}, 1)
    _write(out, {"subject": "01", "session": "2"}, 3)
    assert run_group(_config(tmp_path)) == 0
    lines = d.group_volumes_path(out).read_text().splitlines()
    header = lines[0].split("\t")
    assert header[:3] == ["participant_id", "session_id", "run"]
    assert "acquisition" not in header and header[-2:] == ["TotalBrain", "qc"]
    assert header[3:-2] == [e.abbreviation for e in SYNTHSEG32.entries[1:]]
    rows = [dict(zip(header, ln.split("\t"))) for ln in lines[1:]]
    assert [(r["participant_id"], r["session_id"], r["run"]) for r in rows] == [
        ("sub-01", "ses-1", "2"), ("sub-01", "ses-2", "n/a"), ("sub-02", "ses-1", "n/a")]
    assert rows[0]["L-HI"] == "110.000" and rows[1]["TotalBrain"] == "330.000"
    assert {r["qc"] for r in rows} == {"n/a"}  # no sidecar with a QC entry
    sidecar = json.loads(d.group_volumes_sidecar_path(out).read_text())
    assert set(sidecar) == set(header)
    assert sidecar["L-HI"]["Units"] == "mm^3" and "Left-Hippocampus" in sidecar["L-HI"]["Description"]
    assert sidecar["TotalBrain"]["Units"] == "mm^3"
    assert all("Description" in v for v in sidecar.values())
    assert d.group_report_path(out).is_file()  # reports are on by default


def test_qc_column_comes_from_each_images_sidecar(tmp_path):
    out = tmp_path / "out"
    flags = [{"Check": "volume", "Structure": "L-HI"}, {"Check": "pieces", "Structure": "L-HI"},
             {"Check": "volume", "Structure": "R-HI"}]
    for sub, qc in (("01", {"Status": "pass", "Flags": []}), ("02", {"Status": "fail", "Flags": flags})):
        ents = {"subject": sub}
        _write(out, ents, 2)
        d.write_dseg_sidecar(d.dseg_sidecar_path(out, ents), {"QC": qc})  # replaces the {}
    assert run_group(_config(tmp_path, reports=False)) == 0
    lines = d.group_volumes_path(out).read_text().splitlines()
    assert [ln.split("\t")[-1] for ln in lines] == ["qc", "pass", "fail (volume, pieces)"]
    assert not d.group_report_path(out).exists()  # --no-reports
    assert "fail" in json.loads(d.group_volumes_sidecar_path(out).read_text())["qc"]["Description"]


def test_participant_and_session_selection(tmp_path):
    out = tmp_path / "out"
    _write(out, {"subject": "01"}, 1)
    _write(out, {"subject": "02"}, 1)
    run_group(_config(tmp_path, participant_labels=("02",)))
    lines = d.group_volumes_path(out).read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("sub-02\t")
    assert lines[0].split("\t")[0:2] == ["participant_id", "L-WM"]  # no session column


def test_nothing_to_aggregate(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(UsageError, match="run the participant level first"):
        run_group(_config(tmp_path))
    _write(tmp_path / "out", {"subject": "01"}, 1)
    with pytest.raises(UsageError, match="participant"):
        run_group(_config(tmp_path, participant_labels=("02",)))


def test_missing_output_dir(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        run_group(_config(tmp_path))


def test_unfinished_images_are_left_out(tmp_path, caplog):
    """A participant job that is writing (or was killed) has no dseg sidecar yet: a group run
    meanwhile takes only the finished images, and says so."""
    out = tmp_path / "out"
    _write(out, {"subject": "01"}, 1)
    _write(out, {"subject": "02"}, 2, finished=False)
    assert run_group(_config(tmp_path, reports=False)) == 0
    lines = d.group_volumes_path(out).read_text().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == ["participant_id", "sub-01"]
    assert "1 image(s) left out" in caplog.text and "sub-02_desc-cadiff_volumes.tsv" in caplog.text
    with pytest.raises(UsageError, match="finished image"):
        run_group(_config(tmp_path, participant_labels=("02",)))


def test_corrupt_table_names_file(tmp_path):
    out = tmp_path / "out"
    _write(out, {"subject": "01"}, 1)
    path = d.volumes_path(out, {"subject": "01"})
    path.write_text("participant_id\tL-HI\nsub-01\tabc\n")
    with pytest.raises(UsageError, match=r"sub-01_desc-cadiff_volumes.tsv.*--overwrite"):
        run_group(_config(tmp_path))
