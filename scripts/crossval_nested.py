#!/usr/bin/env python
"""Nested cross-validation tables: per fold, the variant is chosen on the fold's training
subjects, then scored on its test subjects (bids_cadiff.evaluation.crossval.nested_fold).

    python scripts/crossval_nested.py \
        --fold work/cv7/fold1_all.tsv sub-01,sub-02 \
        --fold work/cv7/fold2_all.tsv sub-03,sub-04 \
        --fold work/cv7/fold3_all.tsv sub-05,sub-06,sub-07 \
        --candidates "CA-Diff,CA-Diff + em,CA-Diff + em05" \
        --baseline artifacts/crossval/fold1.tsv ... --out-dir artifacts/crossval

Each ``--fold`` is one fold model's scores on every subject (``scripts/evaluate_default_model.py
--test <all subjects> --refine ...``) and the fold's test subjects. Writes ``foldK.tsv`` per
fold into ``--out-dir``: the test subjects' rows of every candidate, of the chosen one again
(as ``CA-Diff + variant chosen on training subjects``), and the baseline rows of the test
subjects taken from the ``--baseline`` files (for a subject in several, the last file wins).
Pool them with ``scripts/crossval_summary.py``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from bids_cadiff.evaluation.crossval import nested_fold
from bids_cadiff.evaluation.multiatlas import MULTI_ATLAS

log = logging.getLogger("crossval_nested")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fold", nargs=2, action="append", metavar=("SCORES", "TEST"),
                        required=True, help="a fold model's scores on all subjects, and the "
                        "fold's comma-separated test subjects")
    parser.add_argument("--candidates", required=True,
                        help="comma-separated variants (method names without '(skull on|off)')")
    parser.add_argument("--baseline", type=Path, nargs="*", default=[],
                        help=f"TSVs holding {MULTI_ATLAS} rows of the test subjects")
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    baseline = {}
    for path in args.baseline:
        rows = pd.read_csv(path, sep="\t", na_values=["n/a"])
        for subject, group in rows[rows["method"] == MULTI_ATLAS].groupby("subject"):
            baseline[subject] = group
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for k, (scores_path, test_list) in enumerate(args.fold, start=1):
        test = [t.strip() for t in test_list.split(",") if t.strip()]
        scores = pd.read_csv(scores_path, sep="\t", na_values=["n/a"])
        kept, chosen = nested_fold(scores, candidates, test)
        extra = [baseline[s] for s in test if s in baseline]
        for s in test:
            if s not in baseline:
                log.warning("fold %d: no %s rows for %s", k, MULTI_ATLAS, s)
        out = pd.concat([kept, *extra], ignore_index=True)
        dest = args.out_dir / f"fold{k}.tsv"
        out.to_csv(dest, sep="\t", index=False, float_format="%.4f", na_rep="n/a")
        log.info("fold %d (test %s): chosen on the other subjects: %s; wrote %s", k,
                 ", ".join(test), chosen, dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
