"""Cross-validation tables: per-fold method comparisons pooled over folds.

A fold table is long format, one row per method, test subject and structure, as written by
``scripts/evaluate_default_model.py --out``::

    method               subject  structure  dice    nsd     hd95
    CA-Diff (skull on)   sub-01   L-WM       0.9312  0.9521  1.0000

:func:`pool` reads fold tables into one frame with a ``fold`` column (the file's stem) and
refuses tables that would count a subject twice. :func:`class_average` and
:func:`per_structure` summarise a pooled (or a single fold's) frame per method through
:func:`bids_cadiff.evaluation.report.summary_table`, the subjects being the images: the mean
and sample standard deviation (``ddof=1``) over test subjects. :func:`paired` compares each
method with a baseline on the subjects both were scored on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from bids_cadiff.evaluation.report import image_class_averages, summary_table
from bids_cadiff.labels import SYNTHSEG32

__all__ = ["FOLD_COLUMNS", "SELECTED", "class_average", "markdown", "nested_fold", "paired",
           "per_structure", "pool", "render", "select_variant"]

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


#: Method name of the variant chosen inside each fold's training subjects (:func:`nested_fold`).
SELECTED = "CA-Diff + variant chosen on training subjects"


def _variant(method: str) -> tuple[str, str]:
    """``"CA-Diff + em (skull on)"`` -> ``("CA-Diff + em", " (skull on)")``; the suffix is
    empty for a method without one."""
    head, sep, tail = method.rpartition(" (")
    return (head, f" ({tail}") if sep else (method, "")


def select_variant(scores: pd.DataFrame, candidates: Sequence[str], subjects: Sequence[str]) -> str:
    """The candidate method (variant name without its ``(skull on|off)`` suffix) with the
    highest mean class-average Dice over ``subjects`` and every input kind it was scored on;
    ties go to the first candidate.

    Args:
        scores: a fold table that has rows for ``subjects`` (not the fold's test subjects).
        candidates: variant names, e.g. ``["CA-Diff", "CA-Diff + em"]``.
        subjects: the subjects the choice is made on.

    Raises:
        ValueError: a candidate has no rows for these subjects.
    """
    rows = scores[scores["subject"].isin(list(subjects))]
    variants = rows["method"].map(lambda m: _variant(m)[0])
    best, best_score = "", float("-inf")
    for candidate in candidates:
        mine = rows[variants == candidate]
        if mine.empty:
            raise ValueError(f"no scores of {candidate!r} on {', '.join(subjects)}")
        per_image = mine.groupby(["method", "subject"])["dice"].mean()
        if float(per_image.mean()) > best_score:
            best, best_score = candidate, float(per_image.mean())
    if not best:
        raise ValueError(f"no defined Dice for any of {list(candidates)} on {', '.join(subjects)}")
    return best


def nested_fold(
    scores: pd.DataFrame, candidates: Sequence[str], test: Sequence[str]
) -> tuple[pd.DataFrame, str]:
    """One fold of a nested comparison: the variant is chosen on the fold's other subjects
    (:func:`select_variant`), then only the test subjects' rows are kept, every candidate's
    and the chosen one's again under :data:`SELECTED`.

    The other subjects are the fold model's training subjects, which it has fitted: the
    choice is free of the test subjects but leans towards variants that trust the model
    (e.g. its plain argmax) more than unseen subjects would reward.

    Args:
        scores: the fold model's scores on every subject (test and training).
        candidates: the variants to choose from.
        test: the fold's test subjects (they take no part in the choice).

    Returns:
        ``(test rows, chosen variant)``.

    Raises:
        ValueError: no subject besides the test subjects, or a test subject without rows.
    """
    others = sorted(set(scores["subject"]) - set(test))
    if not others:
        raise ValueError("no subject besides the test subjects to choose on")
    missing = sorted(set(test) - set(scores["subject"]))
    if missing:
        raise ValueError(f"test subjects without scores: {', '.join(missing)}")
    chosen = select_variant(scores, candidates, others)
    kept = scores[scores["subject"].isin(list(test))]
    kept = kept[kept["method"].map(lambda m: _variant(m)[0]).isin(list(candidates))]
    picked = kept[kept["method"].map(lambda m: _variant(m)[0]) == chosen]
    picked = picked.assign(method=picked["method"].map(lambda m: SELECTED + _variant(m)[1]))
    return pd.concat([kept, picked], ignore_index=True), chosen


def _by_method(scores: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per method, its rows as a :mod:`bids_cadiff.evaluation.report` scores table (subjects
    as images: ``participant_id``; FreeSurfer ``label`` values; ``hd95`` NaN where absent)."""
    value = {e.abbreviation: e.value for e in SYNTHSEG32.entries}
    frame = scores.rename(columns={"subject": "participant_id"})
    frame = frame.assign(label=frame["structure"].map(value).fillna(-1).astype(int),
                         hd95=frame["hd95"] if "hd95" in frame else float("nan"))
    return dict(tuple(frame.groupby("method", sort=False)))


def _summaries(scores: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per method, :func:`summary_table` of its rows (subjects as images)."""
    return {method: summary_table(group) for method, group in _by_method(scores).items()}


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


def paired(scores: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Each other method against ``baseline`` on the test subjects both were scored on.

    Per method (index, sorted): ``subjects`` (the shared ones), ``baseline_dice`` (the
    baseline's mean class-average Dice on them), ``dice_diff_mean`` and ``dice_diff_std``
    (method minus baseline, per subject's class average; std over subjects, ``ddof=1``),
    ``dice_wins`` (subjects where the method is higher), the same four for NSD, and
    ``structures_dice_higher`` (structures whose mean Dice over the shared subjects is higher).

    Raises:
        ValueError: when ``baseline`` is not a method in ``scores``.
    """
    tables = _by_method(scores)
    if baseline not in tables:
        raise ValueError(f"baseline {baseline!r} is not in the scores (have {list(tables)})")
    # each subject's class average, as summary_table's class-average row averages them
    per_subject = {method: image_class_averages(table) for method, table in tables.items()}
    per_structure = scores.groupby(["method", "subject", "structure"])["dice"].mean()
    base, base_structures = per_subject[baseline], per_structure.loc[baseline]
    rows = {}
    for method in sorted(m for m in tables if m != baseline):
        subjects = per_subject[method].index.intersection(base.index)
        if subjects.empty:
            continue
        row: dict[str, float | int] = {"subjects": len(subjects),
                                       "baseline_dice": base.loc[subjects, "dice"].mean()}
        for score in ("dice", "nsd"):
            diff = per_subject[method].loc[subjects, score] - base.loc[subjects, score]
            row.update({f"{score}_diff_mean": diff.mean(), f"{score}_diff_std": diff.std(),
                        f"{score}_wins": int((diff > 0).sum())})
        mine = per_structure.loc[method].loc[list(subjects)].groupby("structure").mean()
        theirs = base_structures.loc[list(subjects)].groupby("structure").mean()
        row["structures_dice_higher"] = int((mine - theirs.reindex(mine.index) > 0).sum())
        rows[method] = row
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("method")


def _first_seen(scores: pd.DataFrame, order: Sequence[str] | None) -> list[str]:
    """``order``, else the structures in the order they first appear in ``scores``."""
    return list(order) if order else list(dict.fromkeys(scores["structure"]))


def render(scores: pd.DataFrame, order: Sequence[str] | None = None,
           baseline: str | None = None) -> str:
    """The class-average and per-structure tables as text (what the scripts print), and the
    :func:`paired` comparison with ``baseline`` when it is one of the methods."""
    summaries = _summaries(scores)
    parts = ["## Class average over the structures (mean ± std over test subjects)\n",
             _class_average(scores, summaries).round(3).to_string()]
    table = paired(scores, baseline) if baseline in set(scores["method"]) else pd.DataFrame()
    if not table.empty:
        parts += [f"\n## Paired with {baseline} on the same test subjects (method minus {baseline})\n",
                  table.round(3).to_string()]
    parts += ["\n## Per structure (mean and std over test subjects)\n",
              _per_structure(summaries, _first_seen(scores, order)).round(3).to_string()]
    return "\n".join(parts)


def _pm(mean: float, std: float) -> str:
    """``0.704 ± 0.006``; ``n/a`` for an undefined mean, the bare mean for an undefined std."""
    if pd.isna(mean):
        return "n/a"
    return f"{mean:.3f}" if pd.isna(std) else f"{mean:.3f} ± {std:.3f}"


def markdown(scores: pd.DataFrame, order: Sequence[str] | None = None,
             methods: Sequence[str] | None = None, baseline: str | None = None) -> str:
    """The class-average and per-structure tables as Markdown, cells ``mean ± std`` over test
    subjects (for a model card). ``methods`` picks and orders the columns (default: all, sorted).
    With a ``baseline`` that is one of the methods, a :func:`paired` table of the other listed
    methods against it follows the class averages.
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
    if baseline is not None and baseline in averages.index:
        lines += ["", *_paired_markdown(paired(scores, baseline), baseline,
                                        [m for m in methods if m != baseline])]
    table = _per_structure(summaries, order)
    header = ["structure"] + [f"Dice {m}" for m in methods] + [f"NSD {m}" for m in methods]
    lines += ["", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for structure in order:
        row = table.loc[structure]
        cells = [_pm(row[(score, "mean", m)], row[(score, "std", m)])
                 for score in ("dice", "nsd") for m in methods]
        lines.append(f"| {structure} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _paired_markdown(table: pd.DataFrame, baseline: str, methods: Sequence[str]) -> list[str]:
    """Rows of the Markdown :func:`paired` table for ``methods`` (those scored with ``baseline``)."""
    lines = [f"| method | subjects | {baseline} Dice on them | Dice difference | subjects higher (Dice) "
             "| NSD difference | subjects higher (NSD) | structures with higher Dice |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in (m for m in methods if m in table.index):
        r = table.loc[m]
        n = int(r["subjects"])
        lines.append(f"| {m} | {n} | {r['baseline_dice']:.3f} "
                     f"| {_signed(r['dice_diff_mean'])} ± {r['dice_diff_std']:.3f} | {int(r['dice_wins'])} of {n} "
                     f"| {_signed(r['nsd_diff_mean'])} ± {r['nsd_diff_std']:.3f} | {int(r['nsd_wins'])} of {n} "
                     f"| {int(r['structures_dice_higher'])} |")
    return lines


def _signed(value: float) -> str:
    """``+0.031``; a difference that rounds to zero is ``+0.000``, never ``-0.000``."""
    return f"{round(float(value), 3) + 0.0:+.3f}"
