"""bids_cadiff.io.locks: one holder at a time, across processes; a killed holder never blocks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from bids_cadiff.io.locks import exclusive_lock, holder

HOLD = textwrap.dedent("""
    import sys, time
    from bids_cadiff.io.locks import exclusive_lock
    with exclusive_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def _holder_process(lock: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_is_exclusive_and_removed_after(tmp_path):
    lock = tmp_path / "locks" / "a.lock"
    with exclusive_lock(lock) as state:
        assert state.held and not state.waited and lock.is_file()
        assert holder(lock).endswith(str(os.getpid()))
    assert not lock.exists()


def test_waiter_gets_the_lock_when_the_holder_is_done(tmp_path):
    lock = tmp_path / "a.lock"
    proc = _holder_process(lock, 1.0)
    seen: list[Path] = []
    start = time.monotonic()
    with exclusive_lock(lock, on_wait=seen.append) as state:
        assert state.held and state.waited and seen == [lock]
        assert time.monotonic() - start > 0.3
        assert proc.wait(10) == 0  # the holder left its block (and then exits)
        assert holder(lock).endswith(str(os.getpid()))  # the new file is ours
    proc.wait()


def test_killed_holder_does_not_block(tmp_path):
    """kill -9 of the holder: the kernel releases its lock, the file it left is taken over."""
    lock = tmp_path / "a.lock"
    proc = _holder_process(lock, 600)
    got = threading.Event()

    def take() -> None:
        with exclusive_lock(lock):
            got.set()

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    assert not got.wait(0.5)  # held
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert got.wait(10), "the lock of a killed process was not released"
    thread.join(10)
    assert not lock.exists()


def test_stale_lock_file_of_a_killed_job_is_taken_at_once(tmp_path):
    lock = tmp_path / "a.lock"
    lock.write_text("node7 12345\n")  # left by a job killed long ago: nobody holds it
    with exclusive_lock(lock, on_wait=lambda p: (_ for _ in ()).throw(AssertionError)) as state:
        assert state.held and not state.waited
    assert not lock.exists()


def test_no_two_holders_across_removal(tmp_path):
    """Many threads, each its own open file: never two inside at once, even though every
    holder removes the lock file when it leaves."""
    lock = tmp_path / "a.lock"
    inside: list[int] = []
    overlaps: list[int] = []

    def work(i: int) -> None:
        for _ in range(20):
            with exclusive_lock(lock):
                inside.append(i)
                if len(inside) > 1:
                    overlaps.append(i)
                time.sleep(0.001)
                inside.remove(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not overlaps and not lock.exists()


def test_filesystem_without_flock_goes_on_unlocked(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with exclusive_lock(tmp_path / "a.lock") as state:
        assert not state.held and not state.waited
    assert "does not support flock" in caplog.text
