#!/usr/bin/env python
"""Pool the per-fold scores of scripts/evaluate_default_model.py into cross-validation tables.

    python scripts/crossval_summary.py artifacts/crossval/fold1.tsv artifacts/crossval/fold2.tsv ...
        [--out artifacts/crossval/scores.tsv]

Each input is one fold's per-subject, per-structure scores (columns method, subject, structure,
dice, nsd, hd95). Prints the class average over the structures per method (mean
and sample standard deviation over the test subjects of all folds, with the number of subjects
and folds each method was scored on) and the per-structure mean ± std, and writes the pooled
scores (with a ``fold`` column) to ``--out``. ``--markdown`` prints the tables as Markdown
(cells mean ± std; ``--methods`` picks the columns). Each method is also compared with the
``--baseline`` method (default Multi-Atlas) on the subjects both were scored on: the mean ± std
over subjects of the difference in class-average Dice and NSD, on how many subjects it is
higher, and on how many structures its mean Dice is higher. The tables come from
:mod:`bids_cadiff.evaluation.crossval`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from bids_cadiff.evaluation.crossval import markdown, pool, render
from bids_cadiff.evaluation.multiatlas import MULTI_ATLAS

log = logging.getLogger("crossval_summary")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scores", type=Path, nargs="+", help="one TSV per fold")
    parser.add_argument("--out", type=Path, default=None, help="pooled scores TSV")
    parser.add_argument("--markdown", action="store_true",
                        help="print Markdown tables, cells mean ± std (for the model card)")
    parser.add_argument("--methods", default=None,
                        help="with --markdown: comma-separated methods, in column order")
    parser.add_argument("--baseline", default=MULTI_ATLAS,
                        help="method the others are paired with, subject by subject "
                             "(default: %(default)s; skipped when not in the scores)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for path in args.scores:
        if not path.is_file():
            sys.exit(f"crossval_summary: {path} does not exist; write it with "
                     "scripts/evaluate_default_model.py --out")
    pooled = pool(args.scores)
    if args.markdown:
        methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
        print(markdown(pooled, methods=methods, baseline=args.baseline))
    else:
        print(render(pooled, baseline=args.baseline))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        pooled.to_csv(args.out, sep="\t", index=False, float_format="%.4f", na_rep="n/a")
        log.info("pooled scores of %d folds in %s", len(args.scores), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
