"""Find the T1w images to process, and validate the input dataset.

PyBIDS indexes the raw dataset in memory (``validate=False``, no database file), skipping
``derivatives/``, ``sourcedata/``, ``code/``, ``models/``, ``stimuli/``, dot-files, and the
output and work directories when they lie inside the dataset. Nothing is written anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from bids_cadiff.bidsio.derivatives import SOURCE_ENTITIES, source_prefix
from bids_cadiff.errors import UsageError

logger = logging.getLogger(__name__)

#: PyBIDS entity names kept on a record, in BIDS file-name order.
RECORD_ENTITIES: tuple[str, ...] = tuple(long for long, _ in SOURCE_ENTITIES)
#: Top-level folders of a raw dataset that never hold inputs.
_SKIPPED_DIRS = ("derivatives", "sourcedata", "code", "models", "stimuli")
#: Seconds after which the BIDS validator is abandoned.
VALIDATOR_TIMEOUT_S = 600


@dataclass(frozen=True)
class T1wRecord:
    """One T1w image of the raw dataset.

    Attributes:
        path: absolute path of the NIfTI file.
        entities: ``subject`` and, when present, ``session``, ``acquisition``,
            ``reconstruction``, ``run``; labels without prefixes, as strings (``run`` keeps
            its zero padding, e.g. ``"01"``).
    """

    path: Path
    entities: dict[str, str] = field(hash=False)

    @property
    def subject(self) -> str:
        return self.entities["subject"]

    @property
    def session(self) -> str | None:
        return self.entities.get("session")

    @property
    def relpath(self) -> str:
        """Path relative to the dataset root, POSIX style (``sub-01/anat/sub-01_T1w.nii.gz``).

        Example:
            >>> T1wRecord(Path("/d/sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"),
            ...           {"subject": "01", "session": "1"}).relpath
            'sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz'
        """
        parts = self.path.parts
        top = f"sub-{self.subject}"
        for i in range(len(parts) - 2, -1, -1):
            if parts[i] == top:
                return "/".join(parts[i:])
        raise ValueError(f"{self.path} is not inside a {top}/ folder")

    @property
    def bids_uri(self) -> str:
        """BIDS URI into the raw dataset (``DatasetLinks.raw`` of the derivatives).

        Example:
            >>> T1wRecord(Path("/d/sub-01/anat/sub-01_T1w.nii.gz"), {"subject": "01"}).bids_uri
            'bids:raw:sub-01/anat/sub-01_T1w.nii.gz'
        """
        return f"bids:raw:{self.relpath}"


def strip_prefix(label: str, prefix: str) -> str:
    """``"sub-01"`` -> ``"01"`` for ``prefix="sub-"``; other labels are returned unchanged."""
    return label[len(prefix):] if label.startswith(prefix) else label


def _ignore_patterns(bids_dir: Path, extra_dirs: Sequence[Path]) -> list[re.Pattern[str]]:
    patterns = [re.compile(r"^/(" + "|".join(_SKIPPED_DIRS) + r")(/|$)")]
    for extra in extra_dirs:
        try:
            rel = Path(os.path.abspath(extra)).relative_to(bids_dir)
        except ValueError:
            continue
        if str(rel) in ("", "."):
            continue
        patterns.append(re.compile(r"^/" + re.escape(rel.as_posix()) + r"(/|$)"))
    return patterns


def _layout(bids_dir: Path, ignore_dirs: Sequence[Path]) -> Any:
    from bids.layout import BIDSLayout, BIDSLayoutIndexer

    if not (bids_dir / "dataset_description.json").is_file():
        raise UsageError(
            f"{bids_dir} is not a BIDS dataset: it has no dataset_description.json. "
            "Give the root folder of the raw BIDS dataset."
        )
    indexer = BIDSLayoutIndexer(
        validate=False,
        ignore=_ignore_patterns(bids_dir, ignore_dirs),
        index_metadata=False,
    )
    try:
        return BIDSLayout(bids_dir, validate=False, derivatives=False, indexer=indexer)
    except (ValueError, OSError) as exc:
        raise UsageError(f"PyBIDS cannot index {bids_dir}: {exc}") from exc


def _filter_value(value: Any) -> Any:
    from bids.layout import Query

    if value is None:
        return Query.NONE
    if value == "*":
        return Query.ANY
    if isinstance(value, list):
        return [_filter_value(v) for v in value]
    return value


def _t1w_filters(bids_filters: Mapping[str, Any] | None, valid: set[str]) -> dict[str, Any]:
    if not bids_filters:
        return {}
    unknown_queries = set(bids_filters) - {"t1w"}
    if unknown_queries:
        raise UsageError(
            f"--bids-filter-file: unknown queries {sorted(unknown_queries)}; bids_cadiff only "
            'reads "t1w", e.g. {"t1w": {"acquisition": "mprage"}}.'
        )
    filters = dict(bids_filters.get("t1w") or {})
    reserved = {"subject", "suffix", "datatype", "extension", "scope"}
    bad = sorted(set(filters) & reserved)
    if bad:
        raise UsageError(
            f"--bids-filter-file: {bad} cannot be filtered on (use --participant-label for "
            "subjects; suffix, datatype and extension are fixed to T1w NIfTI)."
        )
    unknown = sorted(set(filters) - valid)
    if unknown:
        raise UsageError(
            f"--bids-filter-file: unknown BIDS entities {unknown}; use PyBIDS entity names such as "
            f"{sorted(valid & {'session', 'acquisition', 'reconstruction', 'run', 'ceagent'})}."
        )
    return {k: _filter_value(v) for k, v in filters.items()}


def find_t1w(
    bids_dir: str | Path,
    *,
    participant_labels: Sequence[str] = (),
    session_labels: Sequence[str] = (),
    bids_filters: Mapping[str, Any] | None = None,
    ignore_dirs: Sequence[str | Path] = (),
) -> list[T1wRecord]:
    """Every raw T1w NIfTI of the selected participants and sessions, sorted by path.

    Args:
        bids_dir: root of the raw BIDS dataset.
        participant_labels: subjects to keep (with or without ``sub-``); empty: all.
        session_labels: sessions to keep (with or without ``ses-``); empty: all.
        bids_filters: fmriprep-style filters, ``{"t1w": {entity: value}}``; a value ``null``
            means "entity absent", ``"*"`` means "any value".
        ignore_dirs: further folders not to index (the output and work directories when
            they lie inside the dataset).

    Returns:
        Records sorted by path (one per T1w, all runs/acq/rec kept).

    Raises:
        UsageError: not a BIDS dataset, a label that matches no participant/session (the
            message lists the available ones), bad filters, or no T1w selected at all.
    """
    bids_dir = Path(os.path.abspath(bids_dir))
    layout = _layout(bids_dir, [Path(p) for p in ignore_dirs])

    subjects = sorted(layout.get_subjects())
    if not subjects:
        raise UsageError(f"{bids_dir} has no sub-<label> folders: no participant to process.")
    wanted_subjects = [strip_prefix(str(s), "sub-") for s in participant_labels]
    missing = sorted(set(wanted_subjects) - set(subjects))
    if missing:
        raise UsageError(
            f"participant label(s) {', '.join(missing)} not found in {bids_dir}; available: "
            f"{', '.join(subjects)}."
        )
    sessions = sorted(layout.get_sessions())
    wanted_sessions = [strip_prefix(str(s), "ses-") for s in session_labels]
    missing = sorted(set(wanted_sessions) - set(sessions))
    if missing:
        available = ", ".join(sessions) if sessions else "none (the dataset has no sessions)"
        raise UsageError(
            f"session label(s) {', '.join(missing)} not found in {bids_dir}; available: "
            f"{available}."
        )

    query: dict[str, Any] = _t1w_filters(bids_filters, set(layout.get_entities()))
    query.update(suffix="T1w", datatype="anat", extension=[".nii", ".nii.gz"])
    if wanted_subjects:
        query["subject"] = wanted_subjects
    if wanted_sessions:
        query["session"] = wanted_sessions
    logger.debug("PyBIDS query: %s", query)
    files = layout.get(return_type="object", **query)

    records = []
    for bids_file in files:
        ents = bids_file.get_entities()
        if "desc" in ents or "space" in ents:  # a derivative that slipped into the raw tree
            logger.debug("skipping %s: not a raw T1w (has desc/space)", bids_file.path)
            continue
        entities = {k: str(ents[k]) for k in RECORD_ENTITIES if k in ents}
        if "run" in entities:
            # PyBIDS turns run-01 into an int-like PaddedInt whose str keeps the padding.
            entities["run"] = _run_label(bids_file.filename) or entities["run"]
        records.append(T1wRecord(Path(bids_file.path), entities))
    records.sort(key=lambda r: str(r.path))
    seen: dict[str, Path] = {}
    for record in records:
        key = source_prefix(record.entities)
        if key in seen:
            raise UsageError(
                f"{seen[key]} and {record.path} would get the same output name ({key}_desc-"
                "cadiff_dseg.nii.gz); keep one of them, or select one with --bids-filter-file"
            )
        seen[key] = record.path
    if not records:
        selection = []
        if wanted_subjects:
            selection.append(f"participants {', '.join(wanted_subjects)}")
        if wanted_sessions:
            selection.append(f"sessions {', '.join(wanted_sessions)}")
        if bids_filters:
            selection.append(f"filters {json.dumps(dict(bids_filters))}")
        what = " for " + "; ".join(selection) if selection else ""
        raise UsageError(
            f"no T1w image (sub-*/[ses-*/]anat/*_T1w.nii[.gz]) found in {bids_dir}{what}. "
            "Check the labels and the --bids-filter-file."
        )
    logger.info("found %d T1w image(s) in %s", len(records), bids_dir)
    return records


def _run_label(filename: str) -> str | None:
    m = re.search(r"_run-([a-zA-Z0-9]+)", filename)
    return m.group(1) if m else None


def list_participants(bids_dir: str | Path) -> list[str]:
    """Subject labels (without ``sub-``) of a dataset, sorted."""
    return sorted(str(s) for s in _layout(Path(os.path.abspath(bids_dir)), ()).get_subjects())


# --------------------------------------------------------------------------- validation


def find_validator() -> Path | None:
    """The ``bids-validator-deno`` executable: next to :data:`sys.executable`, else on PATH."""
    for name in ("bids-validator-deno", "bids-validator"):
        beside = Path(sys.executable).parent / name
        if beside.is_file() and os.access(beside, os.X_OK):
            return beside
    for name in ("bids-validator-deno",):
        found = shutil.which(name)
        if found:
            return Path(found)
    return None


#: Validator errors that only say the selection left participants out (fMRIPrep ignores them
#: for the same reason when it validates a subset).
SUBSET_ERRORS: frozenset[str] = frozenset({"PARTICIPANT_ID_MISMATCH"})


def _selection_view(bids_dir: Path, participant_labels: Sequence[str], root: Path) -> Path:
    """A folder of symbolic links that shows the validator the dataset with only the selected
    participants: every top-level entry that is not a ``sub-*`` folder, and ``sub-<label>`` for
    each label (as fMRIPrep validates only what it will process)."""
    view = root / bids_dir.name
    view.mkdir()
    wanted = {f"sub-{label}" for label in participant_labels}
    for entry in bids_dir.iterdir():
        if entry.name.startswith("sub-") and entry.name not in wanted:
            continue
        (view / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return view


def validate_dataset(
    bids_dir: str | Path,
    *,
    participant_labels: Sequence[str] = (),
    timeout_s: float = VALIDATOR_TIMEOUT_S,
) -> None:
    """Run ``bids-validator-deno`` on the raw dataset; raise if it reports errors.

    With ``participant_labels``, only those participants (and the dataset's top-level files)
    are validated, as fMRIPrep does: a broken file of another participant does not stop a run
    that does not touch it. Warnings are logged at DEBUG; errors raise. If the validator is not
    installed a warning is logged and nothing else happens. The validator uses the schema
    bundled with it and needs no network.

    Raises:
        UsageError: the dataset has validation errors (the message names the dataset, the
            first error codes, and ``--skip-bids-validation``).
    """
    bids_dir = Path(os.path.abspath(bids_dir))
    if participant_labels:
        with tempfile.TemporaryDirectory(prefix="cadiff-validate-") as tmp:
            view = _selection_view(bids_dir, participant_labels, Path(tmp))
            logger.info("validating participant(s) %s only", ", ".join(participant_labels))
            _validate(view, bids_dir, ignore=SUBSET_ERRORS, timeout_s=timeout_s)
        return
    _validate(bids_dir, bids_dir, ignore=frozenset(), timeout_s=timeout_s)


def _validate(target: Path, bids_dir: Path, *, ignore: frozenset[str], timeout_s: float) -> None:
    """Validate ``target`` (the dataset or a view of it); messages name ``bids_dir``."""
    exe = find_validator()
    if exe is None:
        logger.warning(
            "bids-validator-deno not found (next to %s or on PATH); %s is not validated. "
            "Install it with 'pip install bids-validator-deno'.",
            sys.executable,
            bids_dir,
        )
        return
    cmd = [str(exe), str(target), "--format", "json", "--ignoreWarnings", "--no-color"]
    logger.info("validating %s with %s", bids_dir, exe.name)
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        logger.warning(
            "bids-validator-deno took over %.0f s on %s; going on without validation",
            timeout_s,
            bids_dir,
        )
        return
    except OSError as exc:
        logger.warning("could not run %s (%s); %s is not validated", exe, exc, bids_dir)
        return
    try:
        report = json.loads(proc.stdout)
        issues = report["issues"]["issues"]
    except (ValueError, KeyError, TypeError):
        if proc.returncode == 0:
            logger.warning("unreadable bids-validator-deno output; assuming %s is valid", bids_dir)
            return
        lines = (proc.stderr or proc.stdout or "").strip().splitlines()
        last = lines[-1] if lines else "no output"
        raise UsageError(
            f"bids-validator-deno failed on {bids_dir} (exit {proc.returncode}): {last}. Fix "
            "the dataset or run again with --skip-bids-validation."
        ) from None
    errors = [i for i in issues if i.get("severity") == "error" and i.get("code") not in ignore]
    for issue in issues:
        if issue.get("severity") != "error":
            logger.debug("BIDS validator: %s %s", issue.get("code"), issue.get("location", ""))
    if errors:
        summary = []
        for issue in errors[:3]:
            loc = (issue.get("location") or "").replace(str(target), str(bids_dir))
            summary.append(f"{issue.get('code')} {loc}".strip())
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise UsageError(
            f"{bids_dir} is not valid BIDS: {'; '.join(summary)}{more}. Run bids-validator-deno "
            f"{bids_dir} for details, fix the dataset, or run again with --skip-bids-validation."
        )
    logger.info("%s passed BIDS validation", bids_dir)
