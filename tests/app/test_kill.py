"""kill -9 of a participant run at seven moments, then a rerun (issue #15, "Killed runs").

Each run is a real ``bids_cadiff ... participant`` process. It kills itself with SIGKILL at a
named point (:mod:`bids_cadiff.io.faults`: ``CADIFF_TEST_KILL_AT``), which hits moments that
polling from outside cannot (a file complete in its temporary, not yet renamed). After each
kill: the image does not look finished, and every output file that is there is complete. After
the rerun: the outputs are those of an uninterrupted run, bit for bit (``--reproducible``), no
temporary file or lock is left, and the registration cache holds one intact entry.

The damaged-cache cases (truncated or bit-flipped transforms, a damaged ``registration.json``)
are in ``tests/registration/test_cache_integrity.py``.
"""

from __future__ import annotations

import concurrent.futures as cf
import gzip
import json
import shutil
import signal
from pathlib import Path

import pytest

from bids_cadiff.bidsio import derivatives as deriv
from bids_cadiff.io.atomic import TMP_PREFIX
from bids_cadiff.io.faults import ENV
from bids_cadiff.registration import ants as ants_mod
from tests.app.conftest import assert_complete, run_participant

SUBJECT = "01"
ENTITIES = {"subject": SUBJECT}
PREFIX = f"sub-{SUBJECT}"

#: The moments, in the order a run reaches them. Every output file is written the same way
#: (complete in a temporary, then renamed; the sidecar last), so the outputs between the label
#: map and the sidecar are represented by one of them, a JSON file: the volumes table, the
#: uncertainty map, the QC table and the picture were dropped from this list to keep CI short.
KILL_POINTS = [
    "write:dataset_description.json",  # the first file of a run, under the dataset lock
    "write:registration.json",  # the cache entry's metadata, in its temporary folder
    "registration",  # transforms computed, entry not published
    "inference",  # registration published, sampling not started
    f"write:{PREFIX}_desc-cadiff_dseg.nii.gz",  # the first output file of the image
    f"write:{PREFIX}_label-uncertainty_desc-cadiff_probseg.json",
    f"write:{PREFIX}_desc-cadiff_dseg.json",  # the finished mark, last
]

def _without_timings(value: object) -> object:
    """A sidecar's content without the fields that measure the run, not its result
    (``RunTimeSeconds``, ``StageSeconds``, ``Orientation.Seconds``...: any ``*Seconds``)."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if not k.endswith("Seconds")}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def final_files(out: Path) -> dict[str, Path]:
    """The derivative files (relative path → path), without ``logs/`` (one config per run)
    and without temporaries."""
    return {
        p.relative_to(out).as_posix(): p for p in sorted(out.rglob("*"))
        if p.is_file() and not p.relative_to(out).as_posix().startswith("logs/")
        and not p.name.startswith(TMP_PREFIX)
    }


def _content(path: Path) -> object:
    if path.name.endswith(".nii.gz"):
        return gzip.decompress(path.read_bytes())  # header and voxels, bit for bit
    if path.name.endswith(".json"):
        return _without_timings(json.loads(path.read_text()))
    return path.read_bytes()


def assert_same_outputs(out: Path, reference: Path) -> None:
    ours, theirs = final_files(out), final_files(reference)
    assert sorted(ours) == sorted(theirs)
    different = [rel for rel in ours if _content(ours[rel]) != _content(theirs[rel])]
    assert not different, f"differ from the uninterrupted run: {different}"


def temporaries(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob(f"{TMP_PREFIX}*"))


def cache_entries(work: Path) -> list[Path]:
    return [p for p in (work / "registration").iterdir() if not p.name.startswith(".")]


@pytest.fixture(scope="module")
def uninterrupted(fast_app_inputs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    proc = run_participant(fast_app_inputs, root / "out", root / "work", SUBJECT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _kill_and_rerun(inputs, root: Path, point: str) -> dict[str, object]:
    """Run killed at ``point``, note what it left, rerun; returns what the checks need."""
    out, work = root / "out", root / "work"
    killed = run_participant(inputs, out, work, SUBJECT, env={ENV: point})
    left = {
        "code": killed.returncode, "stderr": killed.stderr,
        "finished": deriv.is_finished(out, ENTITIES),
        "files": final_files(out) if out.exists() else {},
        "temporaries": temporaries(out) if out.exists() else [],
    }
    for path in left["files"].values():
        assert_complete(path)  # here: before the rerun rewrites them
    rerun = run_participant(inputs, out, work, SUBJECT)
    return {"killed": left, "rerun": rerun}


@pytest.mark.slow
def test_killed_at_each_moment_then_rerun_gives_the_uninterrupted_outputs(
    fast_app_inputs, uninterrupted, tmp_path
):
    with cf.ThreadPoolExecutor(2) as pool:  # two runs at a time: this machine has 2 cores
        futures = {point: pool.submit(_kill_and_rerun, fast_app_inputs, tmp_path / f"k{i}", point)
                   for i, point in enumerate(KILL_POINTS)}
        results = {point: f.result() for point, f in futures.items()}

    reference = uninterrupted / "out"
    for i, point in enumerate(KILL_POINTS):
        root = tmp_path / f"k{i}"
        out, work = root / "out", root / "work"
        left, rerun = results[point]["killed"], results[point]["rerun"]
        assert left["code"] == -signal.SIGKILL, (point, left["stderr"][-3000:])
        assert not left["finished"], point  # nothing that looks finished
        if point.startswith("write:") and point != "write:registration.json":
            name = point.split(":", 1)[1]
            # killed with that file complete in its temporary, before the rename
            assert not [rel for rel in left["files"] if rel.endswith("/" + name) or rel == name]
            stem = name.split(".")[0]
            assert [t for t in left["temporaries"] if Path(t).name.startswith(
                f"{TMP_PREFIX}{stem}-")], (point, left["temporaries"])

        assert rerun.returncode == 0, (point, rerun.stderr[-3000:])
        assert_same_outputs(out, reference)
        assert not temporaries(out), (point, temporaries(out))  # the rerun removed them
        assert not list((out / "logs" / "locks").iterdir()), point  # and the stale locks
        entries = cache_entries(work)
        assert len(entries) == 1, (point, entries)
        ants_mod._check_entry(entries[0])  # intact
        reused = "reusing cached registration" in rerun.stderr
        assert reused == (KILL_POINTS.index(point) >= KILL_POINTS.index("inference")), point


@pytest.mark.slow
def test_killed_overwrite_does_not_leave_a_finished_looking_mix(
    fast_app_inputs, uninterrupted, tmp_path
):
    """An --overwrite rerun with other settings, killed after its first new file: the image
    must not look finished (the old sidecar with a new label map would); the next run redoes it."""
    out, work = tmp_path / "out", tmp_path / "work"
    shutil.copytree(uninterrupted / "out", out)
    shutil.copytree(uninterrupted / "work", work)
    point = f"write:{PREFIX}_desc-cadiff_volumes.tsv"
    killed = run_participant(fast_app_inputs, out, work, SUBJECT, "--overwrite", "--refine",
                             "none", env={ENV: point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not deriv.is_finished(out, ENTITIES)
    rerun = run_participant(fast_app_inputs, out, work, SUBJECT)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already done" not in rerun.stderr
    assert_same_outputs(out, uninterrupted / "out")
