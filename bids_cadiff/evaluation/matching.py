"""Pair predicted label maps with reference label maps by their BIDS entities.

Pure path logic: no file is opened and no directory listed; callers pass the paths.

A file name such as ``sub-01_ses-pre_acq-mprage_run-2_desc-cadiff_dseg.nii.gz`` is split into
entities ``{"sub": "01", "ses": "pre", "acq": "mprage", "run": "2", "desc": "cadiff"}``, the
suffix ``dseg`` and the extension ``.nii.gz``. A prediction and a reference match when their
*match entities* (by default ``sub``, ``ses``, ``acq``, ``ce``, ``rec``, ``run``) are equal,
an entity absent from one name counting as a value of its own (so ``sub-01_ses-1`` never
matches ``sub-01``). Other entities, ``desc`` in particular (``desc-cadiff`` versus
``desc-aseg`` or none), ``space`` and ``res``, are ignored. Run numbers compare as integers
(``run-1`` matches ``run-01``).

Example::

    >>> r = match_files(["p/sub-01_desc-cadiff_dseg.nii.gz"], ["r/sub-01_desc-aseg_dseg.nii.gz"])
    >>> [(p.name, q.name) for p, q in r.pairs]
    [('sub-01_desc-cadiff_dseg.nii.gz', 'sub-01_desc-aseg_dseg.nii.gz')]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "MATCH_ENTITIES",
    "BidsName",
    "MatchResult",
    "match_files",
    "parse_bids_name",
]

#: Entities that must agree between a prediction and its reference.
MATCH_ENTITIES: tuple[str, ...] = ("sub", "ses", "acq", "ce", "rec", "run")

_EXTENSIONS = (".nii.gz", ".nii")
_ENTITY = re.compile(r"^([a-zA-Z0-9]+)-([a-zA-Z0-9]+)$")
_SUFFIX = re.compile(r"^[a-zA-Z0-9]+$")


@dataclass(frozen=True)
class BidsName:
    """The parts of a BIDS file name.

    Attributes:
        path: the file.
        entities: ``{key: value}`` in file-name order, e.g. ``{"sub": "01", "desc": "aseg"}``.
        suffix: e.g. ``"dseg"``.
        extension: e.g. ``".nii.gz"``.
    """

    path: Path
    entities: dict[str, str]
    suffix: str
    extension: str

    def key(self, match_entities: Sequence[str] = MATCH_ENTITIES) -> tuple[tuple[str, str], ...]:
        """Matching key: the ``(entity, value)`` pairs among ``match_entities`` that are set."""
        out = []
        for name in match_entities:
            if name in self.entities:
                value = self.entities[name]
                if name == "run" and value.isdigit():
                    value = str(int(value))
                out.append((name, value))
        return tuple(out)


def parse_bids_name(path: str | Path) -> BidsName | None:
    """Split a BIDS file name into entities, suffix and extension.

    Args:
        path: a file path; only its name is used.

    Returns:
        The parts, or None when the name is not ``key-value_..._suffix.nii[.gz]`` with a
        ``sub`` entity first.

    Examples::

        >>> parse_bids_name("sub-01_ses-2_desc-aseg_dseg.nii.gz").entities
        {'sub': '01', 'ses': '2', 'desc': 'aseg'}
        >>> parse_bids_name("aseg.mgz") is None
        True
    """
    path = Path(path)
    name = path.name
    extension = next((e for e in _EXTENSIONS if name.endswith(e)), None)
    if extension is None:
        return None
    parts = name[: -len(extension)].split("_")
    if len(parts) < 2 or not _SUFFIX.match(parts[-1]):
        return None
    entities: dict[str, str] = {}
    for part in parts[:-1]:
        m = _ENTITY.match(part)
        if m is None or m.group(1) in entities:
            return None
        entities[m.group(1)] = m.group(2)
    if next(iter(entities)) != "sub":
        return None
    return BidsName(path=path, entities=entities, suffix=parts[-1], extension=extension)


@dataclass(frozen=True)
class MatchResult:
    """Outcome of :func:`match_files`.

    Attributes:
        pairs: ``(prediction, reference)`` paths, sorted by prediction path.
        unmatched_predictions: predictions with no reference (sorted).
        unmatched_references: references with no prediction (sorted).
        ambiguous: matching keys that name more than one prediction or more than one
            reference, with all the files concerned; they are in no pair. Filter by ``desc``
            (or pass a narrower directory) to resolve them.
        unparsed: paths whose names are not BIDS names with the wanted suffix (sorted).
    """

    pairs: list[tuple[Path, Path]]
    unmatched_predictions: list[Path]
    unmatched_references: list[Path]
    ambiguous: dict[tuple[tuple[str, str], ...], list[Path]] = field(default_factory=dict)
    unparsed: list[Path] = field(default_factory=list)


def _group(
    names: Iterable[BidsName], match_entities: Sequence[str]
) -> dict[tuple[tuple[str, str], ...], list[Path]]:
    groups: dict[tuple[tuple[str, str], ...], list[Path]] = {}
    for n in names:
        groups.setdefault(n.key(match_entities), []).append(n.path)
    return groups


def _select(
    paths: Iterable[str | Path], suffix: str, desc: str | None, unparsed: list[Path]
) -> list[BidsName]:
    out = []
    for p in paths:
        parsed = parse_bids_name(p)
        if parsed is None or parsed.suffix != suffix:
            unparsed.append(Path(p))
            continue
        if desc is not None and parsed.entities.get("desc") != desc:
            continue
        out.append(parsed)
    return out


def match_files(
    predictions: Iterable[str | Path],
    references: Iterable[str | Path],
    *,
    suffix: str = "dseg",
    pred_desc: str | None = None,
    ref_desc: str | None = None,
    match_entities: Sequence[str] = MATCH_ENTITIES,
) -> MatchResult:
    """Pair predictions with references whose match entities are equal.

    Args:
        predictions: predicted label map paths.
        references: reference label map paths.
        suffix: the BIDS suffix both must have; other files go to ``unparsed``.
        pred_desc: keep only predictions with this ``desc`` value (None: any or none).
        ref_desc: the same for references.
        match_entities: entities that must agree (see :data:`MATCH_ENTITIES`).

    Returns:
        The pairs and everything left over; files filtered out by ``pred_desc``/``ref_desc``
        are in none of the lists.
    """
    unparsed: list[Path] = []
    preds = _group(_select(predictions, suffix, pred_desc, unparsed), match_entities)
    refs = _group(_select(references, suffix, ref_desc, unparsed), match_entities)
    pairs: list[tuple[Path, Path]] = []
    ambiguous: dict[tuple[tuple[str, str], ...], list[Path]] = {}
    unmatched_pred: list[Path] = []
    for key, pred_paths in preds.items():
        ref_paths = refs.get(key, [])
        if len(pred_paths) > 1 or len(ref_paths) > 1:
            ambiguous[key] = sorted(pred_paths) + sorted(ref_paths)
        elif ref_paths:
            pairs.append((pred_paths[0], ref_paths[0]))
        else:
            unmatched_pred.extend(pred_paths)
    unmatched_ref = [p for key, paths in refs.items() if key not in preds for p in paths]
    return MatchResult(
        pairs=sorted(pairs),
        unmatched_predictions=sorted(unmatched_pred),
        unmatched_references=sorted(unmatched_ref),
        ambiguous=ambiguous,
        unparsed=sorted(unparsed),
    )
