"""Tables of evaluation scores: per image and structure, a summary, and a terminal rendering.

The per-image table (:func:`scores_table`) is long format, one row per image and structure::

    participant_id  session_id  run  structure  label  dice  nsd   hd95
    sub-01          ses-1       1    L-WM       2      0.95  0.97  1.0

``session_id`` and the other entity columns (``acq``, ``ce``, ``rec``, ``run``) appear only
when some image has them. ``participant_id``/``session_id`` carry their ``sub-``/``ses-``
prefixes, as in BIDS ``participants.tsv``/``sessions.tsv``. Structures in neither map have
NaN scores, written ``n/a``; HD95 of a structure in one map only is ``inf``
(see :mod:`bids_cadiff.evaluation.metrics`).

The summary (:func:`summary_table`) has one row per structure and a last row ``mean`` for the
class average. For each score it gives the mean and sample standard deviation (``ddof=1``;
``n/a`` for one image) over the images where the structure is in at least one map (``n``
counts them). HD95 mean and std are over finite values only; ``hd95_n_inf`` counts the images
where the structure was in one map only (Dice 0 there, which the Dice mean does include). The
``mean`` row summarises each image's class average (mean over its structures present in
either map) the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from bids_cadiff.evaluation.metrics import StructureScores

__all__ = [
    "ENTITY_COLUMNS",
    "ImageScores",
    "format_table",
    "image_class_averages",
    "scores_table",
    "summary_table",
    "summary_path",
    "write_tsv",
]

#: BIDS entity -> column name, in column order.
ENTITY_COLUMNS: dict[str, str] = {
    "sub": "participant_id",
    "ses": "session_id",
    "acq": "acq",
    "ce": "ce",
    "rec": "rec",
    "run": "run",
}
_PREFIXED = {"sub", "ses"}
SCORE_COLUMNS = ("dice", "nsd", "hd95")
CLASS_AVERAGE = "mean"


@dataclass(frozen=True)
class ImageScores:
    """Scores of one predicted image.

    Attributes:
        entities: BIDS entities of the image, e.g. ``{"sub": "01", "ses": "1"}``; keys outside
            :data:`ENTITY_COLUMNS` are ignored.
        scores: ``{label value: StructureScores}`` from
            :func:`~bids_cadiff.evaluation.metrics.evaluate_pair`.
    """

    entities: Mapping[str, str]
    scores: Mapping[int, StructureScores]


def scores_table(images: Sequence[ImageScores], abbreviations: Mapping[int, str]) -> pd.DataFrame:
    """One row per image and structure.

    Args:
        images: the scored images, in the order wanted in the table.
        abbreviations: ``{label value: abbreviation}`` for the ``structure`` column; a value
            not in it is written as its number.

    Returns:
        Columns: present entity columns, ``structure``, ``label`` (int), ``dice``, ``nsd``,
        ``hd95`` (float).
    """
    present = [e for e in ENTITY_COLUMNS if any(e in im.entities for im in images)]
    rows = []
    for im in images:
        ids = {}
        for e in present:
            value = im.entities.get(e)
            if value is not None and e in _PREFIXED:
                value = f"{e}-{value}"
            ids[ENTITY_COLUMNS[e]] = value
        for label, s in im.scores.items():
            rows.append(
                {
                    **ids,
                    "structure": abbreviations.get(label, str(label)),
                    "label": int(label),
                    "dice": s.dice,
                    "nsd": s.nsd,
                    "hd95": s.hd95,
                }
            )
    columns = [ENTITY_COLUMNS[e] for e in present] + ["structure", "label", *SCORE_COLUMNS]
    table = pd.DataFrame(rows, columns=columns)
    return table.astype({"label": "int64", **{c: "float64" for c in SCORE_COLUMNS}})


def _describe(values: pd.DataFrame) -> dict[str, float | int]:
    """Mean/std/n of the score columns of rows that are defined (dice not NaN)."""
    defined = values[values["dice"].notna()]
    out: dict[str, float | int] = {"n": len(defined)}
    for c in SCORE_COLUMNS:
        v = defined[c].to_numpy(dtype=float)
        if c == "hd95":
            out["hd95_n_inf"] = int(np.isinf(v).sum())
            v = v[np.isfinite(v)]
        out[f"{c}_mean"] = float(v.mean()) if len(v) else math.nan
        out[f"{c}_std"] = float(v.std(ddof=1)) if len(v) > 1 else math.nan
    return out


def summary_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Per-structure mean and std over images, plus a class-average row.

    Args:
        scores: a table from :func:`scores_table`.

    Returns:
        Columns ``structure``, ``label`` (``None`` on the class-average row), ``n``,
        ``dice_mean``, ``dice_std``, ``nsd_mean``, ``nsd_std``, ``hd95_mean``, ``hd95_std``,
        ``hd95_n_inf``; structures in first-appearance order, then the row ``mean``.
    """
    rows = []
    for (structure, label), group in scores.groupby(["structure", "label"], sort=False):
        rows.append({"structure": structure, "label": int(label), **_describe(group)})
    rows.append({"structure": CLASS_AVERAGE, "label": None, **_describe(image_class_averages(scores))})
    columns = ["structure", "label", "n"] + [
        f"{c}_{s}" for c in SCORE_COLUMNS for s in ("mean", "std")
    ] + ["hd95_n_inf"]
    table = pd.DataFrame(rows, columns=columns)
    # Keep labels as ints beside the class-average row's None (not floats with NaN).
    table["label"] = pd.Series([r["label"] for r in rows], dtype=object)
    return table


def image_class_averages(scores: pd.DataFrame) -> pd.DataFrame:
    """Each image's class average of every score: the mean over its structures present in
    either map (a defined Dice); ``mean()`` skips NaN but keeps inf (an unbounded HD95).

    Args:
        scores: a table from :func:`scores_table` (only the score and entity columns are read).

    Returns:
        One row per image, indexed by its entity columns, columns :data:`SCORE_COLUMNS`
        (without entity columns: one row for the whole table; none when no Dice is defined).
    """
    id_columns = [c for c in scores.columns if c in ENTITY_COLUMNS.values()]
    defined = scores[scores["dice"].notna()]
    if id_columns and len(defined):
        return defined.groupby(id_columns, sort=False, dropna=False)[list(SCORE_COLUMNS)].mean()
    return defined[list(SCORE_COLUMNS)].mean().to_frame().T if len(defined) else defined


def summary_path(scores_path: str | Path) -> Path:
    """Where the summary of a scores TSV goes: ``X.tsv`` -> ``X_summary.tsv``.

    Examples::

        >>> summary_path("out/scores.tsv").as_posix()
        'out/scores_summary.tsv'
    """
    p = Path(scores_path)
    stem = p.name[: -len(".tsv")] if p.name.endswith(".tsv") else p.name
    return p.with_name(f"{stem}_summary.tsv")


def write_tsv(table: pd.DataFrame, path: str | Path) -> Path:
    """Write a table as BIDS-style TSV (tab-separated, ``n/a`` for missing, ``inf`` as is).

    Creates the parent directory. Returns the path written.
    """
    from bids_cadiff.io.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, na_rep="n/a", float_format="%.6g")
    return path


def _cell(value: object, digits: int) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}f}"
    return str(value)


def format_table(table: pd.DataFrame, *, digits: int = 3) -> str:
    """Render a table as aligned plain text for a terminal (no trailing newline).

    Text columns are left-aligned, numbers right-aligned; floats get ``digits`` decimals,
    NaN/None print as ``n/a``.

    Examples::

        >>> print(format_table(pd.DataFrame({"structure": ["L-WM"], "dice": [0.9]})))
        structure   dice
        L-WM       0.900
    """
    headers = [str(c) for c in table.columns]
    cells = [[_cell(v, digits) for v in row] for row in table.itertuples(index=False)]
    numeric = [
        pd.api.types.is_numeric_dtype(table[c])
        or bool(table[c].map(lambda v: v is None or isinstance(v, (int, float))).all())
        for c in table.columns
    ]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def _line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([_line(headers)] + [_line(r) for r in cells])
