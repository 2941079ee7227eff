"""Run configuration: one frozen, documented schema, dumped with the outputs of every run.

:class:`RunConfig` is built once by :func:`bids_cadiff.cli.parser.parse_args` and passed down
explicitly (no module-level singleton). :meth:`RunConfig.to_toml` writes it in a form that
:mod:`tomllib` reads back; :func:`RunConfig.from_dict` rebuilds it from that.

Stdlib only.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field, fields
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal, Mapping

AnalysisLevel = Literal["participant", "group"]
Device = Literal["auto", "cpu", "cuda"]
Refinement = Literal["auto", "refiner", "refiner+em", "em", "none"]

ANALYSIS_LEVELS: tuple[str, ...] = ("participant", "group")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
#: Memory one image may need (peak resident; docs/performance.md measures 1.6 GiB for a
#: 0.88 mm head): ``--mem`` allows one image at once per this many GB.
GB_PER_IMAGE = 3.0
#: ``--refine`` choices: the model's 1 mm refiner and the EM intensity refinement on the T1w's
#: own grid (``auto`` takes both when the model has a refiner, else EM), either alone, or none.
REFINEMENTS: tuple[str, ...] = ("auto", "refiner", "refiner+em", "em", "none")


@dataclass(frozen=True)
class RunConfig:
    """Everything a ``bids_cadiff`` run depends on.

    Attributes:
        bids_dir: the raw BIDS dataset (absolute).
        output_dir: the derivatives dataset written by this app (absolute).
        analysis_level: ``"participant"`` or ``"group"``.
        participant_labels: subject labels without ``sub-``; empty means all subjects.
        session_labels: session labels without ``ses-``; empty means all sessions.
        bids_filters: PyBIDS filters per query, fmriprep style (``{"t1w": {"acquisition":
            "mprage"}}``), or ``None``.
        work_dir: scratch directory (absolute); intermediate files and caches go here.
        nprocs: total CPU budget (>= 1), fmriprep style; ``nprocs // omp_nthreads`` images
            may be processed in parallel.
        omp_nthreads: threads per image for torch / OpenMP / ITK (>= 1, <= nprocs).
        skip_bids_validation: do not run ``bids-validator-deno`` on the input.
        model: model checkpoint file, or ``None`` for the packaged default.
        atlas: atlas image for the anatomy prior, or ``None`` for the packaged default.
        device: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``.
        steps: number of diffusion sampling steps (>= 1).
        seed: random seed for sampling (recorded in every sidecar).
        refine: ``"em"``: the model's probabilities, resampled onto the T1w's own grid, are
            refined by the T1w's intensities (:mod:`bids_cadiff.inference.refine`);
            ``"refiner"``: the model's 1 mm refiner (:mod:`bids_cadiff.inference.refiner`)
            corrects them first; ``"refiner+em"``: both, the refiner's probabilities as the
            EM prior; ``"none"``: their plain argmax; ``"auto"``: ``"refiner+em"`` when the
            model has a refiner, else ``"em"``.
        samples: CA-Diff samples per image (>= 1); with 2 or more the uncertainty map is the
            samples' disagreement and the QC table gives each volume's spread.
        save_probabilities: also write the class probabilities on the T1w's grid (4D probseg).
        reports: write the HTML reports (participant: ``sub-<label>.html``; group:
            ``group/desc-cadiff_report.html``).
        orientation_check: check the header's orientation (``--skip-orientation-check``
            turns it off).
        mem_gb: memory budget in GB (``--mem``), or ``None``: images run in parallel only as
            far as it allows :data:`GB_PER_IMAGE` each.
        reproducible: bit-identical outputs for the same input, seed and thread count: ANTs
            (registration, N4) runs single-threaded. Its random seed is always ``seed``.
        overwrite: recompute outputs that already exist instead of skipping them.
        verbosity: number of ``-v`` flags (0: INFO, >= 1: DEBUG).
    """

    bids_dir: Path
    output_dir: Path
    analysis_level: AnalysisLevel
    participant_labels: tuple[str, ...] = ()
    session_labels: tuple[str, ...] = ()
    bids_filters: dict[str, Any] | None = None
    work_dir: Path = field(default_factory=lambda: Path.cwd() / "work")
    nprocs: int = 1
    omp_nthreads: int = 1
    skip_bids_validation: bool = False
    model: Path | None = None
    atlas: Path | None = None
    device: Device = "auto"
    steps: int = 5
    seed: int = 0
    refine: Refinement = "auto"
    samples: int = 1
    save_probabilities: bool = False
    reports: bool = True
    orientation_check: bool = True
    reproducible: bool = False
    mem_gb: float | None = None
    overwrite: bool = False
    verbosity: int = 0

    def __post_init__(self) -> None:
        if self.analysis_level not in ANALYSIS_LEVELS:
            raise ValueError(
                f"analysis_level must be one of {ANALYSIS_LEVELS}, got {self.analysis_level!r}"
            )
        if self.refine not in REFINEMENTS:
            raise ValueError(f"refine must be one of {REFINEMENTS}, got {self.refine!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        for name in ("nprocs", "omp_nthreads", "steps", "samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.mem_gb is not None and self.mem_gb < GB_PER_IMAGE:
            raise ValueError(
                f"--mem {self.mem_gb:g} GB is below the {GB_PER_IMAGE:g} GB one image may need; "
                f"give at least {GB_PER_IMAGE:g}G"
            )
        if self.verbosity < 0:
            raise ValueError(f"verbosity must be >= 0, got {self.verbosity!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON/TOML-able form: paths become strings, tuples lists, ``None`` is dropped.

        The ``bids_filters`` dict is deep-copied through JSON, so mutating the result never
        touches the configuration.
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = json.loads(json.dumps(value))
            out[f.name] = value
        return out

    def to_toml(self) -> str:
        """TOML text of :meth:`to_dict` under an ``[execution]`` table; :mod:`tomllib` reads it.

        Example:
            >>> cfg = RunConfig(Path("/data"), Path("/out"), "group", work_dir=Path("/w"))
            >>> text = cfg.to_toml()
            >>> RunConfig.from_dict(tomllib.loads(text)["execution"]) == cfg
            True
        """
        return dumps_toml({"execution": self.to_dict()})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
        """Inverse of :meth:`to_dict` (unknown keys are an error)."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown RunConfig keys: {sorted(unknown)}")
        kwargs: dict[str, Any] = dict(data)
        for name in ("bids_dir", "output_dir", "work_dir", "model", "atlas"):
            if kwargs.get(name) is not None:
                kwargs[name] = Path(kwargs[name])
        for name in ("participant_labels", "session_labels"):
            if name in kwargs:
                kwargs[name] = tuple(kwargs[name])
        return cls(**kwargs)

    def write_toml(self, path: str | Path) -> Path:
        """Write :meth:`to_toml` to ``path`` atomically (parent directories are created)."""
        import os
        import tempfile

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".toml", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(self.to_toml())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


# --------------------------------------------------------------------------- tiny TOML writer


def _toml_key(key: str) -> str:
    if key and all(c.isalnum() or c in "-_" for c in key):
        return key
    return _toml_string(key)


def _toml_string(value: str) -> str:
    # JSON string escaping is a subset of TOML basic-string escaping (\uXXXX, \", \\, \n ...).
    return json.dumps(value, ensure_ascii=False)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, Path):
        return _toml_string(str(value))
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"cannot write {type(value).__name__} value {value!r} to TOML")


def dumps_toml(data: Mapping[str, Any]) -> str:
    """Serialise a mapping to TOML.

    Top-level mappings become ``[tables]`` (one level deep); nested mappings below that are
    written as inline tables. ``None`` values are skipped (TOML has no null).

    Example:
        >>> print(dumps_toml({"a": 1, "t": {"b": "x", "c": [1, 2]}}), end="")
        a = 1
        <BLANKLINE>
        [t]
        b = "x"
        c = [1, 2]
    """
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            tables.append((str(key), value))
        else:
            lines.append(f"{_toml_key(str(key))} = {_toml_value(value)}")
    for name, table in tables:
        if lines:
            lines.append("")
        lines.append(f"[{_toml_key(name)}]")
        for key, value in table.items():
            if value is None:
                continue
            lines.append(f"{_toml_key(str(key))} = {_toml_value(_drop_none(value))}")
    return "\n".join(lines) + "\n"


def _drop_none(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value


def load_toml(path: str | Path) -> RunConfig:
    """Read a configuration written by :meth:`RunConfig.write_toml`."""
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    return RunConfig.from_dict(data["execution"])
