"""The test-only kill points, and what a write killed before its rename leaves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from bids_cadiff.io.atomic import TMP_PREFIX, atomic_write, remove_stale_temporaries
from bids_cadiff.io.faults import ENV, kill_point

WRITE = textwrap.dedent("""
    import sys
    from bids_cadiff.io.atomic import atomic_write
    atomic_write(sys.argv[1], "new content\\n")
""")


def test_kill_point_does_nothing_unless_named(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    kill_point("write:x.json")
    monkeypatch.setenv(ENV, "write:y.json")
    kill_point("write:x.json")  # another point: still alive


def test_killed_write_keeps_the_old_file_and_its_temporary_is_cleaned(tmp_path):
    target = tmp_path / "sub-01_desc-cadiff_dseg.json"
    target.write_text("old content\n")
    env = {**os.environ, ENV: f"write:{target.name}"}
    proc = subprocess.run([sys.executable, "-c", WRITE, str(target)], env=env, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_text() == "old content\n"  # never a partial or new-but-unrenamed file
    left = [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]
    assert len(left) == 1 and left[0].read_text() == "new content\n"  # complete, not renamed

    # the temporaries of other files, and files that merely look alike, are kept
    other = tmp_path / f"{TMP_PREFIX}sub-01_desc-cadiff_volumes-abcd1234.tsv"
    mine_other_ext = tmp_path / f"{TMP_PREFIX}sub-01_desc-cadiff_dseg-abcd1234.nii.gz"
    user = tmp_path / f"{TMP_PREFIX}sub-01_desc-cadiff_dseg-notes.json"
    for path in (other, mine_other_ext, user):
        path.write_text("x")
    assert remove_stale_temporaries(target) == left
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [target.name, other.name, mine_other_ext.name, user.name])

    atomic_write(target, "rerun\n")
    assert target.read_text() == "rerun\n"


def test_remove_stale_temporaries_of_a_missing_folder(tmp_path):
    assert remove_stale_temporaries(tmp_path / "nope" / "a.json") == []


def test_kill_is_immediate(tmp_path):
    """SIGKILL: nothing after the point runs (no finally, no atexit)."""
    code = textwrap.dedent(f"""
        import atexit, pathlib
        from bids_cadiff.io.faults import kill_point
        atexit.register(lambda: pathlib.Path({str(tmp_path / 'atexit')!r}).touch())
        try:
            kill_point("here")
        finally:
            pathlib.Path({str(tmp_path / 'finally')!r}).touch()
    """)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, ENV: "here"},
                          timeout=60)
    assert proc.returncode == -signal.SIGKILL and time.monotonic() - start < 60
    assert not (tmp_path / "atexit").exists() and not (tmp_path / "finally").exists()
