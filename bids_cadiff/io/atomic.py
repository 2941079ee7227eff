"""Atomic file writes: readers see the old file or the complete new one, never a partial one.

The data go to a temporary file in the destination's own directory (so that the final
:func:`os.replace` is a rename within one filesystem), which is flushed, fsynced and then
renamed over the destination. On any failure the temporary file is removed and the
destination is left untouched. A process killed mid-write (SIGKILL runs no cleanup) leaves its
temporary file, never a partial destination; :func:`remove_stale_temporaries` removes such
files where no other process can be writing them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, TextIO, BinaryIO

from bids_cadiff.io.faults import kill_point

logger = logging.getLogger(__name__)

#: Prefix of temporary files; ``.`` hides them from PyBIDS and the BIDS validator.
TMP_PREFIX = ".tmp-"


def _tmp_suffix(path: Path) -> str:
    # Keep the full (possibly double) extension so writers that dispatch on it (nibabel's
    # ``.nii.gz``) behave as for the final name.
    name = path.name
    dot = name.find(".")
    return name[dot:] if dot > 0 else ""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it is renamed to ``path``.

    Use this for writers that want a file name (e.g. ``nibabel.save``).

    Args:
        path: final destination; its parent directory is created if missing.

    Yields:
        A fresh, empty temporary file in the same directory, with the same extension.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> with atomic_path(d / "x.txt") as tmp:
        ...     _ = tmp.write_text("hello")
        >>> (d / "x.txt").read_text(), sorted(p.name for p in d.iterdir())
        ('hello', ['x.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=TMP_PREFIX + path.name.split(".")[0] + "-",
        suffix=_tmp_suffix(path),
        dir=path.parent,
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync_file(tmp)
        # mkstemp creates files 0600; give the result the usual permissions (umask applies).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        kill_point("write:" + path.name)  # tests only: die with the file complete, not renamed
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    logger.debug("wrote %s", path)


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary files that writes of ``path`` left behind (a killed process
    cannot remove its own). Only call it while no other process may be writing ``path``
    (e.g. under the image's lock, :mod:`bids_cadiff.io.locks`): their temporary files are
    named alike.

    Returns:
        the files removed.
    """
    path = Path(path)
    prefix = TMP_PREFIX + path.name.split(".")[0] + "-"
    suffix = _tmp_suffix(path)
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in path.parent.iterdir():
            if entry.name.startswith(prefix) and entry.name.endswith(suffix) and (
                len(entry.name) == len(prefix) + 8 + len(suffix)  # mkstemp's 8 random chars
            ):
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                    removed.append(entry)
    return removed


def atomic_write(
    path: str | Path,
    data: str | bytes | Callable[[Path], object],
    *,
    encoding: str = "utf-8",
) -> Path:
    """Write ``data`` to ``path`` atomically.

    Args:
        path: destination file.
        data: text (written with ``encoding``), bytes, or a callable that is given the
            temporary path and writes the file itself.
        encoding: text encoding for ``str`` data.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        Whatever the write raises; the destination is then unchanged and no temporary file
        remains.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            # newline="" keeps "\n" (TSV/JSON files must not get "\r\n" on any platform).
            with open(tmp, "w", encoding=encoding, newline="") as fh:
                fh.write(data)
        elif isinstance(data, (bytes, bytearray, memoryview)):
            tmp.write_bytes(bytes(data))
        elif callable(data):
            data(tmp)
        else:
            raise TypeError(f"cannot write {type(data).__name__} to {path}")
    return path


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: object) -> Iterator[TextIO | BinaryIO]:
    """Open a temporary file for writing; it replaces ``path`` when the block ends cleanly.

    Args:
        path: destination file.
        mode: ``"w"`` or ``"wb"`` (other modes make no sense for an atomic replace).
        **kwargs: passed to :func:`open` (e.g. ``encoding``, ``newline``).
    """
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_open supports modes 'w'/'wt'/'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as fh:  # type: ignore[call-overload]
            yield fh
