"""Entry point of the ``bids_cadiff`` command: parse, set up logging and threads, dispatch.

Exit codes: 0 success; 1 unexpected error (logged with its traceback) or failed images (as
returned by the app); 2 usage error (one line on stderr); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from datetime import datetime
from typing import Sequence

from bids_cadiff import CODE_URL, __version__
from bids_cadiff.cli.errors import argparse_exit_code, run_with_exit_code
from bids_cadiff.config import RunConfig

logger = logging.getLogger("bids_cadiff.cli")

PROG = "bids_cadiff"

_LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(verbosity: int) -> None:
    """Log to stderr: ``bids_cadiff`` at INFO (DEBUG with ``-v``), other libraries at WARNING.

    The handler goes on the root logger (``-vv`` also shows PyBIDS' DEBUG messages); calling
    this twice does not duplicate output.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_bids_cadiff", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT, datefmt="%H:%M:%S"))
    handler._bids_cadiff = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    logging.getLogger("bids_cadiff").setLevel(logging.DEBUG if verbosity >= 1 else logging.INFO)
    if verbosity >= 2:
        logging.getLogger("bids").setLevel(logging.DEBUG)


def set_threads(omp_nthreads: int, *, reproducible: bool = False) -> None:
    """Limit torch's intra-op threads and ITK's (ANTs) threads to ``omp_nthreads``.

    torch is imported here, lazily. ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` is set unless the
    user set it: ITK reads nothing else. ``reproducible``: ITK gets one thread whatever the
    user set (multi-threaded ANTs sums its metrics in a varying order). Worker processes set
    their own (participant level).
    """
    # ITK (ANTs registration, N4) reads its thread count only from the environment, once; the
    # CLI owns this process, so it sets the variable here, before antspyx is first imported.
    if reproducible:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
    else:
        os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(omp_nthreads))
    try:
        import torch
    except ImportError:  # group level works without torch
        logger.debug("torch not importable; thread count not set")
        return
    torch.set_num_threads(omp_nthreads)
    logger.debug("torch threads: %d", omp_nthreads)


def record_config(config: RunConfig) -> None:
    """Write the run's configuration to ``OUTPUT_DIR/logs/config-<run id>.toml``."""
    from bids_cadiff.bidsio.derivatives import config_path
    from bids_cadiff.io.atomic import atomic_write

    from bids_cadiff.errors import UsageError

    run_id = f"{datetime.now():%Y%m%d-%H%M%S}_{uuid.uuid4().hex[:8]}"
    try:
        path = atomic_write(config_path(config.output_dir, run_id), config.to_toml())
    except OSError as exc:
        raise UsageError(
            f"cannot write to the output folder {config.output_dir} ({exc.strerror or exc}); "
            "free space there or give another OUTPUT_DIR"
        ) from exc
    logger.info("configuration recorded in %s", path)


def run(config: RunConfig) -> int:
    """Run one analysis level for a parsed configuration; returns the app's exit code."""
    if config.analysis_level == "participant":
        from bids_cadiff.bidsio.query import validate_dataset

        if config.skip_bids_validation:
            logger.info("BIDS validation skipped (--skip-bids-validation)")
        else:
            validate_dataset(config.bids_dir, participant_labels=config.participant_labels)
        set_threads(config.omp_nthreads, reproducible=config.reproducible)
        record_config(config)
        from bids_cadiff.app.participant import run_participant

        return int(run_participant(config))
    if config.output_dir.is_dir():  # else run_group says to run the participant level first
        record_config(config)
    from bids_cadiff.app.group import run_group

    return int(run_group(config))


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The process exit code (see the module docstring). The console script passes it to
        :func:`sys.exit`.
    """
    from bids_cadiff.cli.parser import parse_args

    try:
        config = parse_args(argv)
    except SystemExit as exc:  # argparse: usage error (2) or --help/--version (0)
        return argparse_exit_code(exc)
    setup_logging(config.verbosity)
    logger.info(
        "bids_cadiff %s, %s level, %s -> %s",
        __version__,
        config.analysis_level,
        config.bids_dir,
        config.output_dir,
    )
    logger.debug("configuration:\n%s", config.to_toml())
    return run_with_exit_code(
        lambda: run(config),
        prog=PROG,
        unexpected=(
            "bids_cadiff failed unexpectedly; please report this with the log at "
            f"{CODE_URL}/issues"
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
