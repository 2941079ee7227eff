"""Exclusive lock files (``flock``) that a killed process can never leave held.

Two jobs on the same T1w (a SLURM array submitted twice, a rerun started while the first is
still going) must not interleave their outputs. :func:`exclusive_lock` holds an ``flock`` on a
lock file for as long as the block runs:

- The kernel releases an ``flock`` when its holder exits, however it exits (``kill -9``, the
  OOM killer): a lock file left behind by a killed job is not held, and the next job takes it
  at once. (On NFS, a lock of a node that crashed is released when the server's lease
  expires, about 90 seconds for NFSv4.)
- The holder removes the file when it is done. A waiter that had opened the old file checks,
  once it holds the lock, that the path still names the file it locked, and starts again on
  the new one otherwise, so two jobs never hold "the" lock at once.
- A filesystem without ``flock`` (Lustre mounted without ``-o flock``, some FUSE filesystems)
  gives a warning and no lock: every file is still written atomically, so each output is
  complete, but two jobs on the same image may then mix their outputs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

logger = logging.getLogger(__name__)

#: errno values of a filesystem that does not support ``flock``.
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


def holder(path: str | Path) -> str:
    """Who holds (or last held) the lock ``path``, as its holder wrote it: ``host pid``; ``""``
    when unknown."""
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""


@dataclass(frozen=True)
class LockState:
    """What :func:`exclusive_lock` got.

    Attributes:
        held: the lock is held (``False`` only on a filesystem without ``flock``).
        waited: another process held it, and this one waited for it.
    """

    held: bool
    waited: bool


@contextlib.contextmanager
def exclusive_lock(
    path: str | Path, *, on_wait: Callable[[Path], None] | None = None
) -> Iterator[LockState]:
    """Hold an exclusive lock on ``path`` (created, parents too) while the block runs.

    Blocks while another process holds it. The file is removed when the block ends.

    Args:
        path: the lock file.
        on_wait: called once with ``path`` when the lock is held by another process, before
            waiting for it (to log who is waited for).

    Yields:
        :class:`LockState`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    waited = False
    fd = -1
    locked = False
    try:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited and on_wait is not None:
                    on_wait(path)
                waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)  # until the holder is done, or dies
            except OSError as exc:
                if exc.errno not in _NO_LOCKS:
                    raise
                logger.warning("cannot lock %s (%s): this filesystem does not support flock; "
                               "going on without a lock", path, exc.strerror or exc)
                break
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                locked = True
                break
            os.close(fd)  # the previous holder removed the file: lock the new one
            fd = -1
        if locked:
            with contextlib.suppress(OSError):  # who holds it: for messages only (disk full?)
                os.ftruncate(fd, 0)
                os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        yield LockState(held=locked, waited=waited)
    finally:
        if locked:
            with contextlib.suppress(OSError):
                path.unlink()  # before unlocking: a waiter then sees the file is gone
        if fd >= 0:
            os.close(fd)  # releases the lock
