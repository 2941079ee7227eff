"""``cadiff-evaluate PRED_DIR REF_DIR``: score predicted label maps against reference ones.

Every ``*_dseg.nii[.gz]`` under ``PRED_DIR`` is paired with the ``*_dseg.nii[.gz]`` under
``REF_DIR`` that has the same ``sub``, ``ses``, ``acq``, ``ce``, ``rec`` and ``run`` entities
(``desc`` may differ: ``desc-cadiff`` against ``desc-aseg`` or none; see
:mod:`bids_cadiff.evaluation.matching`). Each pair is scored per structure of the label table
(Dice, NSD at ``--nsd-tolerance`` mm, HD95 in mm; :mod:`bids_cadiff.evaluation.metrics`), the
summary table is printed on stdout, and with ``--output`` the per-image scores and the summary
are written as TSV (:mod:`bids_cadiff.evaluation.report`).

Label values: both maps go through ``LabelTable.value_to_index``. With the built-in table
(``synthseg32``) FreeSurfer ``aseg`` values outside it are first merged by
:data:`bids_cadiff.labels.ASEG_MERGE`; any value still outside the table counts as background
(the values dropped are logged).

Grids: a prediction must be on its reference's voxel grid (same shape, affines equal within
1e-3). A mismatch fails that pair with an :class:`~bids_cadiff.errors.InputError` naming both
files; nothing is resampled, because resampling a label map changes the very boundaries being
scored, and a grid mismatch more often means the wrong file or space than a harmless
difference. Resample explicitly (nearest neighbour) if that is what is wanted.

Exit codes: 0 every pair scored; 1 some pairs failed (the others are still scored and
written) or an unexpected error; 2 usage error (one line on stderr: bad option, missing
folder, unreadable label table, no pairs found).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from bids_cadiff.cli.parser import _OneLineParser
from bids_cadiff.cli.run import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, setup_logging
from bids_cadiff.errors import InputError, UsageError
from bids_cadiff.labels import (
    ASEG_MERGE,
    ASEG_MIDLINE_WM,
    SYNTHSEG32,
    Label,
    LabelTable,
    aseg_to_table_values,
)

if TYPE_CHECKING:
    from bids_cadiff.evaluation.report import ImageScores

logger = logging.getLogger(__name__)

PROG = "cadiff-evaluate"

#: Built-in label tables by (case-insensitive) name, with the value merge that goes with each.
BUILTIN_TABLES: dict[str, tuple[LabelTable, dict[int, int]]] = {
    "synthseg32": (SYNTHSEG32, ASEG_MERGE),
}

#: Largest difference (mm, and direction cosines) tolerated between two affines.
AFFINE_ATOL = 1e-3


# --------------------------------------------------------------------------- type= validators


def _existing_dir(what: str):  # noqa: ANN202 - returns a type= callable
    def check(value: str) -> Path:
        path = Path(value).expanduser()
        if not path.is_dir():
            problem = "is not a folder" if path.exists() else "does not exist"
            raise argparse.ArgumentTypeError(f"{what} folder {problem}: {value}")
        return Path(os.path.abspath(path))

    check.__name__ = f"{what} folder"
    return check


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


def load_label_table_tsv(path: Path) -> LabelTable:
    """Read a label table from a TSV (a BIDS ``dseg.tsv`` works).

    Columns: ``index`` or ``value`` (int, required), ``name``, ``abbreviation`` (either one
    required; each defaults to the other), ``color`` (``#rrggbb``, optional). The background
    (0) is added first if the file lacks it.

    Raises:
        UsageError: the file cannot be read or lacks the columns above.
    """
    import pandas as pd

    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read label table {path}: {exc}") from None
    value_col = "index" if "index" in df.columns else "value" if "value" in df.columns else None
    if value_col is None or not ({"name", "abbreviation"} & set(df.columns)):
        raise UsageError(
            f"label table {path} needs an 'index' (or 'value') column and a 'name' or "
            f"'abbreviation' column; found {list(df.columns)}"
        )
    labels: list[Label] = []
    for row in df.to_dict("records"):
        try:
            value = int(row[value_col])
        except ValueError:
            raise UsageError(
                f"label table {path}: {value_col} {row[value_col]!r} is not an integer"
            ) from None
        name = row.get("name") or row.get("abbreviation") or str(value)
        abbreviation = row.get("abbreviation") or name
        labels.append(Label(value, name, abbreviation, row.get("color") or "#000000"))
    background = [lab for lab in labels if lab.value == 0]
    rest = [lab for lab in labels if lab.value != 0]
    entries = (background[0] if background else Label(0, "Unknown", "BG", "#000000"), *rest)
    try:
        return LabelTable(tuple(entries))
    except ValueError as exc:
        raise UsageError(f"label table {path}: {exc}") from None


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
    try:
        return load_label_table_tsv(path), {}
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
        "pred_dir", type=_existing_dir("prediction"), help="folder of predicted *_dseg files"
    )
    parser.add_argument(
        "ref_dir", type=_existing_dir("reference"), help="folder of reference *_dseg files"
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


# --------------------------------------------------------------------------- orchestration
# (Kept here while bids_cadiff/app/evaluate.py and io/nifti.py do not exist; move it there.)


def _find_dseg(root: Path) -> list[Path]:
    """``*_dseg.nii[.gz]`` files under root, skipping hidden files and folders, sorted."""
    found = []
    for path in root.rglob("*_dseg.nii*"):
        rel = path.relative_to(root).parts
        if path.is_file() and not any(p.startswith(".") for p in rel):
            found.append(path)
    return sorted(found)


def _load_label_map(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Read a label map: ``(X, Y, Z)`` int64 values, its 4×4 affine and voxel size (mm)."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for bad files
        raise InputError(path, f"cannot read as NIfTI ({exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"a label map must be 3D, got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.integer):
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise InputError(path, "holds non-integer values; is it a label map (*_dseg)?")
        data = rounded
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return data.astype(np.int64), np.asarray(img.affine, dtype=float), zooms


def _check_same_grid(
    pred_path: Path, pred_shape: tuple[int, ...], pred_affine: np.ndarray,
    ref_path: Path, ref_shape: tuple[int, ...], ref_affine: np.ndarray,
) -> None:
    if pred_shape != ref_shape:
        raise InputError(
            pred_path,
            f"shape {pred_shape} differs from reference {ref_path} {ref_shape}; resample the "
            "prediction onto the reference grid (nearest neighbour) before evaluating",
        )
    diff = float(np.abs(pred_affine - ref_affine).max())
    if diff > AFFINE_ATOL:
        raise InputError(
            pred_path,
            f"affine differs from reference {ref_path} (by up to {diff:.3g}); the two are not "
            "on the same voxel grid: resample the prediction onto the reference grid "
            "(nearest neighbour) or check that the right reference and space are used",
        )


def _to_index(
    values: np.ndarray, table: LabelTable, merge: dict[int, int], path: Path, what: str,
    affine: np.ndarray,
) -> np.ndarray:
    """Map label values to table indices, logging the values that become background.

    With FreeSurfer's merge, midline and bilateral white matter (corpus callosum, WM
    hypointensities) go to left or right white matter by side, as in training
    (:func:`bids_cadiff.labels.aseg_to_table_values`).
    """
    known = set(table.values) | set(merge)
    if merge == ASEG_MERGE:
        known |= set(ASEG_MIDLINE_WM)
    low, high = int(values.min(initial=0)), int(values.max(initial=0))
    if low >= 0 and high < 1_000_000:  # bincount: one pass, no sort
        counts = np.bincount(values.ravel(), minlength=high + 1)
        present = np.flatnonzero(counts)
        counts = counts[present]
    else:
        present, counts = np.unique(values, return_counts=True)
    dropped = {int(v): int(c) for v, c in zip(present, counts) if int(v) not in known}
    if dropped:
        level = logging.WARNING if what == "prediction" else logging.INFO
        logger.log(
            level,
            "%s %s: values not in the label table counted as background {value: voxels}: %s",
            what, path.name, dropped,
        )
    if merge == ASEG_MERGE:
        return table.value_to_index(aseg_to_table_values(values, affine, table))
    return table.value_to_index(values, merge=merge)


def evaluate_directories(
    *,
    pred_dir: Path,
    ref_dir: Path,
    table: LabelTable,
    merge: dict[int, int],
    nsd_tolerance_mm: float,
    pred_desc: str | None = None,
    ref_desc: str | None = None,
) -> tuple[list[ImageScores], int]:
    """Match, load and score every pair; returns ``(scored images, number of failed pairs)``.

    Raises:
        UsageError: no prediction could be paired with a reference.
    """
    from bids_cadiff.evaluation.matching import match_files
    from bids_cadiff.evaluation.metrics import class_average, evaluate_pair
    from bids_cadiff.evaluation.report import ImageScores

    result = match_files(
        _find_dseg(pred_dir), _find_dseg(ref_dir), pred_desc=pred_desc, ref_desc=ref_desc
    )
    for path in result.unmatched_predictions:
        logger.warning("no reference for prediction %s", path)
    if result.unmatched_references:
        logger.info(
            "%d reference(s) without prediction: %s",
            len(result.unmatched_references),
            ", ".join(p.name for p in result.unmatched_references),
        )
    for key, paths in result.ambiguous.items():
        logger.warning(
            "skipped %s: several files share these entities (%s); use --pred-desc/--ref-desc",
            "_".join(f"{k}-{v}" for k, v in key),
            ", ".join(str(p) for p in paths),
        )
    if not result.pairs:
        raise UsageError(
            f"no prediction in {pred_dir} matches a reference in {ref_dir} (found "
            f"{len(result.unmatched_predictions)} unmatched prediction(s), "
            f"{len(result.unmatched_references)} unmatched reference(s)); files must be "
            "named like sub-<label>[_ses-<label>]..._dseg.nii.gz with the same entities"
        )
    labels = list(range(1, table.num_classes))
    images: list[ImageScores] = []
    failed = 0
    for n, (pred_path, ref_path) in enumerate(result.pairs, start=1):
        try:
            pred, pred_affine, _ = _load_label_map(pred_path)
            ref, ref_affine, spacing = _load_label_map(ref_path)
            _check_same_grid(pred_path, pred.shape, pred_affine, ref_path, ref.shape, ref_affine)
            pred_idx = _to_index(pred, table, merge, pred_path, "prediction", pred_affine)
            ref_idx = _to_index(ref, table, merge, ref_path, "reference", ref_affine)
            del pred, ref
            by_index = evaluate_pair(
                pred_idx, ref_idx, labels=labels, spacing=spacing, nsd_tolerance_mm=nsd_tolerance_mm
            )
        except InputError as exc:
            logger.error("%s", exc)
            failed += 1
            continue
        scores = {table.values[i]: s for i, s in by_index.items()}
        mean = class_average(scores)
        logger.info(
            "[%d/%d] %s: mean Dice %.3f, NSD %.3f, HD95 %.2f mm",
            n, len(result.pairs), pred_path.name, mean.dice, mean.nsd, mean.hd95,
        )
        entities = dict(_entities(pred_path))
        images.append(ImageScores(entities=entities, scores=scores))
    return images, failed


def _entities(path: Path) -> dict[str, str]:
    from bids_cadiff.evaluation.matching import parse_bids_name

    parsed = parse_bids_name(path)
    return dict(parsed.entities) if parsed is not None else {}


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
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    setup_logging(args.verbose)
    table, merge = args.labels_table
    try:
        images, failed = evaluate_directories(
            pred_dir=args.pred_dir,
            ref_dir=args.ref_dir,
            table=table,
            merge=merge,
            nsd_tolerance_mm=args.nsd_tolerance,
            pred_desc=args.pred_desc,
            ref_desc=args.ref_desc,
        )
        if not images:
            logger.error("no pair could be scored (%d failed)", failed)
            return EXIT_FAILURE
        from bids_cadiff.evaluation.report import (
            format_table,
            scores_table,
            summary_path,
            summary_table,
            write_tsv,
        )

        abbreviations = {e.value: e.abbreviation for e in table.entries}
        scores = scores_table(images, abbreviations)
        summary = summary_table(scores)
        if args.output is not None:
            write_tsv(scores, args.output)
            write_tsv(summary, summary_path(args.output))
            logger.info("scores written to %s and %s", args.output, summary_path(args.output))
        # The result table is this command's output: stdout, deliberately (logs go to stderr).
        # Structures in no image (n = 0) stay in the TSV but would only clutter the terminal.
        shown = summary[summary["n"] > 0]
        sys.stdout.write(
            f"{len(images)} image(s), NSD tolerance {args.nsd_tolerance:g} mm\n"
            f"{format_table(shown)}\n"
        )
    except UsageError as exc:
        sys.stderr.write(f"{PROG}: error: {' '.join(str(exc).split())}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        logger.warning("interrupted")
        return 130
    except Exception:  # noqa: BLE001 - last resort: log with traceback, exit 1
        logger.exception("cadiff-evaluate failed unexpectedly")
        return EXIT_FAILURE
    if failed:
        logger.error("%d pair(s) could not be scored; see the errors above", failed)
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
