"""Exit codes, and the one place that turns the package's exceptions into them.

Every command (``bids_cadiff``, ``cadiff-train``, ``cadiff-crossval``, ``cadiff-evaluate``)
parses its arguments, then runs its work through :func:`run_with_exit_code`:

* :class:`~bids_cadiff.errors.UsageError`: one line on stderr (``PROG: error: ...``), exit 2;
* any other :class:`~bids_cadiff.errors.CadiffError`: logged without a traceback, exit 1;
* ``KeyboardInterrupt``: logged as a warning, exit 130;
* anything else: logged with its traceback, exit 1.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable

from bids_cadiff.errors import CadiffError, UsageError

logger = logging.getLogger("bids_cadiff.cli")

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "argparse_exit_code",
    "run_with_exit_code",
    "usage_error",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def argparse_exit_code(exc: SystemExit) -> int:
    """The exit code of argparse's ``SystemExit``: 2 for a usage error, 0 for ``--help``."""
    return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE


def usage_error(prog: str, message: str) -> int:
    """Write ``PROG: error: MESSAGE`` as a single line on stderr; returns :data:`EXIT_USAGE`."""
    # The one place besides argparse that writes to stderr directly: a single line, no traceback.
    sys.stderr.write(f"{prog}: error: {' '.join(str(message).split())}\n")
    return EXIT_USAGE


def run_with_exit_code(
    work: Callable[[], int],
    *,
    prog: str,
    interrupted: str = "interrupted",
    unexpected: str | None = None,
) -> int:
    """Run a command's work and map what it raises to an exit code (see the module docstring).

    Args:
        work: the command's body; its return value is the exit code when it raises nothing.
        prog: the program name that starts the usage-error line.
        interrupted: the warning logged on Ctrl-C (e.g. how to resume).
        unexpected: the message logged with the traceback of an unexpected error
            (default ``"PROG failed unexpectedly"``).

    Returns:
        the exit code.
    """
    try:
        return work()
    except UsageError as exc:
        return usage_error(prog, str(exc))
    except CadiffError as exc:  # a known failure: its message says it all, no traceback
        logger.error("%s", exc)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        logger.warning("%s", interrupted)
        return EXIT_INTERRUPTED
    except Exception:  # noqa: BLE001 - last resort: log with traceback, exit 1
        logger.exception("%s", unexpected or f"{prog} failed unexpectedly")
        return EXIT_FAILURE
