"""``cadiff-crossval BIDS_DIR LABELS_DIR OUTPUT_DIR``: k-fold cross-validation and ablation tables.

Trains the ``--config`` recipe (and each ``--ablation`` recipe, merged over it) on k-1 folds,
segments the held-out fold with the app's inference, scores it, runs the multi-atlas baseline on
the same folds, and writes ``table1.tsv`` (method vs multi-atlas) and ``table2.tsv`` (ablations);
see :mod:`bids_cadiff.app.crossval`. Reruns resume unfinished folds and skip finished ones.

Exit codes: 0 done; 1 unexpected error; 2 usage error; 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from bids_cadiff import __version__
from bids_cadiff.cli.arguments import existing_dir, existing_file, positive
from bids_cadiff.cli.errors import EXIT_OK, argparse_exit_code, run_with_exit_code
from bids_cadiff.cli.parser import _OneLineParser
from bids_cadiff.cli.run import setup_logging
from bids_cadiff.errors import UsageError

PROG = "cadiff-crossval"


def build_parser() -> argparse.ArgumentParser:
    """The ``cadiff-crossval`` argument parser."""
    parser = _OneLineParser(
        prog=PROG, allow_abbrev=False,
        description="Cross-validate CA-Diff recipes and the multi-atlas baseline on labelled data.",
    )
    parser.add_argument("bids_dir", type=existing_dir("BIDS"), help="raw BIDS dataset (T1w)")
    parser.add_argument("labels_dir", type=existing_dir("labels"), help="*_dseg derivatives")
    parser.add_argument("output_dir", type=Path, help="where folds, models and tables go")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--config", type=existing_file("--config"), metavar="TOML",
                        help="base recipe (configs/cadiff_3d.toml); the 'CA-Diff' row")
    parser.add_argument("--ablation", nargs="+", type=existing_file("--ablation"), default=[],
                        metavar="TOML", help="variant recipes merged over the base (Table II rows)")
    parser.add_argument("--set", nargs="+", default=[], metavar="TABLE.KEY=VALUE",
                        help="override base recipe values, e.g. training.iterations=1000 "
                        "data.registration=affine (TOML values)")
    parser.add_argument("--name", default="CA-Diff", help="row name of the base recipe")
    parser.add_argument("--folds", type=positive(int, "--folds"), default=3, help="k (3)")
    parser.add_argument("--seed", type=positive(int, "--seed", zero=True), default=0,
                        help="fold split seed")
    parser.add_argument("--nsd-tolerance", type=positive(float, "--nsd-tolerance", zero=True),
                        default=1.0, metavar="MM")
    parser.add_argument("--steps", type=positive(int, "--steps"), help="DDIM steps at test time")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--no-multiatlas", dest="multiatlas", action="store_false",
                        help="skip the multi-atlas baseline")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    return parser


def parse_set(items: Sequence[str]) -> dict[str, dict[str, object]]:
    """``["training.iterations=10"]`` → ``{"training": {"iterations": 10}}`` (TOML values).

    Raises:
        UsageError: an item without ``TABLE.KEY=VALUE`` form.
    """
    import tomllib

    out: dict[str, dict[str, object]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        table, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise UsageError(f"--set {item!r}: use TABLE.KEY=VALUE, e.g. training.iterations=100")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value  # a bare string
        out.setdefault(table, {})[name] = parsed
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cadiff-crossval``."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return argparse_exit_code(exc)
    setup_logging(args.verbose)
    from bids_cadiff.app.crossval import Variant, run_crossval
    from bids_cadiff.app.train import load_recipe, merge_recipes

    def crossval() -> int:
        base = load_recipe(args.config) if args.config else {}
        base = merge_recipes(base, parse_set(args.set))
        variants = [Variant(Path(p).name.split(".")[0], load_recipe(p)) for p in args.ablation]
        tables = run_crossval(
            base, bids_dir=args.bids_dir, labels_dir=args.labels_dir,
            output_dir=Path(os.path.abspath(args.output_dir)), variants=variants,
            base_name=args.name, folds=args.folds, seed=args.seed,
            nsd_tolerance_mm=args.nsd_tolerance, multiatlas=args.multiatlas, steps=args.steps,
            device=args.device, progress=args.progress,
        )
        from bids_cadiff.evaluation.report import format_table

        # The tables are this command's result: stdout (logs go to stderr).
        sys.stdout.write(format_table(tables["table2"]) + "\n")
        return EXIT_OK

    return run_with_exit_code(
        crossval, prog=PROG, interrupted="interrupted; rerun the same command to continue"
    )


if __name__ == "__main__":
    sys.exit(main())
