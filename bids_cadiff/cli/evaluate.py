"""``cadiff-evaluate PRED_DIR REF_DIR``: score predicted label maps against reference ones.

Every ``*_dseg.nii[.gz]`` under ``PRED_DIR`` is paired with the ``*_dseg.nii[.gz]`` under
``REF_DIR`` that has the same BIDS entities and scored per structure of the label table (Dice,
NSD at ``--nsd-tolerance`` mm, HD95 in mm); the summary table is printed on stdout, and with
``--output`` the per-image scores and the summary are written as TSV. Pairing, label values and
grids: see :mod:`bids_cadiff.app.evaluate`, which does the work; this module only parses.

Label tables: ``synthseg32`` (built in; FreeSurfer ``aseg`` values outside it are merged by
:data:`bids_cadiff.labels.ASEG_MERGE`) or a TSV with ``index``/``name`` columns
(:func:`bids_cadiff.bidsio.derivatives.read_label_table_tsv`).

Exit codes: 0 every pair scored; 1 some pairs failed (the others are still scored and
written) or an unexpected error; 2 usage error (one line on stderr: bad option, missing
folder, unreadable label table, no pairs found); 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from bids_cadiff.cli.arguments import existing_dir
from bids_cadiff.cli.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    argparse_exit_code,
    run_with_exit_code,
)
from bids_cadiff.cli.parser import _OneLineParser
from bids_cadiff.cli.run import setup_logging
from bids_cadiff.errors import UsageError
from bids_cadiff.labels import ASEG_MERGE, SYNTHSEG32, LabelTable

logger = logging.getLogger("bids_cadiff.cli")

PROG = "cadiff-evaluate"

#: Built-in label tables by (case-insensitive) name, with the value merge that goes with each.
BUILTIN_TABLES: dict[str, tuple[LabelTable, dict[int, int]]] = {
    "synthseg32": (SYNTHSEG32, ASEG_MERGE),
}


# --------------------------------------------------------------------------- type= validators


def _tolerance(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"NSD tolerance {value!r} is not a number (mm)") from None
    if not (np.isfinite(number) and number >= 0):
        raise argparse.ArgumentTypeError(
            f"NSD tolerance must be a finite number of mm >= 0, got {value!r} (e.g. 1.0)"
        )
    return number


def _output_tsv(value: str) -> Path:
    path = Path(value).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(
            f"--output {value} is a folder; give a file name (e.g. {path / 'scores.tsv'})"
        )
    if not path.name.endswith(".tsv"):
        raise argparse.ArgumentTypeError(f"--output must end in .tsv, got {value}")
    return Path(os.path.abspath(path))


def _labels_table(value: str) -> tuple[LabelTable, dict[int, int]]:
    builtin = BUILTIN_TABLES.get(value.lower())
    if builtin is not None:
        return builtin
    path = Path(value).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(
            f"--labels-table {value!r} is neither a built-in table "
            f"({', '.join(BUILTIN_TABLES)}) nor an existing TSV file"
        )
    from bids_cadiff.bidsio.derivatives import read_label_table_tsv

    try:
        return read_label_table_tsv(path), {}
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The ``cadiff-evaluate`` argument parser (argparse and ``type=`` checks only)."""
    parser = _OneLineParser(
        prog=PROG,
        description=(
            "Score predicted label maps (*_dseg.nii[.gz]) against reference label maps, "
            "matched by BIDS entities: Dice, normalised surface Dice and HD95 per structure."
        ),
    )
    parser.add_argument(
        "pred_dir", type=existing_dir("prediction"), help="folder of predicted *_dseg files"
    )
    parser.add_argument(
        "ref_dir", type=existing_dir("reference"), help="folder of reference *_dseg files"
    )
    parser.add_argument(
        "--labels-table",
        type=_labels_table,
        default="synthseg32",
        metavar="NAME_OR_TSV",
        help="structures to score: a built-in table (synthseg32, the default; FreeSurfer aseg "
        "values outside it are merged) or a TSV with index/name/abbreviation columns",
    )
    parser.add_argument(
        "--nsd-tolerance",
        type=_tolerance,
        default=1.0,
        metavar="MM",
        help="normalised surface Dice tolerance in mm (default: 1.0)",
    )
    parser.add_argument(
        "--output",
        type=_output_tsv,
        metavar="TSV",
        help="write per-image scores here and the summary beside it as *_summary.tsv",
    )
    parser.add_argument(
        "--pred-desc", metavar="LABEL", help="use only predictions with this desc entity"
    )
    parser.add_argument(
        "--ref-desc", metavar="LABEL", help="use only references with this desc entity"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point of ``cadiff-evaluate``.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit code (see the module docstring).
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: usage error (2) or --help (0)
        return argparse_exit_code(exc)
    setup_logging(args.verbose)
    return run_with_exit_code(lambda: _evaluate(args), prog=PROG)


def _evaluate(args: argparse.Namespace) -> int:
    """Run the evaluation the parsed arguments ask for; print the summary; the exit code."""
    from bids_cadiff.app.evaluate import run_evaluation
    from bids_cadiff.evaluation.report import format_table

    table, merge = args.labels_table
    result = run_evaluation(
        pred_dir=args.pred_dir,
        ref_dir=args.ref_dir,
        table=table,
        merge=merge,
        nsd_tolerance_mm=args.nsd_tolerance,
        output=args.output,
        pred_desc=args.pred_desc,
        ref_desc=args.ref_desc,
    )
    if result.summary is None:
        logger.error("no pair could be scored (%d failed)", result.failed)
        return EXIT_FAILURE
    # The result table is this command's output: stdout, deliberately (logs go to stderr).
    # Structures in no image (n = 0) stay in the TSV but would only clutter the terminal.
    shown = result.summary[result.summary["n"] > 0]
    sys.stdout.write(
        f"{len(result.images)} image(s), NSD tolerance {args.nsd_tolerance:g} mm\n"
        f"{format_table(shown)}\n"
    )
    if result.failed:
        logger.error("%d pair(s) could not be scored; see the errors above", result.failed)
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
