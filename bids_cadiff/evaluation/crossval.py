"""Cross-validation tables: per-fold method comparisons pooled over folds.

A fold table is long format, one row per method, test subject and structure, as written by
``scripts/evaluate_default_model.py --out``::

    method               subject  structure  dice    nsd     hd95
    CA-Diff (skull on)   sub-01   L-WM       0.9312  0.9521  1.0000

:func:`pool` reads fold tables into one frame with a ``fold`` column (the file's stem) and
refuses tables that would count a subject twice. :func:`class_average` and
:func:`per_structure` summarise a pooled (or a single fold's) frame per method through
:func:`bids_cadiff.evaluation.report.summary_table`, the subjects being the images: the mean
and sample standard deviation (``ddof=1``) over test subjects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from bids_cadiff.evaluation.report import summary_table
from bids_cadiff.labels import SYNTHSEG32

__all__ = ["FOLD_COLUMNS", "class_average", "markdown", "per_structure", "pool", "render"]

#: Columns a fold table must have (``hd95`` is optional).
FOLD_COLUMNS = ("method", "subject", "structure", "dice", "nsd")


def pool(paths: Sequence[Path]) -> pd.DataFrame:
    """The fold tables at ``paths`` in one frame, with ``fold`` = each file's stem.

    Raises:
        ValueError: naming the file, when a table lacks :data:`FOLD_COLUMNS`, two files share
            a stem, a (method, subject) is in two folds, or a (method, subject, structure) row
            is repeated.
    """
    frames = []
    for path in paths:
        frame = pd.read_csv(path, sep="\t", na_values=["n/a"])
        missing = set(FOLD_COLUMNS) - set(frame.columns)
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}; expected the TSV written "
                             "by scripts/evaluate_default_model.py --out")
        frames.append(frame.assign(fold=Path(path).stem))
    stems = [Path(p).stem for p in paths]
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


def _summaries(scores: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per method, :func:`summary_table` of its rows (subjects as images)."""
    value = {e.abbreviation: e.value for e in SYNTHSEG32.entries}
    frame = scores.rename(columns={"subject": "participant_id"})
    frame = frame.assign(label=frame["structure"].map(value).fillna(-1).astype(int),
                         hd95=frame["hd95"] if "hd95" in frame else float("nan"))
    return {method: summary_table(group) for method, group in frame.groupby("method", sort=False)}


def class_average(scores: pd.DataFrame) -> pd.DataFrame:
    """Per method (index, sorted): the mean and std over test subjects of each subject's
    class-average Dice and NSD (``dice_mean``, ``dice_std``, ``nsd_mean``, ``nsd_std``), the
    number of ``subjects`` and, for a pooled frame, of ``folds``."""
    return _class_average(scores, _summaries(scores))


def _class_average(scores: pd.DataFrame, summaries: dict[str, pd.DataFrame]) -> pd.DataFrame:
    rows = {}
    for method, table in summaries.items():
        mean = table.set_index("structure").loc["mean"]
        row = {"dice_mean": mean["dice_mean"], "dice_std": mean["dice_std"],
               "nsd_mean": mean["nsd_mean"], "nsd_std": mean["nsd_std"], "subjects": int(mean["n"])}
        if "fold" in scores:
            row["folds"] = scores.loc[scores["method"] == method, "fold"].nunique()
        rows[method] = row
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("method").sort_index()


def per_structure(scores: pd.DataFrame, order: Sequence[str] | None = None) -> pd.DataFrame:
    """Rows structures (in ``order``, else sorted), columns (score, statistic, method): the
    mean and std over test subjects of Dice and NSD."""
    return _per_structure(_summaries(scores), order)


def _per_structure(summaries: dict[str, pd.DataFrame], order: Sequence[str] | None) -> pd.DataFrame:
    parts = {}
    for method, table in summaries.items():
        rows = table[table["structure"] != "mean"].set_index("structure")
        for score in ("dice", "nsd"):
            for stat in ("mean", "std"):
                parts[(score, stat, method)] = rows[f"{score}_{stat}"].astype(float)
    out = pd.DataFrame(parts).sort_index(axis=1)
    out.columns.names = [None, None, "method"]
    out.index.name = "structure"
    return out.reindex(list(order)) if order else out.sort_index()


def _first_seen(scores: pd.DataFrame, order: Sequence[str] | None) -> list[str]:
    """``order``, else the structures in the order they first appear in ``scores``."""
    return list(order) if order else list(dict.fromkeys(scores["structure"]))


def render(scores: pd.DataFrame, order: Sequence[str] | None = None) -> str:
    """The class-average and per-structure tables as text (what the scripts print)."""
    summaries = _summaries(scores)
    return "\n".join([
        "## Class average over the structures (mean ± std over test subjects)\n",
        _class_average(scores, summaries).round(3).to_string(),
        "\n## Per structure (mean and std over test subjects)\n",
        _per_structure(summaries, _first_seen(scores, order)).round(3).to_string(),
    ])


def _pm(mean: float, std: float) -> str:
    """``0.704 ± 0.006``; ``n/a`` for an undefined mean, the bare mean for an undefined std."""
    if pd.isna(mean):
        return "n/a"
    return f"{mean:.3f}" if pd.isna(std) else f"{mean:.3f} ± {std:.3f}"


def markdown(scores: pd.DataFrame, order: Sequence[str] | None = None,
             methods: Sequence[str] | None = None) -> str:
    """The class-average and per-structure tables as Markdown, cells ``mean ± std`` over test
    subjects (for a model card). ``methods`` picks and orders the columns (default: all, sorted).
    """
    summaries = _summaries(scores)
    averages = _class_average(scores, summaries)
    methods = list(methods) if methods else list(averages.index)
    unknown = [m for m in methods if m not in averages.index]
    if unknown:
        raise ValueError(f"methods {unknown} are not in the scores (have {list(averages.index)})")
    order = _first_seen(scores, order)
    folds = "folds" in averages
    lines = ["| method | subjects |" + (" folds |" if folds else "") + " Dice | NSD |",
             "| --- | --- |" + (" --- |" if folds else "") + " --- | --- |"]
    for m in methods:
        a = averages.loc[m]
        lines.append(f"| {m} | {int(a['subjects'])} |" + (f" {int(a['folds'])} |" if folds else "")
                     + f" {_pm(a['dice_mean'], a['dice_std'])} | {_pm(a['nsd_mean'], a['nsd_std'])} |")
    table = _per_structure(summaries, order)
    header = ["structure"] + [f"Dice {m}" for m in methods] + [f"NSD {m}" for m in methods]
    lines += ["", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for structure in order:
        row = table.loc[structure]
        cells = [_pm(row[(score, "mean", m)], row[(score, "std", m)])
                 for score in ("dice", "nsd") for m in methods]
        lines.append(f"| {structure} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
