"""Exceptions whose messages say what went wrong, where, and what to do about it.

The CLI turns :class:`UsageError` into one line on stderr and exit code 2 (no traceback);
:class:`InputError` fails one image and lets the run go on with the others.
"""

from __future__ import annotations

from pathlib import Path


class CadiffError(Exception):
    """Base class: the message is meant for the user."""


class UsageError(CadiffError):
    """The command line or the datasets it names cannot be used (exit code 2)."""


class _PathError(CadiffError):
    """An error about one file: ``(path, reason)``. Pickles with both (an image fails in a
    worker process and its error is sent back: a plain ``Exception`` pickles only its message,
    which ``__init__(path, reason)`` cannot take, and the unpickling error breaks the whole
    worker pool)."""

    path: Path
    reason: str

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:
        return type(self), (self.path, self.reason)


class InputError(_PathError):
    """One input image (or label map) cannot be processed.

    Args:
        path: the offending file.
        reason: what is wrong with it and, where possible, what to do.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class RegistrationError(InputError):
    """The atlas could not be registered to an image well enough to trust its distance field."""


class CheckpointError(_PathError):
    """A model checkpoint is missing, corrupt, truncated or does not match what it claims.

    Args:
        path: the checkpoint file.
        reason: what is wrong and what to do.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"model checkpoint {self.path}: {reason}")


class OutputError(_PathError):
    """An output could not be written (full disk, quota, permissions); the image's partial
    outputs have been removed.

    Args:
        path: the output folder or file.
        reason: what went wrong and what to do.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"writing {self.path}: {reason}")
