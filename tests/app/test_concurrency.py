"""Eight participant jobs at once into one OUTPUT_DIR, sharing one work dir, as a SLURM array
does; a ninth on a participant another job has; group runs while they work (issue #15).

Guarantees checked: every job succeeds; every output is there, complete and (``--reproducible``,
the same image for odd and for even participants) the same as for the other participants with
the same image; ``dataset_description.json`` and ``desc-cadiff_dseg.tsv`` hold what one job
writes; the two jobs on one participant leave one result (one waits for the other's lock, then
skips the finished image); no lock or temporary file is left; the registration cache holds one
intact entry per distinct image; a group run meanwhile aggregates only finished images.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import time
from pathlib import Path

import pytest

from bids_cadiff.bidsio import derivatives as deriv
from bids_cadiff.cli.run import main
from bids_cadiff.io.atomic import TMP_PREFIX
from bids_cadiff.labels import SYNTHSEG32, LabelTable
from bids_cadiff.registration import ants as ants_mod
from tests.app.conftest import FAST_SUBJECTS, assert_complete, participant_command

TABLE = LabelTable(SYNTHSEG32.entries[:4])
OUTPUTS = ("desc-cadiff_dseg.nii.gz", "desc-cadiff_dseg.json", "desc-cadiff_volumes.tsv",
           "desc-cadiff_qc.tsv", "label-uncertainty_desc-cadiff_probseg.nii.gz",
           "label-uncertainty_desc-cadiff_probseg.json")


def _group_now(inputs, out: Path) -> list[dict[str, str]] | None:
    """One group run (in this process); its rows, or None when nothing was finished yet."""
    code = main([str(inputs["bids"]), str(out), "group", "--no-reports", "--skip-bids-validation"])
    if code == 2:
        return None
    assert code == 0
    lines = deriv.group_volumes_path(out).read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, ln.split("\t"))) for ln in lines[1:]]


@pytest.mark.slow
def test_eight_jobs_one_output_dir(fast_app_inputs, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    jobs = [(sub, participant_command(fast_app_inputs, out, work, sub)) for sub in FAST_SUBJECTS]
    jobs.append(("01", participant_command(fast_app_inputs, out, work, "01")))  # a duplicate
    started = []
    procs = []
    for sub, cmd in jobs:
        started.append(time.time())
        procs.append((sub, subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, text=True)))
    assert max(started) - min(started) < 1.0  # within the same second

    group_runs = []
    while any(p.poll() is None for _, p in procs):
        time.sleep(2.0)
        finished_before = {s for s in FAST_SUBJECTS if deriv.is_finished(out, {"subject": s})}
        rows = _group_now(fast_app_inputs, out)
        if rows is not None:
            group_runs.append((finished_before, rows))
    stderr = [(sub, p.communicate(timeout=60)[1], p.returncode) for sub, p in procs]
    for sub, err, code in stderr:
        assert code == 0, f"sub-{sub}: {err[-3000:]}"

    # every output present, complete, and the same for the same image
    for sub in FAST_SUBJECTS:
        anat = out / f"sub-{sub}" / "anat"
        for name in OUTPUTS:
            assert_complete(anat / f"sub-{sub}_{name}")
        assert_complete(out / f"sub-{sub}" / "figures" / f"sub-{sub}_desc-cadiff_dseg.png")
    for sub in FAST_SUBJECTS[2:]:
        twin = FAST_SUBJECTS[int(sub) % 2 == 0]  # "01" for odd, "02" for even
        for name in ("desc-cadiff_dseg.nii.gz", "label-uncertainty_desc-cadiff_probseg.nii.gz"):
            ours = out / f"sub-{sub}" / "anat" / f"sub-{sub}_{name}"
            theirs = out / f"sub-{twin}" / "anat" / f"sub-{twin}_{name}"
            assert gzip.decompress(ours.read_bytes()) == gzip.decompress(theirs.read_bytes()), (
                sub, name)

    # the dataset-level files: as one job writes them
    description = json.loads(deriv.dataset_description_path(out).read_text())
    assert description == deriv.dataset_description(fast_app_inputs["bids"])
    assert deriv.dseg_tsv_path(out).read_text() == deriv.dseg_tsv_text(TABLE)
    assert deriv.read_dseg_tsv(out) is not None
    assert (out / ".bidsignore").read_text().splitlines() == list(deriv.BIDSIGNORE_PATTERNS)

    # the two jobs on sub-01: one segmented it, the other waited and skipped it
    dup = [err for sub, err, _ in stderr if sub == "01"]
    segmented = ["sub-01_T1w.nii.gz: done (" in err for err in dup]
    assert sorted(segmented) == [False, True], dup[0][-2000:] + dup[1][-2000:]
    other = dup[segmented.index(False)]
    assert "waiting for it" in other or "already done" in other, other[-2000:]

    # nothing left behind, and no job failed because of another
    leftovers = [p.relative_to(out).as_posix() for p in out.rglob(f"{TMP_PREFIX}*")]
    assert not leftovers
    assert not list((out / "logs" / "locks").iterdir())
    assert not deriv.find_error_records(out)
    entries = [p for p in (work / "registration").iterdir()]
    assert len(entries) == 2, entries  # one per distinct image, no temporaries
    for entry in entries:
        ants_mod._check_entry(entry)

    # group runs during the jobs took only finished images (each row's QC from its sidecar)
    for finished_before, rows in group_runs:
        subjects = {r["participant_id"][4:] for r in rows}
        assert finished_before <= subjects
        assert all(r["qc"] != "n/a" for r in rows), rows
    final = _group_now(fast_app_inputs, out)
    assert {r["participant_id"][4:] for r in final} == set(FAST_SUBJECTS)
