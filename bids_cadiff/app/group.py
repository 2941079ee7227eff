"""Group level: gather every per-image volume table into one table with a data dictionary.

Reads ``OUTPUT_DIR/sub-*/[ses-*/]anat/*_desc-cadiff_volumes.tsv`` of the finished images (those
with their dseg sidecar, which a participant job writes last: a group run while participant
jobs are running takes only what they have finished; every file is written atomically, so no
file is ever read half-written) and writes
``OUTPUT_DIR/group/desc-cadiff_volumes.tsv`` (one row per T1w) and its ``.json`` sidecar.
Columns: ``participant_id``, then ``session_id``, ``acquisition``, ``reconstruction``, ``run``
(only those some image has), one column per structure abbreviation (mm^3), ``TotalBrain``,
``qc`` (the image's QC status from its dseg sidecar). Unless ``--no-reports``, it also writes
the group report (``group/desc-cadiff_report.html``, :mod:`bids_cadiff.reports.html`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from bids_cadiff.bidsio import derivatives as deriv
from bids_cadiff.config import RunConfig
from bids_cadiff.errors import UsageError
from bids_cadiff.labels import SYNTHSEG32, LabelTable

logger = logging.getLogger(__name__)


def _read_row(path: Path) -> dict[str, Any]:
    try:
        rows = deriv.read_volumes_tsv(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(
            f"cannot read {path}: {exc}. Delete it and run the participant level again for "
            "that image (with --overwrite)."
        ) from exc
    if len(rows) != 1:
        raise UsageError(
            f"{path} should hold exactly one row of volumes, found {len(rows)}. Delete it and run "
            "the participant level again for that image (with --overwrite)."
        )
    # Entities come from the file name (authoritative), volumes from the table.
    row: dict[str, Any] = deriv.entity_columns(deriv.entities_from_name(path.name))
    for key, value in rows[0].items():
        if key in deriv.ENTITY_COLUMNS:
            continue
        if value in ("n/a", ""):
            row[key] = None
            continue
        try:
            row[key] = float(value)
        except (TypeError, ValueError):
            raise UsageError(
                f"{path}: column {key!r} holds {value!r}, not a volume. Delete the file and run "
                "the participant level again for that image (with --overwrite)."
            ) from None
    return row


def qc_status(output_dir: Path, entities: dict[str, str]) -> str:
    """``pass``, ``fail (check, ...)`` from the image's dseg sidecar, or ``n/a`` (no sidecar,
    or one written before QC existed)."""
    try:
        qc = json.loads(deriv.dseg_sidecar_path(output_dir, entities).read_text()).get("QC")
    except (OSError, ValueError):
        return "n/a"
    if not isinstance(qc, dict) or "Status" not in qc:
        return "n/a"
    if qc["Status"] == "pass":
        return "pass"
    checks = dict.fromkeys(str(f.get("Check")) for f in qc.get("Flags", []))
    return f"{qc['Status']} ({', '.join(checks)})"


def collect_volumes(
    output_dir: Path,
    *,
    participant_labels: tuple[str, ...] = (),
    session_labels: tuple[str, ...] = (),
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows and column order of the group table.

    Args:
        output_dir: the derivatives dataset.
        participant_labels: keep only these subjects (no ``sub-``); empty: all.
        session_labels: keep only these sessions (no ``ses-``); empty: all.

    Returns:
        ``(rows, columns)``; rows sorted by file path.

    Raises:
        UsageError: no volume table selected, or one that cannot be read.
    """
    tables = deriv.find_volume_tables(output_dir)
    selected = []
    unfinished = []
    for path in tables:
        ents = deriv.entities_from_name(path.name)
        if participant_labels and ents.get("subject") not in participant_labels:
            continue
        if session_labels and ents.get("session") not in session_labels:
            continue
        if not deriv.is_finished(output_dir, ents):
            unfinished.append(path)
            continue
        selected.append(path)
    if unfinished:
        logger.warning(
            "%d image(s) left out, their outputs unfinished (a participant job is running, or "
            "was killed: rerun it), e.g. %s", len(unfinished), unfinished[0],
        )
    if not selected:
        what = ""
        if participant_labels:
            what += f" for participant(s) {', '.join(participant_labels)}"
        if session_labels:
            what += f" for session(s) {', '.join(session_labels)}"
        raise UsageError(
            f"no *_desc-{deriv.DESC}_volumes.tsv of a finished image found in {output_dir}"
            f"{what}; run the participant level first (bids_cadiff BIDS_DIR OUTPUT_DIR "
            "participant)."
        )
    rows = [_read_row(p) for p in selected]
    for path, row in zip(selected, rows):
        row[deriv.QC_COLUMN] = qc_status(output_dir, deriv.entities_from_name(path.name))

    entity_cols = [c for c in deriv.ENTITY_COLUMNS if any(c in r for r in rows)]
    structure_cols: list[str] = []
    for row in rows:
        for key in row:
            if key not in (*deriv.ENTITY_COLUMNS, deriv.TOTAL_BRAIN, deriv.QC_COLUMN) and (
                key not in structure_cols
            ):
                structure_cols.append(key)
    columns = entity_cols + structure_cols + [deriv.TOTAL_BRAIN, deriv.QC_COLUMN]
    mismatched = [p for p, r in zip(selected, rows) if set(structure_cols) - set(r)]
    if mismatched:
        logger.warning(
            "%d volume table(s) lack some structures (written as n/a), e.g. %s; they were made "
            "with another label table",
            len(mismatched),
            mismatched[0],
        )
    return rows, columns


def run_group(config: RunConfig) -> int:
    """Aggregate the volumes of every processed T1w of ``config.output_dir``.

    Returns:
        0 on success.

    Raises:
        UsageError: nothing to aggregate (run the participant level first).
    """
    output_dir = Path(config.output_dir)
    if not output_dir.is_dir():
        raise UsageError(
            f"output folder {output_dir} does not exist; run the participant level first."
        )
    rows, columns = collect_volumes(
        output_dir,
        participant_labels=config.participant_labels,
        session_labels=config.session_labels,
    )
    table: LabelTable = deriv.read_dseg_tsv(output_dir) or SYNTHSEG32
    tsv, sidecar = deriv.write_group_volumes(output_dir, rows, columns, table)
    deriv.write_bidsignore(output_dir)
    logger.info("group volumes of %d image(s) written to %s (+ %s)", len(rows), tsv, sidecar.name)
    failed = [r for r in rows if str(r.get(deriv.QC_COLUMN, "")).startswith("fail")]
    if failed:
        logger.warning("%d of %d image(s) failed QC (column %r of %s)", len(failed), len(rows),
                       deriv.QC_COLUMN, tsv.name)
    if config.reports:
        from bids_cadiff.reports.html import write_group_report

        report = write_group_report(output_dir)
        logger.info("group report %s", report)
    return 0
