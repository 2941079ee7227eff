#!/usr/bin/env python
"""Pool the per-fold scores of scripts/evaluate_default_model.py into cross-validation tables.

    python scripts/crossval_summary.py artifacts/crossval/fold1.tsv artifacts/crossval/fold2.tsv ...
        [--out artifacts/crossval/scores.tsv]

Each input is one fold's per-subject, per-structure scores (columns method, subject, structure,
dice, nsd, hd95). Prints the class average over the structures per method (mean
and sample standard deviation over the test subjects of all folds, with the number of subjects
and folds each method was scored on) and the per-structure mean ± std, and writes the pooled
scores (with a ``fold`` column) to ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

log = logging.getLogger("crossval_summary")


def pool(paths: list[Path]) -> pd.DataFrame:
    """The folds' scores in one frame, ``fold`` = the file's stem; a subject in two folds is an error."""
    frames = []
    for path in paths:
        frame = pd.read_csv(path, sep="\t", na_values=["n/a"])
        missing = {"method", "subject", "structure", "dice", "nsd"} - set(frame.columns)
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}; expected the TSV written "
                             "by scripts/evaluate_default_model.py --out")
        frames.append(frame.assign(fold=path.stem))
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        raise ValueError(f"two fold files share a name ({', '.join(map(str, paths))}); each fold "
                         "is named by its file name, so give them distinct names")
    pooled = pd.concat(frames, ignore_index=True)
    folds_per_subject = pooled.groupby(["method", "subject"])["fold"].unique()
    twice = folds_per_subject[folds_per_subject.map(len) > 1]
    if len(twice):
        where = "; ".join(f"{m} {s} in {', '.join(f)}" for (m, s), f in twice.items())
        raise ValueError(f"subjects scored in more than one fold: {where}")
    repeated = pooled.duplicated(["method", "subject", "structure"], keep=False)
    if repeated.any():
        first = pooled[repeated].iloc[0]
        raise ValueError(f"{first['fold']}: {first['method']} {first['subject']} {first['structure']} "
                         "is scored more than once; pass each fold's file once")
    return pooled


def _summaries(pooled: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per method, :func:`bids_cadiff.evaluation.report.summary_table` of its rows (subjects as
    images): per-structure mean/std over subjects, then the class-average row ``mean``."""
    from bids_cadiff.evaluation.report import summary_table
    from bids_cadiff.labels import SYNTHSEG32

    value = {e.abbreviation: e.value for e in SYNTHSEG32.entries}
    scores = pooled.rename(columns={"subject": "participant_id"})
    scores = scores.assign(label=scores["structure"].map(value).fillna(-1).astype(int),
                           hd95=scores["hd95"] if "hd95" in scores else float("nan"))
    return {method: summary_table(group) for method, group in scores.groupby("method", sort=False)}


def class_average(pooled: pd.DataFrame) -> pd.DataFrame:
    """Per method: mean and std (ddof=1) over test subjects of the class-average Dice and NSD."""
    rows = {}
    for method, table in _summaries(pooled).items():
        mean = table.set_index("structure").loc["mean"]
        rows[method] = {"dice_mean": mean["dice_mean"], "dice_std": mean["dice_std"],
                        "nsd_mean": mean["nsd_mean"], "nsd_std": mean["nsd_std"],
                        "subjects": int(mean["n"]),
                        "folds": pooled.loc[pooled["method"] == method, "fold"].nunique()}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("method").sort_index()


def per_structure(pooled: pd.DataFrame, order: list[str] | None = None) -> pd.DataFrame:
    """Rows structures, columns (score, statistic, method): mean and std over test subjects."""
    parts = {}
    for method, table in _summaries(pooled).items():
        rows = table[table["structure"] != "mean"].set_index("structure")
        for score in ("dice", "nsd"):
            for stat in ("mean", "std"):
                parts[(score, stat, method)] = rows[f"{score}_{stat}"].astype(float)
    out = pd.DataFrame(parts).sort_index(axis=1)
    out.columns.names = [None, None, "method"]
    out.index.name = "structure"
    return out.reindex(order) if order else out.sort_index()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scores", type=Path, nargs="+", help="one TSV per fold")
    parser.add_argument("--out", type=Path, default=None, help="pooled scores TSV")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for path in args.scores:
        if not path.is_file():
            sys.exit(f"crossval_summary: {path} does not exist; write it with "
                     "scripts/evaluate_default_model.py --out")
    pooled = pool(args.scores)
    order = list(dict.fromkeys(pooled["structure"]))
    print("## Class average over the structures (mean ± std over test subjects)\n")
    print(class_average(pooled).round(3).to_string())
    print("\n## Per structure (mean and std over test subjects)\n")
    print(per_structure(pooled, order).round(3).to_string())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        pooled.to_csv(args.out, sep="\t", index=False, float_format="%.4f", na_rep="n/a")
        log.info("pooled scores of %d folds in %s", len(args.scores), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
