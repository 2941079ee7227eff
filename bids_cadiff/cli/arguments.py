"""``type=`` validators shared by the ``cadiff-*`` commands' argument parsers.

Each factory returns a callable for argparse's ``type=``: it converts the string or raises
``argparse.ArgumentTypeError`` with a message that names the option and what to give instead
(argparse turns it into one usage-error line, exit code 2).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable

__all__ = ["existing_dir", "existing_file", "fraction", "positive"]


def existing_dir(what: str) -> Callable[[str], Path]:
    """A folder that exists, as an absolute path; ``what`` names it (``"BIDS"``, ...)."""

    def check(value: str) -> Path:
        path = Path(value).expanduser()
        if not path.is_dir():
            raise argparse.ArgumentTypeError(
                f"{what} folder {'is not a folder' if path.exists() else 'does not exist'}: {value}"
            )
        return Path(os.path.abspath(path))

    check.__name__ = f"{what} folder"
    return check


def existing_file(what: str) -> Callable[[str], Path]:
    """A file that exists, as an absolute path; ``what`` names the option (``"--config"``)."""

    def check(value: str) -> Path:
        path = Path(value).expanduser()
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"{what} file does not exist: {value}")
        return Path(os.path.abspath(path))

    check.__name__ = what
    return check


def positive(kind: type, what: str, *, zero: bool = False) -> Callable[[str], Any]:
    """A number of type ``kind`` (``int`` or ``float``) that is > 0 (>= 0 with ``zero``)."""

    def check(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} {value!r} is not a {kind.__name__}") from None
        if number < 0 or (number == 0 and not zero):
            raise argparse.ArgumentTypeError(
                f"{what} must be {'>= 0' if zero else '> 0'}, got {value!r}"
            )
        return number

    check.__name__ = what
    return check


def fraction(what: str, *, one: bool, example: str) -> Callable[[str], float]:
    """A number in [0, 1] (``one``) or [0, 1); ``example`` is a value to suggest."""

    def check(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} {value!r} is not a number") from None
        if not (0 <= number <= 1 if one else 0 <= number < 1):
            raise argparse.ArgumentTypeError(
                f"{what} must be in [0, 1{']' if one else ')'}, got {value!r} (e.g. {example})"
            )
        return number

    check.__name__ = what
    return check
