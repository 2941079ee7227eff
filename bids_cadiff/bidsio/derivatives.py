"""The derivatives dataset: the only module that names outputs and writes their metadata.

Layout of ``OUTPUT_DIR`` (a BIDS derivatives dataset)::

    dataset_description.json
    desc-cadiff_dseg.tsv                   label look-up table (applies to every dseg below)
    .bidsignore                            lists the non-BIDS files below
    sub-<l>.html                           participant report (bidsignored)
    logs/<source>_desc-cadiff_error.json   why an image failed (bidsignored)
    logs/locks/<source>_desc-cadiff.lock   held while a job writes that image (removed after)
    logs/locks/dataset.lock                held while a job writes the dataset-level files
    sub-<l>/[ses-<s>/]anat/
        <source>_desc-cadiff_dseg.nii.gz   label map on the T1w's own grid
        <source>_desc-cadiff_dseg.json     provenance sidecar (with Uncertainty and QC)
        <source>_label-uncertainty_desc-cadiff_probseg.nii.gz (+ .json)  voxel uncertainty
        <source>_desc-cadiff_probseg.nii.gz (+ .json)   class probabilities (on request)
        <source>_desc-cadiff_volumes.tsv   one row: structure volumes in mm^3 (bidsignored)
        <source>_desc-cadiff_qc.tsv        per-structure QC table (bidsignored)
    sub-<l>/figures/<source>_desc-cadiff_<kind>.png   QC figures (bidsignored)
    group/desc-cadiff_volumes.tsv (+ .json)         all volumes, one row per T1w (bidsignored)
    group/desc-cadiff_report.html                   group report (bidsignored)

``<source>`` is ``sub-<l>[_ses-<s>][_acq-<a>][_rec-<r>][_run-<n>]``: the source T1w's entities
in BIDS order. Every writer is atomic (:mod:`bids_cadiff.io.atomic`). The dataset-level files
(description, look-up table) are rewritten only when their content changes, so the many jobs
of a SLURM array that start together leave them as the first one wrote them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bids_cadiff import CODE_URL, __version__
from bids_cadiff.errors import UsageError
from bids_cadiff.io.atomic import atomic_path, atomic_write, remove_stale_temporaries
from bids_cadiff.io.locks import exclusive_lock
from bids_cadiff.labels import Label, LabelTable

logger = logging.getLogger(__name__)

#: The ``desc`` entity of everything this app writes.
DESC = "cadiff"
#: BIDS version the outputs follow.
BIDS_VERSION = "1.10.0"
#: Name of the pipeline (``GeneratedBy.Name``).
PIPELINE_NAME = "bids_cadiff"

#: Source entities carried into output names, in BIDS order, with their file-name keys.
SOURCE_ENTITIES: tuple[tuple[str, str], ...] = (
    ("subject", "sub"),
    ("session", "ses"),
    ("acquisition", "acq"),
    ("ceagent", "ce"),
    ("reconstruction", "rec"),
    ("run", "run"),
    ("echo", "echo"),
    ("part", "part"),
    ("chunk", "chunk"),
)

#: BIDS "Common image-derived labels": abbreviation -> integer value (``mapping`` column).
BIDS_COMMON_LABELS: dict[str, int] = {
    "BG": 0,
    "GM": 1,
    "WM": 2,
    "CSF": 3,
    "B": 4,
    "ST": 5,
    "NB": 6,
    "L": 7,
    "CGM": 8,
    "SGM": 9,
    "BS": 10,
    "CBM": 11,
}

#: Name of the whole-brain column in volume tables.
TOTAL_BRAIN = "TotalBrain"
#: Name of the QC status column of the group table.
QC_COLUMN = "qc"
#: Files and folders the BIDS validator does not know; written to ``.bidsignore``.
BIDSIGNORE_PATTERNS: tuple[str, ...] = (
    f"*_desc-{DESC}_volumes.tsv",
    f"*_desc-{DESC}_volumes.json",
    f"*_desc-{DESC}_qc.tsv",
    # No trailing slash: bids-validator-deno reports an ignored "dir/" directory itself.
    "sub-*/figures",
    "/group",
    "/logs",
    "*.html",
)
#: Packages whose versions go into every sidecar (distribution names).
SOFTWARE_PACKAGES: tuple[str, ...] = (
    "torch",
    "monai",
    "antspyx",
    "nibabel",
    "pybids",
    "numpy",
)


# --------------------------------------------------------------------------- names


def _label(entities: Mapping[str, Any], key: str) -> str | None:
    value = entities.get(key)
    if value is None or value == "":
        return None
    value = str(value)
    prefix = dict(SOURCE_ENTITIES)[key] + "-"
    if value.startswith(prefix):
        value = value[len(prefix):]
    if not value.isalnum():
        raise ValueError(f"BIDS {key} label must be alphanumeric, got {value!r}")
    return value


def source_prefix(entities: Mapping[str, Any]) -> str:
    """File-name prefix from the source T1w's entities (``subject`` is required).

    Example:
        >>> source_prefix({"subject": "01", "session": "pre", "run": 2})
        'sub-01_ses-pre_run-2'
        >>> source_prefix({"subject": "sub-01", "acquisition": "mprage", "reconstruction": "norm"})
        'sub-01_acq-mprage_rec-norm'
    """
    if _label(entities, "subject") is None:
        raise ValueError(f"entities need a 'subject', got {dict(entities)}")
    parts = []
    for key, short in SOURCE_ENTITIES:
        value = _label(entities, key)
        if value is not None:
            parts.append(f"{short}-{value}")
    return "_".join(parts)


def _anat_dir(output_dir: str | Path, entities: Mapping[str, Any]) -> Path:
    out = Path(output_dir) / f"sub-{_label(entities, 'subject')}"
    session = _label(entities, "session")
    if session is not None:
        out = out / f"ses-{session}"
    return out / "anat"


def dseg_path(output_dir: str | Path, entities: Mapping[str, Any]) -> Path:
    """Label map of one T1w.

    Example:
        >>> dseg_path("/out", {"subject": "01"}).as_posix()
        '/out/sub-01/anat/sub-01_desc-cadiff_dseg.nii.gz'
        >>> dseg_path("/out", {"subject": "01", "session": "retest"}).as_posix()
        '/out/sub-01/ses-retest/anat/sub-01_ses-retest_desc-cadiff_dseg.nii.gz'
        >>> e = {"subject": "01", "session": "1", "acquisition": "mp2rage",
        ...      "reconstruction": "uni", "run": "02"}
        >>> dseg_path("/out", e).as_posix()
        '/out/sub-01/ses-1/anat/sub-01_ses-1_acq-mp2rage_rec-uni_run-02_desc-cadiff_dseg.nii.gz'
        >>> dseg_path("/out", {"subject": "01", "run": 1}).as_posix()
        '/out/sub-01/anat/sub-01_run-1_desc-cadiff_dseg.nii.gz'
    """
    return _anat_dir(output_dir, entities) / f"{source_prefix(entities)}_desc-{DESC}_dseg.nii.gz"


def dseg_sidecar_path(output_dir: str | Path, entities: Mapping[str, Any]) -> Path:
    """JSON sidecar of :func:`dseg_path`.

    Example:
        >>> dseg_sidecar_path("/out", {"subject": "01", "acquisition": "fast"}).as_posix()
        '/out/sub-01/anat/sub-01_acq-fast_desc-cadiff_dseg.json'
    """
    return _anat_dir(output_dir, entities) / f"{source_prefix(entities)}_desc-{DESC}_dseg.json"


def volumes_path(output_dir: str | Path, entities: Mapping[str, Any]) -> Path:
    """Per-image volume table (one row, bidsignored).

    Example:
        >>> volumes_path("/out", {"subject": "01", "session": "2"}).as_posix()
        '/out/sub-01/ses-2/anat/sub-01_ses-2_desc-cadiff_volumes.tsv'
    """
    return _anat_dir(output_dir, entities) / f"{source_prefix(entities)}_desc-{DESC}_volumes.tsv"


#: Kinds of per-image QC figure under ``sub-<l>/figures/`` (:func:`figure_path`).
FIGURE_KINDS: tuple[str, ...] = ("dseg", "contours", "uncertainty", "registration")


def figure_path(output_dir: str | Path, entities: Mapping[str, Any], kind: str = "dseg") -> Path:
    """QC figure, fmriprep style under ``sub-<l>/figures/`` (bidsignored).

    ``kind`` is one of :data:`FIGURE_KINDS`: ``dseg`` (label overlay), ``contours`` (label
    outlines), ``uncertainty`` (voxel uncertainty over the T1w), ``registration`` (the
    warped atlas's brain outline over the T1w).

    Example:
        >>> figure_path("/out", {"subject": "01", "session": "2", "run": "1"}).as_posix()
        '/out/sub-01/figures/sub-01_ses-2_run-1_desc-cadiff_dseg.png'
        >>> figure_path("/out", {"subject": "01"}, "uncertainty").name
        'sub-01_desc-cadiff_uncertainty.png'
    """
    if kind not in FIGURE_KINDS:
        raise ValueError(f"figure kind must be one of {FIGURE_KINDS}, got {kind!r}")
    subject = _label(entities, "subject")
    return (
        Path(output_dir) / f"sub-{subject}" / "figures"
        / f"{source_prefix(entities)}_desc-{DESC}_{kind}.png"
    )


def uncertainty_path(output_dir: str | Path, entities: Mapping[str, Any]) -> Path:
    """Voxel uncertainty map on the T1w's own grid: the probability that the voxel's label is
    wrong (a ``probseg`` of the label "uncertainty").

    Example:
        >>> uncertainty_path("/out", {"subject": "01"}).as_posix()
        '/out/sub-01/anat/sub-01_label-uncertainty_desc-cadiff_probseg.nii.gz'
    """
    return (
        _anat_dir(output_dir, entities)
        / f"{source_prefix(entities)}_label-uncertainty_desc-{DESC}_probseg.nii.gz"
    )


def probseg_path(output_dir: str | Path, entities: Mapping[str, Any]) -> Path:
    """Class probabilities on the T1w's own grid (``--save-probabilities``): 4D, the fourth
    axis indexed like the ``index`` column of ``desc-cadiff_dseg.tsv``.

    Example:
        >>> probseg_path("/out", {"subject": "01", "run": "2"}).as_posix()
        '/out/sub-01/anat/sub-01_run-2_desc-cadiff_probseg.nii.gz'
    """
    return _anat_dir(output_dir, entities) / f"{source_prefix(entities)}_desc-{DESC}_probseg.nii.gz"


def image_sidecar_path(image_path: str | Path) -> Path:
    """The JSON sidecar beside a ``.nii.gz`` output.

    Example:
        >>> image_sidecar_path("/out/sub-01/anat/sub-01_desc-cadiff_probseg.nii.gz").name
        'sub-01_desc-cadiff_probseg.json'
    """
    path = Path(image_path)
    return path.with_name(path.name.split(".")[0] + ".json")


def qc_table_path(output_dir: str | Path, entities: Mapping[str, Any]) -> Path:
    """Per-structure QC table of one T1w (long format, bidsignored).

    Example:
        >>> qc_table_path("/out", {"subject": "01", "session": "2"}).as_posix()
        '/out/sub-01/ses-2/anat/sub-01_ses-2_desc-cadiff_qc.tsv'
    """
    return _anat_dir(output_dir, entities) / f"{source_prefix(entities)}_desc-{DESC}_qc.tsv"


def error_record_path(output_dir: str | Path, entities: Mapping[str, Any]) -> Path:
    """Record of a T1w that failed (JSON: ``Source``, ``Error``, ``Time``), under ``logs/``;
    removed when the image later succeeds.

    Example:
        >>> error_record_path("/out", {"subject": "01", "run": "1"}).as_posix()
        '/out/logs/sub-01_run-1_desc-cadiff_error.json'
    """
    return Path(output_dir) / "logs" / f"{source_prefix(entities)}_desc-{DESC}_error.json"


def lock_path(output_dir: str | Path, entities: Mapping[str, Any]) -> Path:
    """The lock file a participant job holds while it segments and writes one T1w
    (:mod:`bids_cadiff.io.locks`), under ``logs/locks/``; removed when the job is done.

    Example:
        >>> lock_path("/out", {"subject": "01", "session": "2"}).as_posix()
        '/out/logs/locks/sub-01_ses-2_desc-cadiff.lock'
    """
    return Path(output_dir) / "logs" / "locks" / f"{source_prefix(entities)}_desc-{DESC}.lock"


def participant_report_path(output_dir: str | Path, subject: str) -> Path:
    """HTML report of one participant at the output root, as fMRIPrep's.

    Example:
        >>> participant_report_path("/out", "01").as_posix()
        '/out/sub-01.html'
    """
    return Path(output_dir) / f"sub-{_label({'subject': subject}, 'subject')}.html"


def group_report_path(output_dir: str | Path) -> Path:
    """HTML report of the group level.

    Example:
        >>> group_report_path("/out").as_posix()
        '/out/group/desc-cadiff_report.html'
    """
    return Path(output_dir) / "group" / f"desc-{DESC}_report.html"


def image_output_paths(output_dir: str | Path, entities: Mapping[str, Any]) -> list[Path]:
    """Every file one T1w's participant run may write (the sidecar, its finished mark, last)."""
    maps = [uncertainty_path(output_dir, entities), probseg_path(output_dir, entities)]
    return [
        dseg_path(output_dir, entities),
        *maps,
        *(image_sidecar_path(m) for m in maps),
        volumes_path(output_dir, entities),
        qc_table_path(output_dir, entities),
        *(figure_path(output_dir, entities, kind) for kind in FIGURE_KINDS),
        dseg_sidecar_path(output_dir, entities),
    ]


def find_dseg_sidecars(output_dir: str | Path, subject: str | None = None) -> list[Path]:
    """Sidecars of finished label maps (of one subject, or all), sorted."""
    root = Path(output_dir)
    pattern = f"sub-{subject}/**/anat/*_desc-{DESC}_dseg.json" if subject else (
        f"sub-*/**/anat/*_desc-{DESC}_dseg.json"
    )
    return sorted(p for p in root.glob(pattern) if p.is_file())


def find_error_records(output_dir: str | Path, subject: str | None = None) -> list[Path]:
    """Error records of failed T1w images (of one subject, or all), sorted."""
    logs = Path(output_dir) / "logs"
    found = sorted(p for p in logs.glob(f"sub-*_desc-{DESC}_error.json") if p.is_file())
    if subject is None:
        return found
    return [p for p in found if entities_from_name(p.name).get("subject") == subject]


def group_volumes_path(output_dir: str | Path) -> Path:
    """Group-level volume table.

    Example:
        >>> group_volumes_path("/out").as_posix()
        '/out/group/desc-cadiff_volumes.tsv'
    """
    return Path(output_dir) / "group" / f"desc-{DESC}_volumes.tsv"


def group_volumes_sidecar_path(output_dir: str | Path) -> Path:
    """JSON data dictionary of :func:`group_volumes_path`.

    Example:
        >>> group_volumes_sidecar_path("/out").as_posix()
        '/out/group/desc-cadiff_volumes.json'
    """
    return group_volumes_path(output_dir).with_suffix(".json")


def dseg_tsv_path(output_dir: str | Path) -> Path:
    """Top-level label look-up table that applies to every dseg of the dataset.

    Example:
        >>> dseg_tsv_path("/out").as_posix()
        '/out/desc-cadiff_dseg.tsv'
    """
    return Path(output_dir) / f"desc-{DESC}_dseg.tsv"


def dataset_description_path(output_dir: str | Path) -> Path:
    """``dataset_description.json`` of the derivatives dataset."""
    return Path(output_dir) / "dataset_description.json"


def config_path(output_dir: str | Path, run_uuid: str) -> Path:
    """Where a run's configuration is recorded (fmriprep style, bidsignored).

    Example:
        >>> config_path("/out", "20240101-120000_ab12").as_posix()
        '/out/logs/config-20240101-120000_ab12.toml'
    """
    return Path(output_dir) / "logs" / f"config-{run_uuid}.toml"


def find_volume_tables(output_dir: str | Path) -> list[Path]:
    """Every per-image volume table under ``output_dir``, sorted (finished images or not:
    see :func:`is_finished`)."""
    root = Path(output_dir)
    return sorted(p for p in root.glob(f"sub-*/**/anat/*_desc-{DESC}_volumes.tsv") if p.is_file())


def is_finished(output_dir: str | Path, entities: Mapping[str, Any]) -> bool:
    """Whether the outputs of one T1w are finished: its dseg sidecar, written last, and the
    label map exist. (A participant job writing them, or killed while writing, leaves no
    sidecar; one redoing a finished image removes the sidecar first.)"""
    return dseg_sidecar_path(output_dir, entities).is_file() and (
        dseg_path(output_dir, entities).is_file()
    )


def entities_from_name(name: str) -> dict[str, str]:
    """Source entities parsed back from an output file name.

    Example:
        >>> entities_from_name("sub-01_ses-2_acq-fast_run-1_desc-cadiff_volumes.tsv")
        {'subject': '01', 'session': '2', 'acquisition': 'fast', 'run': '1'}
    """
    short_to_long = {short: long for long, short in SOURCE_ENTITIES}
    out: dict[str, str] = {}
    for part in name.split(".")[0].split("_"):
        key, sep, value = part.partition("-")
        if sep and key in short_to_long:
            out[short_to_long[key]] = value
    return out


# --------------------------------------------------------------------------- dataset level


def container_info(env: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """``GeneratedBy.Container`` when running inside Docker or Singularity/Apptainer, else None.

    Detection: ``SINGULARITY_CONTAINER`` / ``APPTAINER_CONTAINER`` (the image path, used as Tag
    unless ``CADIFF_CONTAINER_TAG`` is set); Docker's ``/.dockerenv``; podman's ``container``
    environment variable or ``/run/.containerenv`` (it runs the same OCI image, so the type is
    ``docker``). ``CADIFF_CONTAINER_TAG`` (set in our images) gives the tag.
    """
    env = os.environ if env is None else env
    tag = env.get("CADIFF_CONTAINER_TAG", "")
    for var in ("SINGULARITY_CONTAINER", "APPTAINER_CONTAINER"):
        if env.get(var):
            return {"Type": "singularity", "Tag": tag or env[var]}
    podman = env.get("container", "") in ("podman", "oci") or Path("/run/.containerenv").exists()
    if podman or Path("/.dockerenv").exists():
        return {"Type": "docker", "Tag": tag or f"bids_cadiff:{__version__}"}
    return None


def _raw_link(raw_dir: str | Path) -> str:
    raw = str(raw_dir)
    if "://" in raw or raw.startswith(("doi:", "bids:")):
        return raw
    return Path(raw).absolute().as_uri()


def dataset_description(raw_dir: str | Path, *, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Content of the derivatives ``dataset_description.json``.

    Args:
        raw_dir: the raw dataset (path or URI); recorded in ``DatasetLinks.raw`` so that
            ``bids:raw:`` URIs in sidecars resolve.
        env: environment to inspect for the container (defaults to :data:`os.environ`).
    """
    generated_by: dict[str, Any] = {
        "Name": PIPELINE_NAME,
        "Version": __version__,
        "CodeURL": CODE_URL,
    }
    container = container_info(env)
    if container is not None:
        generated_by["Container"] = container
    raw_name = "CA-Diff segmentation"
    raw_desc = Path(str(raw_dir)) / "dataset_description.json"
    if raw_desc.is_file():
        try:
            name = json.loads(raw_desc.read_text(encoding="utf-8")).get("Name")
            if name:
                raw_name = f"CA-Diff segmentation of {name}"
        except (OSError, ValueError):
            logger.warning("could not read %s; using a generic dataset name", raw_desc)
    link = _raw_link(raw_dir)
    return {
        "Name": raw_name,
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
        "SourceDatasets": [{"URL": link}],
        "DatasetLinks": {"raw": link},
    }


def _json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False, default=_json_default) + "\n"


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r}")


def write_dataset_description(
    output_dir: str | Path, raw_dir: str | Path, *, env: Mapping[str, str] | None = None
) -> Path:
    """Write ``dataset_description.json`` (see :func:`dataset_description`), atomically."""
    path = dataset_description_path(output_dir)
    return _write_if_changed(path, _json_text(dataset_description(raw_dir, env=env)))


def _write_if_changed(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically unless the file already holds exactly it.

    Jobs started together may all find the file missing and all write it: each write is a
    complete file renamed into place, so readers see one whole version or another.
    """
    try:
        if path.read_text(encoding="utf-8") == text:
            return path
    except (OSError, UnicodeDecodeError):
        pass
    return atomic_write(path, text)


def dseg_tsv_text(table: LabelTable) -> str:
    """The look-up table as TSV: ``index name abbreviation color mapping``.

    ``mapping`` is the integer of the BIDS common label (``n/a`` when the label has none).
    """
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(["index", "name", "abbreviation", "color", "mapping"])
    for entry in table.entries:
        if entry.bids_label and entry.bids_label not in BIDS_COMMON_LABELS:
            raise ValueError(
                f"label {entry.name!r} maps to {entry.bids_label!r}, which is not a BIDS common "
                f"label; use one of {sorted(BIDS_COMMON_LABELS)} or ''"
            )
        mapping = BIDS_COMMON_LABELS.get(entry.bids_label, "n/a") if entry.bids_label else "n/a"
        writer.writerow([entry.value, entry.name, entry.abbreviation, entry.color, mapping])
    return buf.getvalue()


def write_dseg_tsv(output_dir: str | Path, table: LabelTable) -> Path:
    """Write the top-level ``desc-cadiff_dseg.tsv`` look-up table, atomically (unless it holds
    the same table already; replacing another one is said in a warning)."""
    path = dseg_tsv_path(output_dir)
    text = dseg_tsv_text(table)
    try:
        before = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        before = None
    if before == text:
        return path
    if before is not None:
        logger.warning("%s held another label table: replaced by this model's; label maps "
                       "already in %s were made with the old one", path, path.parent)
    return atomic_write(path, text)


def write_bidsignore(output_dir: str | Path) -> Path:
    """Write ``.bidsignore`` listing :data:`BIDSIGNORE_PATTERNS`, keeping any other lines."""
    path = Path(output_dir) / ".bidsignore"
    lines: list[str] = []
    if path.is_file():
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    for pattern in BIDSIGNORE_PATTERNS:
        if pattern not in lines:
            lines.append(pattern)
    return _write_if_changed(path, "\n".join(lines) + "\n")


def dataset_lock_path(output_dir: str | Path) -> Path:
    """The lock file held while the dataset-level files are written (see
    :func:`init_derivatives`)."""
    return Path(output_dir) / "logs" / "locks" / "dataset.lock"


def init_derivatives(output_dir: str | Path, raw_dir: str | Path, table: LabelTable) -> None:
    """Write the dataset-level files: description, look-up table and ``.bidsignore``.

    Jobs started together take turns (a lock in ``logs/locks/``, :mod:`bids_cadiff.io.locks`):
    the first writes the files, the others find them as they would write them and leave them
    alone. Temporary files of these writes left by a killed job are removed.
    """
    with exclusive_lock(dataset_lock_path(output_dir)) as state:
        paths = [dataset_description_path(output_dir), dseg_tsv_path(output_dir),
                 Path(output_dir) / ".bidsignore"]
        if state.held:
            for path in paths:
                remove_stale_temporaries(path)
        write_dataset_description(output_dir, raw_dir)
        write_dseg_tsv(output_dir, table)
        write_bidsignore(output_dir)


# --------------------------------------------------------------------------- sidecars


def software_versions(packages: Sequence[str] = SOFTWARE_PACKAGES) -> dict[str, str]:
    """Versions of Python, bids_cadiff and ``packages`` (``"not installed"`` when absent)."""
    versions = {"python": platform.python_version(), "bids_cadiff": __version__}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def dseg_sidecar(
    *,
    sources: Sequence[str],
    model_name: str,
    model_version: str,
    model_sha256: str,
    steps: int,
    seed: int,
    device: str,
    run_time_s: float,
    atlas: str | None = None,
    registration: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Provenance sidecar of one label map.

    Args:
        sources: BIDS URIs of the inputs, e.g. ``["bids:raw:sub-01/anat/sub-01_T1w.nii.gz"]``
            (see :attr:`bids_cadiff.bidsio.query.T1wRecord.bids_uri`).
        model_name, model_version, model_sha256: the checkpoint used.
        steps: diffusion sampling steps.
        seed: random seed of the sampling.
        device: ``"cpu"`` or ``"cuda:0"``... that actually ran the model.
        run_time_s: wall-clock seconds spent on this image.
        atlas: atlas identifier (file name or URI), if an atlas prior was used.
        registration: registration quality metrics (e.g. ``{"Metric": "MI", "Value": 0.4}``).
        extra: further fields, added last (they may not override the above).

    Returns:
        A JSON-able dict; BIDS fields (``Sources``, ``Description``) first.
    """
    for uri in sources:
        if not uri.startswith("bids:"):
            raise ValueError(f"Sources must be BIDS URIs ('bids:raw:sub-...'), got {uri!r}")
    fields: dict[str, Any] = {
        "Description": "Brain structure label map by CA-Diff (collaborative anatomy diffusion).",
        "Sources": list(sources),
        "Model": {"Name": model_name, "Version": model_version, "SHA256": model_sha256},
        "SamplingSteps": int(steps),
        "RandomSeed": int(seed),
        "Device": device,
        "RunTimeSeconds": round(float(run_time_s), 3),
        "Software": software_versions(),
    }
    if atlas is not None:
        fields["Atlas"] = atlas
    if registration is not None:
        fields["Registration"] = dict(registration)
    for key, value in (extra or {}).items():
        if key in fields:
            raise ValueError(f"extra sidecar field {key!r} would override a standard field")
        fields[key] = value
    return fields


def write_dseg_sidecar(path: str | Path, fields: Mapping[str, Any]) -> Path:
    """Write a dseg sidecar (see :func:`dseg_sidecar`), atomically."""
    return atomic_write(path, _json_text(dict(fields)))


# --------------------------------------------------------------------------- label maps


def save_label_map(path: str | Path, data: np.ndarray, affine: np.ndarray, header: Any = None) -> Path:
    """Save an integer label map as NIfTI, atomically.

    Args:
        path: destination (``.nii.gz`` or ``.nii``), e.g. :func:`dseg_path`.
        data: ``(X, Y, Z)`` integer labels; must fit ``uint8`` (max < 256) or ``int16``.
        affine: ``(4, 4)`` voxel-to-world matrix of the source T1w.
        header: the source image's NIfTI header (``nib.Nifti1Header``) or ``None``; its
            qform/sform codes and spatial units are kept, its scaling is dropped.

    Returns:
        ``path``.

    Raises:
        ValueError: non-integer data, wrong dimensionality, or labels out of ``int16`` range.
    """
    import nibabel as nib

    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"label map must be 3-D (X, Y, Z), got shape {data.shape}")
    if not (np.issubdtype(data.dtype, np.integer) or data.dtype == bool):
        if not np.array_equal(data, np.round(data)):
            raise ValueError(f"label map must hold integers, got dtype {data.dtype}")
    lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
    if lo >= 0 and hi < 256:
        dtype: type = np.uint8
    elif lo >= np.iinfo(np.int16).min and hi <= np.iinfo(np.int16).max:
        dtype = np.int16
    else:
        raise ValueError(f"label values {lo}..{hi} do not fit int16")
    img = _image_like(data.astype(dtype), affine, header)
    img.header.set_slope_inter(1.0, 0.0)
    img.header.set_intent("label", name="dseg")
    return _save_image(path, img)


def _image_like(data: np.ndarray, affine: np.ndarray, header: Any) -> Any:
    """A NIfTI image of ``data`` with the source header's qform/sform codes and units."""
    import nibabel as nib

    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    new_header = nib.Nifti1Header()
    qcode, scode = 1, 1
    new_header.set_xyzt_units("mm", "sec")
    if header is not None:
        try:
            qcode = int(header["qform_code"]) or 0
            scode = int(header["sform_code"]) or 0
            space_unit, time_unit = header.get_xyzt_units()
            if space_unit != "unknown":
                new_header.set_xyzt_units(space_unit, time_unit if time_unit != "unknown" else "sec")
        except (KeyError, TypeError, AttributeError):
            logger.debug("header has no NIfTI qform/sform codes; using scanner (1)")
        if qcode == 0 and scode == 0:
            qcode = scode = 1
    img = nib.Nifti1Image(data, affine, new_header)
    img.set_qform(affine, code=qcode)
    img.set_sform(affine, code=scode)
    img.header.set_data_dtype(data.dtype)
    return img


def _save_image(path: str | Path, img: Any) -> Path:
    import nibabel as nib

    path = Path(path)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def save_probability_map(
    path: str | Path, data: np.ndarray, affine: np.ndarray, header: Any = None,
    *, scale: int = 255,
) -> Path:
    """Save probabilities stored as ``uint8`` (``round(p × scale)``) as NIfTI, atomically;
    the header's slope ``1 / scale`` makes readers see probabilities in [0, 1].

    Args:
        path: destination, e.g. :func:`uncertainty_path` or :func:`probseg_path`.
        data: ``(X, Y, Z)`` or ``(X, Y, Z, C)`` uint8.
        affine, header: as :func:`save_label_map`.
    """
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim not in (3, 4):
        raise ValueError(f"probabilities must be uint8 (X, Y, Z[, C]), got {data.dtype} {data.shape}")
    img = _image_like(data, affine, header)
    img.header.set_slope_inter(1.0 / scale, 0.0)
    return _save_image(path, img)


def image_sidecar(description: str, sources: Sequence[str], **fields: Any) -> dict[str, Any]:
    """A small JSON sidecar of a derived image: ``Description``, ``Sources`` (BIDS URIs), then
    ``fields``."""
    return {"Description": description, "Sources": list(sources), **fields}


def write_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write JSON atomically."""
    return atomic_write(path, _json_text(data))


# --------------------------------------------------------------------------- volumes


def compute_volumes(
    label_map: np.ndarray, voxel_volume_mm3: float, table: LabelTable
) -> dict[str, float]:
    """Volume of every structure of ``table`` in mm^3, plus :data:`TOTAL_BRAIN`.

    ``TotalBrain`` follows FreeSurfer's ``BrainSeg`` idea: the sum of every non-background
    structure except cerebrospinal fluid, i.e. every label whose BIDS common label is not
    ``BG`` or ``CSF`` (ventricles and extra-ventricular CSF are left out).

    Args:
        label_map: ``(X, Y, Z)`` integer label values (as written, not channel indices).
        voxel_volume_mm3: volume of one voxel (product of the zooms), > 0.
        table: the label table; values absent from it are ignored (logged at DEBUG).

    Returns:
        ``{abbreviation: mm3}`` in table order (background excluded), then ``TotalBrain``.

    Example:
        >>> from bids_cadiff.labels import SYNTHSEG32
        >>> lab = np.zeros((3, 3, 3), int); lab[0] = 2; lab[1, 0] = 4
        >>> v = compute_volumes(lab, 2.0, SYNTHSEG32)
        >>> v["L-WM"], v["L-LV"], v["TotalBrain"]
        (18.0, 6.0, 18.0)
    """
    if voxel_volume_mm3 <= 0:
        raise ValueError(f"voxel volume must be > 0 mm^3, got {voxel_volume_mm3}")
    values, counts = np.unique(np.asarray(label_map).astype(np.int64), return_counts=True)
    count_of = dict(zip(values.tolist(), counts.tolist()))
    known = set(table.values)
    unknown = sorted(set(count_of) - known)
    if unknown:
        logger.debug("label values not in the table, not counted: %s", unknown)
    volumes: dict[str, float] = {}
    total = 0.0
    for entry in table.entries:
        if entry.value == 0:
            continue
        vol = float(count_of.get(entry.value, 0)) * float(voxel_volume_mm3)
        volumes[entry.abbreviation] = vol
        if entry.bids_label not in ("BG", "CSF"):
            total += vol
    volumes[TOTAL_BRAIN] = total
    return volumes


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.3f}"
    return str(value)


def volumes_tsv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """TSV text of ``rows`` (missing values as ``n/a``); ``columns`` default to the first row's."""
    if columns is None:
        columns = list(rows[0]) if rows else []
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_fmt(row.get(c)) for c in columns])
    return buf.getvalue()


def write_qc_table(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Write a per-structure QC table (:mod:`bids_cadiff.qc.structures`), atomically: floats
    with 6 significant digits, lists (``flags``) comma-joined, missing values ``n/a``."""

    def fmt(value: Any) -> str:
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value) if value else "n/a"
        if isinstance(value, (float, np.floating)) and np.isfinite(value):
            return f"{float(value):.6g}"
        return _fmt(value)

    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([fmt(row.get(c)) for c in columns])
    return atomic_write(path, buf.getvalue())


def write_volumes_tsv(
    path: str | Path, volumes: Mapping[str, float], entities: Mapping[str, Any] | None = None
) -> Path:
    """Write one image's volumes (see :func:`compute_volumes`) as a one-row TSV, atomically.

    Args:
        path: destination, normally :func:`volumes_path`.
        volumes: ``{abbreviation: mm3}``.
        entities: source entities; written as leading ``participant_id``/``session_id``/
            ``acquisition``/``reconstruction``/``run`` columns when given, else parsed from
            the file name.
    """
    path = Path(path)
    if entities is None:
        entities = entities_from_name(path.name)
    row: dict[str, Any] = dict(entity_columns(entities))
    row.update(volumes)
    return atomic_write(path, volumes_tsv_text([row]))


def entity_columns(entities: Mapping[str, Any]) -> dict[str, str]:
    """BIDS tabular columns for a T1w's entities (participants.tsv / sessions.tsv style).

    Example:
        >>> entity_columns({"subject": "01", "session": "2", "run": 1})
        {'participant_id': 'sub-01', 'session_id': 'ses-2', 'run': '1'}
    """
    out: dict[str, str] = {}
    for key, short in SOURCE_ENTITIES:
        value = _label(entities, key)
        if value is None:
            continue
        if key == "subject":
            out["participant_id"] = f"sub-{value}"
        elif key == "session":
            out["session_id"] = f"ses-{value}"
        else:
            out[key] = value
    return out


#: Column order of entity columns in volume tables.
ENTITY_COLUMNS: tuple[str, ...] = (
    "participant_id",
    "session_id",
    "acquisition",
    "ceagent",
    "reconstruction",
    "run",
    "echo",
    "part",
    "chunk",
)

_ENTITY_DESCRIPTIONS: dict[str, str] = {
    "participant_id": "Participant label of the source T1w (sub-<label>).",
    "session_id": "Session label of the source T1w (ses-<label>).",
    "acquisition": "acq entity of the source T1w.",
    "reconstruction": "rec entity of the source T1w.",
    "run": "run entity of the source T1w.",
    "ceagent": "ce entity (contrast agent) of the source T1w.",
    "echo": "echo entity of the source T1w.",
    "part": "part entity (magnitude/phase...) of the source T1w.",
    "chunk": "chunk entity of the source T1w.",
}


def volumes_data_dictionary(columns: Sequence[str], table: LabelTable) -> dict[str, Any]:
    """JSON sidecar describing every column of a volume table (``Description``, ``Units``)."""
    by_abbrev = {e.abbreviation: e for e in table.entries}
    out: dict[str, Any] = {}
    for col in columns:
        if col in _ENTITY_DESCRIPTIONS:
            out[col] = {"Description": _ENTITY_DESCRIPTIONS[col]}
        elif col == TOTAL_BRAIN:
            out[col] = {
                "Description": "Total brain volume: sum of all labelled structures except "
                "background and cerebrospinal fluid (ventricles, CSF), as FreeSurfer BrainSeg.",
                "Units": "mm^3",
            }
        elif col == QC_COLUMN:
            out[col] = {
                "Description": "QC status of the image (its dseg sidecar's QC entry): pass, or "
                "fail with the failed checks in parentheses; n/a for outputs without QC.",
            }
        elif col in by_abbrev:
            entry = by_abbrev[col]
            out[col] = {
                "Description": f"Volume of {entry.name} (label {entry.value}).",
                "Units": "mm^3",
            }
        else:
            out[col] = {"Description": f"Volume of structure {col}.", "Units": "mm^3"}
    return out


def write_group_volumes(
    output_dir: str | Path,
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    table: LabelTable,
) -> tuple[Path, Path]:
    """Write the group volume table and its JSON data dictionary, atomically.

    Returns:
        ``(tsv_path, json_path)``.
    """
    tsv = atomic_write(group_volumes_path(output_dir), volumes_tsv_text(rows, columns))
    sidecar = atomic_write(
        group_volumes_sidecar_path(output_dir),
        _json_text(volumes_data_dictionary(columns, table)),
    )
    return tsv, sidecar


def _read_tsv(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """A TSV's column names and its rows as string dicts (``n/a`` kept as is)."""
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        rows = [dict(r) for r in reader]
        return list(reader.fieldnames or []), rows


def read_volumes_tsv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a volume TSV as string dicts (``n/a`` kept as is)."""
    return _read_tsv(path)[1]


__all__ = [
    "BIDS_COMMON_LABELS",
    "BIDS_VERSION",
    "DESC",
    "ENTITY_COLUMNS",
    "TOTAL_BRAIN",
    "compute_volumes",
    "config_path",
    "container_info",
    "dataset_description",
    "dseg_path",
    "dseg_sidecar",
    "dseg_sidecar_path",
    "dseg_tsv_path",
    "entities_from_name",
    "entity_columns",
    "figure_path",
    "find_volume_tables",
    "is_finished",
    "lock_path",
    "group_volumes_path",
    "group_volumes_sidecar_path",
    "init_derivatives",
    "read_dseg_tsv",
    "read_label_table_tsv",
    "read_volumes_tsv",
    "save_label_map",
    "software_versions",
    "source_prefix",
    "volumes_path",
    "write_bidsignore",
    "write_dataset_description",
    "write_dseg_sidecar",
    "write_dseg_tsv",
    "write_group_volumes",
    "write_volumes_tsv",
]


def read_label_table_tsv(path: str | Path) -> LabelTable:
    """Read a label table from a ``dseg.tsv`` look-up table (this app's or any BIDS dataset's).

    Columns: ``index`` or ``value`` (int, required), ``name``, ``abbreviation`` (either one
    required; each defaults to the other), ``color`` (``#rrggbb``, optional) and ``mapping``
    (optional: the integer of a BIDS common label, see :data:`BIDS_COMMON_LABELS`). The
    background (0) is added first if the file lacks it. Reads back what :func:`write_dseg_tsv`
    writes.

    Raises:
        UsageError: the file cannot be read or lacks the columns above (the message says which).
    """
    path = Path(path)
    try:
        columns, rows = _read_tsv(path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"cannot read label table {path}: {exc}") from None
    value_col = "index" if "index" in columns else "value" if "value" in columns else None
    if value_col is None or not ({"name", "abbreviation"} & set(columns)):
        raise UsageError(
            f"label table {path} needs an 'index' (or 'value') column and a 'name' or "
            f"'abbreviation' column; found {columns}"
        )
    by_number = {v: k for k, v in BIDS_COMMON_LABELS.items()}
    labels: list[Label] = []
    for row in rows:
        try:
            value = int(row[value_col])
        except (TypeError, ValueError):
            raise UsageError(
                f"label table {path}: {value_col} {row[value_col]!r} is not an integer"
            ) from None
        name = row.get("name") or row.get("abbreviation") or str(value)
        mapping = (row.get("mapping") or "").strip()
        bids_label = by_number.get(int(mapping), "") if mapping.isdigit() else ""
        labels.append(Label(value, name, row.get("abbreviation") or name,
                            row.get("color") or "#000000", bids_label))
    background = [lab for lab in labels if lab.value == 0]
    rest = [lab for lab in labels if lab.value != 0]
    entries = (background[0] if background else Label(0, "Unknown", "BG", "#000000"), *rest)
    try:
        return LabelTable(tuple(entries))
    except ValueError as exc:
        raise UsageError(f"label table {path}: {exc}") from None


def read_dseg_tsv(output_dir: str | Path) -> LabelTable | None:
    """The label table stored in ``desc-cadiff_dseg.tsv``, or ``None`` if there is none.

    Raises:
        UsageError: the file exists but cannot be read as a label table.
    """
    path = dseg_tsv_path(output_dir)
    if not path.is_file():
        return None
    return read_label_table_tsv(path)
