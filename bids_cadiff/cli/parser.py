"""Command line of the BIDS App: ``bids_cadiff BIDS_DIR OUTPUT_DIR {participant,group} [opts]``.

:func:`build_parser` is argparse only (values checked by ``type=`` callables);
:func:`parse_args` adds the checks that involve several arguments and returns a
:class:`~bids_cadiff.config.RunConfig`. Option names follow fmriprep.

Every problem found here is a usage error: argparse prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any, NoReturn, Sequence

from bids_cadiff import __version__
from bids_cadiff.config import ANALYSIS_LEVELS, DEVICES, GB_PER_IMAGE, REFINEMENTS, RunConfig

_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")


class _OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line: ``bids_cadiff: error: <message>``.

    (argparse's default prints the whole usage block first.)
    """

    def error(self, message: str) -> NoReturn:
        message = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {message}\n")


# --------------------------------------------------------------------------- type= validators


def _label(prefix: str, what: str):  # noqa: ANN202 - returns a type= callable
    def check(value: str) -> str:
        label = value[len(prefix):] if value.startswith(prefix) else value
        if "/" in label or "\\" in label or label in ("", ".", ".."):
            raise argparse.ArgumentTypeError(
                f"{what} label {value!r} looks like a path; give the label only "
                f"(e.g. '01' or '{prefix}01')."
            )
        if not _LABEL_RE.match(label):
            raise argparse.ArgumentTypeError(
                f"{what} label {value!r} is not a BIDS label: use letters and digits only "
                f"(e.g. '01' or '{prefix}01')."
            )
        return label

    check.__name__ = f"{what} label"
    return check


participant_label = _label("sub-", "participant")
session_label = _label("ses-", "session")


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be >= 1")
    return number


_MEM_UNITS = {"": 1e-3, "k": 1e-6, "m": 1e-3, "g": 1.0, "t": 1e3}


def _memory_gb(value: str) -> float:
    """``--mem``: a size with an optional unit (K, M, G, T, with or without B); a bare number
    is in MB, as in fMRIPrep. Returns GB.

    Example:
        >>> _memory_gb("16G"), _memory_gb("8000"), _memory_gb("2.5GB")
        (16.0, 8.0, 2.5)
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)[bB]?\s*", value)
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"memory {value!r} is not a size; write e.g. 16G, 16GB or 16000 (MB)"
        )
    return float(match.group(1)) * _MEM_UNITS[match.group(2).lower()]


def _seed(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed {value!r} is not an integer") from None
    if not 0 <= number < 2**32:
        raise argparse.ArgumentTypeError(f"seed {value!r} must be between 0 and 2**32 - 1")
    return number


def _existing_dir(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"BIDS dataset folder does not exist: {value}")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"not a folder: {value}; give the BIDS dataset root")
    return Path(os.path.abspath(path))


def _output_dir(value: str) -> Path:
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"output path {value} is an existing file; give a folder (it is created if missing)"
        )
    return Path(os.path.abspath(path))


def _existing_file(what: str):  # noqa: ANN202 - returns a type= callable
    def check(value: str) -> Path:
        path = Path(value).expanduser()
        if not path.exists():
            raise argparse.ArgumentTypeError(f"{what} file does not exist: {value}")
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"{what} path is not a file: {value}")
        return Path(os.path.abspath(path))

    check.__name__ = f"{what} file"
    return check


def _filter_file(value: str) -> dict[str, Any]:
    """Read and check a ``--bids-filter-file`` (JSON object of objects)."""
    path = Path(value).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"BIDS filter file does not exist: {value}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read BIDS filter file {value}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"BIDS filter file {value} is not valid JSON ({exc.msg} at line {exc.lineno}, "
            f"column {exc.colno})"
        ) from None
    example = '{"t1w": {"acquisition": "mprage"}}'
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError(
            f"BIDS filter file {value} must hold a JSON object such as {example}"
        )
    for query, filters in data.items():
        if not isinstance(filters, dict):
            raise argparse.ArgumentTypeError(
                f"BIDS filter file {value}: {query!r} must map to an object of entity filters, "
                f"such as {example}"
            )
        for entity, filt in filters.items():
            ok = filt is None or isinstance(filt, (str, int)) or (
                isinstance(filt, list) and all(isinstance(v, (str, int)) or v is None for v in filt)
            )
            if not ok or isinstance(filt, bool):
                raise argparse.ArgumentTypeError(
                    f"BIDS filter file {value}: {query}.{entity} must be a string, integer, "
                    f"null or a list of those, got {json.dumps(filt)}"
                )
    return data


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser alone (no cross-argument checks; see :func:`parse_args`)."""
    parser = _OneLineParser(
        prog="bids_cadiff",
        description="CA-Diff brain structure segmentation of T1w images (BIDS App).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "bids_dir", type=_existing_dir, help="root folder of the raw BIDS dataset (read only)"
    )
    parser.add_argument(
        "output_dir",
        type=_output_dir,
        help="folder of the derivatives dataset to write (e.g. BIDS_DIR/derivatives/cadiff)",
    )
    parser.add_argument(
        "analysis_level",
        choices=ANALYSIS_LEVELS,
        help="'participant': segment every selected T1w; 'group': aggregate volumes",
    )
    parser.add_argument("--version", action="version", version=f"bids_cadiff {__version__}")

    sel = parser.add_argument_group("selecting inputs")
    sel.add_argument(
        "--participant-label",
        "--participant_label",
        dest="participant_labels",
        type=participant_label,
        nargs="+",
        action="extend",
        default=[],
        metavar="LABEL",
        help="participants to process, with or without 'sub-' (default: all)",
    )
    sel.add_argument(
        "--session-label",
        "--session_label",
        dest="session_labels",
        type=session_label,
        nargs="+",
        action="extend",
        default=[],
        metavar="LABEL",
        help="sessions to process, with or without 'ses-' (default: all)",
    )
    sel.add_argument(
        "--bids-filter-file",
        "--bids_filter_file",
        dest="bids_filters",
        type=_filter_file,
        default=None,
        metavar="FILE",
        help='JSON file of PyBIDS filters, fmriprep style: {"t1w": {"acquisition": "mprage"}}',
    )
    sel.add_argument(
        "--skip-bids-validation",
        "--skip_bids_validation",
        dest="skip_bids_validation",
        action="store_true",
        help="do not run bids-validator-deno on BIDS_DIR",
    )

    perf = parser.add_argument_group("resources")
    perf.add_argument(
        "-w",
        "--work-dir",
        "--work_dir",
        dest="work_dir",
        type=_output_dir,
        default=None,
        metavar="DIR",
        help="scratch folder (default: ./work)",
    )
    perf.add_argument(
        "--nprocs",
        "--n-cpus",
        "--n_cpus",
        dest="nprocs",
        type=_positive_int,
        default=None,
        metavar="N",
        help="total CPU budget; nprocs // omp-nthreads images run in parallel "
        "(default: CPUs available)",
    )
    perf.add_argument(
        "--omp-nthreads",
        "--omp_nthreads",
        dest="omp_nthreads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="threads per image for torch/OpenMP/ITK (default: min(8, nprocs))",
    )
    perf.add_argument(
        "--mem",
        "--mem-mb",
        "--mem_mb",
        dest="mem_gb",
        type=_memory_gb,
        default=None,
        metavar="SIZE",
        help="memory budget of the run (e.g. 16G; a bare number is MB, as in fMRIPrep): at most "
        "one image per 3 GB runs at once, and a budget under 3 GB is refused (default: no "
        "limit besides --nprocs)",
    )
    perf.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where the model runs; 'auto' uses CUDA when available",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        type=_existing_file("model checkpoint"),
        default=None,
        metavar="PATH",
        help="model checkpoint (default: the packaged one)",
    )
    model.add_argument(
        "--atlas",
        type=_existing_file("atlas"),
        default=None,
        metavar="PATH",
        help="atlas image for the anatomy prior (default: the packaged one)",
    )
    model.add_argument(
        "--steps", type=_positive_int, default=5, metavar="N", help="diffusion sampling steps"
    )
    model.add_argument("--seed", type=_seed, default=0, metavar="N", help="random seed")
    model.add_argument(
        "--refine",
        choices=REFINEMENTS,
        default="auto",
        help="auto (default): 'refiner+em' when the model has a 1 mm refiner, else 'em'. "
        "refiner: the model's probabilities, upsampled to 1 mm, "
        "are corrected by its refiner network with the 1 mm image, then resampled onto the "
        "T1w's own grid; em: the model's probabilities, on the T1w's own grid, are refined "
        "with its intensities (per-structure Gaussian intensity models fitted by EM, the "
        "probabilities as the spatial prior); refiner+em: the refiner's probabilities as the "
        "EM's prior; none: the model's plain argmax",
    )
    model.add_argument(
        "--samples",
        type=_positive_int,
        default=1,
        metavar="N",
        help="CA-Diff samples per image (default 1). With N >= 2 the labels come from the mean "
        "of N samples, the uncertainty map is the fraction of samples that disagree with the "
        "final label, and the QC table gives each volume's spread; each sample costs one more "
        "inference and refinement (docs/performance.md)",
    )
    model.add_argument(
        "--save-probabilities",
        action="store_true",
        help="also write every structure's probability on the T1w's grid "
        "(<source>_desc-cadiff_probseg.nii.gz, 4D, volumes in desc-cadiff_dseg.tsv order)",
    )

    other = parser.add_argument_group("other")
    other.add_argument(
        "--reproducible",
        action="store_true",
        help="bit-identical outputs for the same input, --seed and --omp-nthreads, also with a "
        "fresh work dir: ANTs (registration, N4) runs single-threaded, which is slower "
        "(docs/performance.md). Without it, multi-threaded ANTs can give slightly different "
        "registrations from run to run",
    )
    other.add_argument(
        "--skip-orientation-check",
        action="store_true",
        help="do not check that the header's orientation is the one the atlas fits best "
        "(saves about 5 s per image where the headers are known to be right; the QC then has "
        "no orientation check: docs/qc.md)",
    )
    other.add_argument(
        "--no-reports",
        action="store_true",
        help="do not write the HTML reports (sub-<label>.html; group/desc-cadiff_report.html)",
    )
    other.add_argument(
        "--overwrite",
        action="store_true",
        help="recompute outputs that already exist (default: skip finished images)",
    )
    other.add_argument(
        "-v",
        "--verbose",
        dest="verbosity",
        action="count",
        default=0,
        help="more log output (-v: DEBUG)",
    )
    return parser


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.relative_to(parent)
    except ValueError:
        return False
    return True


def parse_args(argv: Sequence[str] | None = None) -> RunConfig:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into a :class:`RunConfig`.

    Usage errors (exit code 2, one line on stderr, no traceback): a BIDS_DIR without
    ``dataset_description.json``, an OUTPUT_DIR equal to BIDS_DIR or an existing file, a work
    dir equal to BIDS_DIR or OUTPUT_DIR, labels that are paths, a model/atlas file that does not
    exist, bad numbers, unknown options. Labels that match no participant are checked when the
    dataset is queried (:func:`bids_cadiff.bidsio.query.find_t1w`).

    Raises:
        SystemExit: code 2 on usage errors; code 0 for ``--help`` / ``--version``.
    """
    parser = build_parser()
    opts = parser.parse_args(argv)

    bids_dir: Path = opts.bids_dir
    output_dir: Path = opts.output_dir
    if not (bids_dir / "dataset_description.json").is_file():
        parser.error(
            f"{bids_dir} is not a BIDS dataset: it has no dataset_description.json. "
            "Give the root folder of the raw BIDS dataset."
        )
    if output_dir.resolve() == bids_dir.resolve():
        parser.error(
            "the output folder is the BIDS input folder; choose another one "
            f"(suggestion: {bids_dir / 'derivatives' / 'cadiff'})."
        )
    if _is_within(bids_dir.resolve(), output_dir.resolve()):
        parser.error(
            f"the output folder {output_dir} contains the BIDS input folder; choose another one "
            f"(suggestion: {bids_dir / 'derivatives' / 'cadiff'})."
        )
    if _is_within(output_dir.resolve(), bids_dir.resolve()) and not _is_within(
        output_dir.resolve(), (bids_dir / "derivatives").resolve()
    ):
        parser.error(
            f"the output folder {output_dir} is inside the BIDS input folder but not under its "
            f"derivatives/ folder; use e.g. {bids_dir / 'derivatives' / 'cadiff'}."
        )

    work_dir: Path = opts.work_dir or Path(os.path.abspath("work"))
    if work_dir.resolve() in (bids_dir.resolve(), output_dir.resolve()):
        parser.error(
            f"the work folder {work_dir} must differ from the input and output folders "
            "(give -w/--work-dir a scratch folder)."
        )

    nprocs = opts.nprocs or _available_cpus()
    omp_nthreads = opts.omp_nthreads or min(8, nprocs)
    if omp_nthreads > nprocs:
        if opts.nprocs is not None:
            parser.error(
                f"--omp-nthreads {omp_nthreads} is larger than --nprocs {nprocs} (the total "
                "CPU budget); lower --omp-nthreads or raise --nprocs."
            )
        nprocs = omp_nthreads
    if opts.mem_gb is not None and opts.mem_gb < GB_PER_IMAGE:
        parser.error(
            f"--mem {opts.mem_gb:g} GB is below the {GB_PER_IMAGE:g} GB one image may need; "
            f"give at least --mem {GB_PER_IMAGE:g}G (or leave --mem out)."
        )

    return RunConfig(
        bids_dir=bids_dir,
        output_dir=output_dir,
        analysis_level=opts.analysis_level,
        participant_labels=tuple(dict.fromkeys(opts.participant_labels)),
        session_labels=tuple(dict.fromkeys(opts.session_labels)),
        bids_filters=opts.bids_filters,
        work_dir=work_dir,
        nprocs=nprocs,
        omp_nthreads=omp_nthreads,
        skip_bids_validation=opts.skip_bids_validation,
        model=opts.model,
        atlas=opts.atlas,
        device=opts.device,
        steps=opts.steps,
        seed=opts.seed,
        refine=opts.refine,
        samples=opts.samples,
        save_probabilities=opts.save_probabilities,
        reports=not opts.no_reports,
        orientation_check=not opts.skip_orientation_check,
        reproducible=opts.reproducible,
        mem_gb=opts.mem_gb,
        overwrite=opts.overwrite,
        verbosity=opts.verbosity,
    )
