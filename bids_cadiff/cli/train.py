"""``cadiff-train BIDS_DIR LABELS_DIR OUTPUT_DIR``: train a CA-Diff model on labelled T1w images.

A recipe file (``--config``, e.g. ``configs/cadiff_3d.toml``) holds a whole configuration; any
option given on the command line overrides it; the resolved recipe is written to
``OUTPUT_DIR/train_config.toml`` beside the checkpoints. See :mod:`bids_cadiff.app.train`.

Multi-GPU (or multi-process CPU)::

    torchrun --nproc-per-node 4 $(which cadiff-train) BIDS LABELS OUT --config configs/cadiff_3d.toml

Exit codes: 0 trained (or stopped by ``--time-limit``, with a checkpoint); 1 unexpected error
or an image that cannot be prepared; 2 usage error (one line on stderr); 130 interrupted
(Ctrl-C: resume from the last periodic checkpoint with ``--resume auto``); 143 / 138 stopped by
SIGTERM / SIGUSR1 after writing a checkpoint of the iteration it was in (SLURM pre-emption or
``#SBATCH --signal=B:USR1@300``; resume with ``--resume auto``).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

from bids_cadiff import __version__
from bids_cadiff.cli.arguments import existing_dir, existing_file, fraction, positive
from bids_cadiff.cli.errors import EXIT_OK, argparse_exit_code, run_with_exit_code
from bids_cadiff.cli.parser import _OneLineParser
from bids_cadiff.cli.run import set_threads, setup_logging
from bids_cadiff.errors import UsageError

PROG = "cadiff-train"

#: ``dest`` of each recipe option → (recipe table, key).
RECIPE_OPTIONS: dict[str, tuple[str, str]] = {
    "participant_label": ("data", "participant_labels"),
    "val_participants": ("data", "val_participants"),
    "val_fraction": ("data", "val_fraction"),
    "labels": ("data", "labels"),
    "labels_desc": ("data", "labels_desc"),
    "work_dir": ("data", "work_dir"),
    "atlas": ("data", "atlas"),
    "registration": ("data", "registration"),
    "voxel_size": ("data", "voxel_size"),
    "synth_label_maps": ("data", "synth_label_maps"),
    "sampling_mode": ("sampling", "mode"),
    "field_jitter": ("sampling", "field_jitter"),
    "spatial_dims": ("model", "spatial_dims"),
    "mode": ("model", "mode"),
    "taca": ("model", "taca"),
    "channels": ("model", "channels"),
    "num_res_blocks": ("model", "num_res_blocks"),
    "time_embed_dim": ("model", "time_embed_dim"),
    "label_prior_bins": ("model", "label_prior_bins"),
    "timesteps": ("diffusion", "timesteps"),
    "sampling_steps": ("diffusion", "sampling_steps"),
    "consistency_loss": ("diffusion", "consistency_loss"),
    "similarity": ("diffusion", "similarity"),
    "sac_weight": ("diffusion", "sac_weight"),
    "t_m_max_fraction": ("diffusion", "t_m_max_fraction"),
    "t_d_zero_fraction": ("diffusion", "t_d_zero_fraction"),
    "batch_dice": ("diffusion", "batch_dice"),
    "patch_size": ("training", "patch_size"),
    "batch_size": ("training", "batch_size"),
    "lr": ("training", "lr"),
    "lr_schedule": ("training", "lr_schedule"),
    "iterations": ("training", "iterations"),
    "val_every": ("training", "val_every"),
    "checkpoint_every": ("training", "checkpoint_every"),
    "keep_checkpoints": ("training", "keep_checkpoints"),
    "seed": ("training", "seed"),
    "workers": ("training", "workers"),
    "augment": ("training", "augment"),
    "slice_axis": ("training", "slice_axis"),
    "time_limit": ("training", "time_limit"),
}


# --------------------------------------------------------------------------- type= validators


def _resume(value: str) -> str | Path:
    if value == "auto":
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(
            f"--resume {value}: no such checkpoint; pass OUTPUT_DIR/checkpoints/iter-*.pt or 'auto'"
        )
    return Path(os.path.abspath(path))


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([hms])")


def _duration(value: str) -> float:
    """Seconds of ``90``, ``90s``, ``45m``, ``7.5h``, ``2h30m``, ``HH:MM:SS`` or ``D-HH:MM:SS``
    (SLURM's forms)."""
    text = value.strip().lower()
    try:
        days = 0.0
        if "-" in text and ":" in text:
            head, text = text.split("-", 1)
            days = float(head)
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) > 3:
                raise ValueError
            seconds = days * 86400 + sum(p * 60**i for i, p in enumerate(reversed(parts)))
        elif text and text[-1] in "hms":
            parts = _DURATION_PART.findall(text)
            if "".join(n + u for n, u in parts) != text or len({u for _, u in parts}) < len(parts):
                raise ValueError
            unit = {"s": 1, "m": 60, "h": 3600}
            seconds = sum(float(n) * unit[u] for n, u in parts)
        else:
            seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--time-limit {value!r} is not a duration "
            "(examples: 90s, 45m, 7.5h, 2h30m, 02:30:00, 1-00:00:00)"
        ) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"--time-limit must be > 0, got {value!r}")
    return seconds


def _label(value: str) -> str:
    label = value[4:] if value.startswith("sub-") else value
    if not label.isalnum():
        raise argparse.ArgumentTypeError(f"participant label {value!r} is not a BIDS label (e.g. 01)")
    return label


def build_parser() -> argparse.ArgumentParser:
    """The ``cadiff-train`` argument parser (argparse and ``type=`` checks only).

    Recipe options default to ``argparse.SUPPRESS``: only options given on the command line
    appear in the namespace and override the ``--config`` recipe.
    """
    parser = _OneLineParser(
        prog=PROG,
        description="Train a CA-Diff segmentation model on T1w images with label maps.",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    parser.add_argument("bids_dir", type=existing_dir("BIDS"), help="raw BIDS dataset (T1w)")
    parser.add_argument(
        "labels_dir", type=existing_dir("labels"),
        help="BIDS-Derivatives dataset of *_dseg label maps matching the T1w images",
    )
    parser.add_argument("output_dir", type=Path, help="where checkpoints and logs are written")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--config", type=existing_file("--config"), metavar="TOML",
                        help="recipe file (configs/*.toml); command-line options override it")
    parser.add_argument("--resume", type=_resume, metavar="CKPT|auto",
                        help="continue a run from a checkpoint ('auto': the latest in OUTPUT_DIR)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar")
    parser.add_argument("--nthreads", type=positive(int, "--nthreads"), metavar="N",
                        help="torch CPU threads per process (default: torch's choice)")

    data = parser.add_argument_group("data")
    data.add_argument("--participant-label", nargs="+", type=_label, metavar="LABEL",
                      help="subjects to use (training and validation); default: all")
    data.add_argument("--val-participants", nargs="+", type=_label, metavar="LABEL",
                      help="subjects held out for validation Dice")
    data.add_argument("--val-fraction", type=fraction("--val-fraction", one=False, example="0.1"), metavar="F",
                      help="fraction of subjects held out when --val-participants is not given "
                      "(default 0.1)")
    data.add_argument("--labels", metavar="NAME_OR_TSV",
                      help="label table: synthseg32 (default; FreeSurfer aseg merged), dseg "
                      "(LABELS_DIR/dseg.tsv) or a TSV with index/name columns")
    data.add_argument("--labels-desc", metavar="LABEL", help="use only label maps with this desc")
    data.add_argument("-w", "--work-dir", type=Path, metavar="DIR",
                      help="cache of prepared images and registrations (default OUTPUT_DIR/work)")
    data.add_argument("--atlas", type=existing_file("--atlas"), metavar="NIFTI",
                      help="atlas T1w of the distance field (default: Colin27)")
    data.add_argument("--registration", choices=("syn", "affine", "none"),
                      help="atlas registration: syn (default), affine, none (identity; tests)")
    data.add_argument("--voxel-size", nargs="+", type=positive(float, "--voxel-size"),
                      metavar="MM", help="model grid in mm: one value or three (default 1)")
    data.add_argument("--synth-label-maps", type=existing_dir("--synth-label-maps"), metavar="DIR",
                      help="label maps without images (FreeSurfer values) to synthesise training "
                      "images from (with --sampling mixed)")
    data.add_argument("--sampling", dest="sampling_mode", choices=("patches", "mixed"),
                      help="patches: real images, MONAI augmentation (the paper; default); "
                      "mixed: real and synthesised images, class balance, skull on and off")
    data.add_argument("--field-jitter", type=positive(float, "--field-jitter", zero=True),
                      metavar="VOXELS", help="registration jitter: smooth random displacement "
                      "of the distance field alone, in voxels (mixed sampling; 0: none)")

    model = parser.add_argument_group("model (ablation switches)")
    model.add_argument("--spatial-dims", type=int, choices=(2, 3),
                       help="3: 3D patches (default); 2: 2D slices")
    model.add_argument("--mode", choices=("diffusion", "dual", "collaborative"),
                       help="diffusion: image only; dual: field as clean condition; "
                       "collaborative: CA-Diff (default)")
    model.add_argument("--no-taca", dest="taca", action="store_false",
                       help="plain skip connections instead of TACA")
    model.add_argument("--channels", nargs="+", type=positive(int, "--channels"), metavar="N",
                       help="feature widths per U-Net level (default 16 32 64 128)")
    model.add_argument("--num-res-blocks", type=positive(int, "--num-res-blocks"))
    model.add_argument("--time-embed-dim", type=positive(int, "--time-embed-dim"))
    model.add_argument("--label-prior-bins", type=positive(int, "--label-prior-bins", zero=True),
                       metavar="B", help="add a distance-field label prior on B³ cells, built "
                       "from the training labels, to the logits (0: none, the paper; the default "
                       "model uses 48)")
    model.add_argument("--timesteps", type=positive(int, "--timesteps"), help="T (default 1000)")
    model.add_argument("--sampling-steps", type=positive(int, "--sampling-steps"),
                       help="DDIM steps S for validation/inference (default 5)")
    model.add_argument("--no-consistency", dest="consistency_loss", action="store_false",
                       help="train without the spatial-anatomical consistency loss")
    model.add_argument("--similarity", choices=("cosine", "dice"), help="Sim_M of L_sac")
    model.add_argument("--sac-weight", type=positive(float, "--sac-weight", zero=True))
    model.add_argument("--t-m-max-fraction", type=fraction("--t-m-max-fraction", one=True, example="0.5"),
                       metavar="P", help="fraction of samples trained at t_m = T, the sampler's "
                       "first step (paper: 0, uniform timesteps)")
    model.add_argument("--t-d-zero-fraction", type=fraction("--t-d-zero-fraction", one=True, example="0.5"),
                       metavar="P", help="fraction of samples trained with the clean distance "
                       "field, t_d = 0, as at inference (paper: 0)")
    model.add_argument("--batch-dice", action="store_true",
                       help="Dice loss over the whole batch instead of per sample")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--patch-size", nargs="+", type=positive(int, "--patch-size"), metavar="N",
                     help="patch in voxels: one value or one per axis (default 96 in 3D, 160 in 2D)")
    opt.add_argument("--batch-size", type=positive(int, "--batch-size"),
                     help="patches per step and process (default 2 in 3D, 70 in 2D)")
    opt.add_argument("--lr", type=positive(float, "--lr"), help="AdamW learning rate (1e-4)")
    opt.add_argument("--lr-schedule", choices=("constant", "cosine", "poly"))
    opt.add_argument("--iterations", type=positive(int, "--iterations"), help="(200000)")
    opt.add_argument("--val-every", type=positive(int, "--val-every", zero=True), metavar="N",
                     help="validation Dice every N iterations (0: never; default 1000)")
    opt.add_argument("--checkpoint-every", type=positive(int, "--checkpoint-every"), metavar="N")
    opt.add_argument("--keep-checkpoints", type=positive(int, "--keep-checkpoints", zero=True),
                     metavar="N", help="periodic checkpoints kept (0: all; default 3)")
    opt.add_argument("--seed", type=positive(int, "--seed", zero=True))
    opt.add_argument("--workers", type=positive(int, "--workers", zero=True),
                     help="DataLoader worker processes (default 0)")
    opt.add_argument("--no-augment", dest="augment", action="store_false")
    opt.add_argument("--slice-axis", type=int, choices=(0, 1, 2), help="2D: slice axis (2 axial)")
    opt.add_argument("--time-limit", type=_duration, metavar="DURATION",
                     help="stop cleanly with a checkpoint after this long (e.g. 90s, 45m, 7.5h, "
                     "02:30:00); continue later with --resume auto")
    return parser


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe tables the command line sets (only options actually given)."""
    out: dict[str, dict[str, Any]] = {"data": {}}
    given = vars(args)
    for dest, (table, key) in RECIPE_OPTIONS.items():
        if dest in given:
            value = given[dest]
            out.setdefault(table, {})[key] = str(value) if isinstance(value, Path) else value
    for key in ("bids_dir", "labels_dir", "output_dir"):
        out["data"][key] = str(Path(os.path.abspath(given[key])))
    if "work_dir" in out["data"]:
        out["data"]["work_dir"] = os.path.abspath(out["data"]["work_dir"])
    return out


def _check_paths(args: argparse.Namespace) -> None:
    out = Path(os.path.abspath(args.output_dir))
    for what, path in (("BIDS_DIR", args.bids_dir), ("LABELS_DIR", args.labels_dir)):
        if out == Path(path):
            raise UsageError(
                f"OUTPUT_DIR is the same folder as {what}; write elsewhere "
                f"(suggestion: {Path(args.bids_dir) / 'derivatives' / 'cadiff-train'})"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cadiff-train``; returns the exit code (see the module docstring)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return argparse_exit_code(exc)
    setup_logging(getattr(args, "verbose", 0))
    if "nthreads" in args:
        set_threads(args.nthreads)
    from bids_cadiff.app.train import TrainConfig, load_recipe, merge_recipes, run_training

    def train() -> int:
        _check_paths(args)
        recipe = load_recipe(args.config) if "config" in args else {}
        config = TrainConfig.from_dict(merge_recipes(recipe, overrides_from_args(args)))
        result = run_training(config, resume=getattr(args, "resume", None),
                              progress=getattr(args, "progress", True))
        if result.signal is not None:  # stopped by the scheduler: not a finished model
            return 128 + int(getattr(signal, result.signal))
        return EXIT_OK

    return run_with_exit_code(
        train, prog=PROG, interrupted="interrupted; continue with --resume auto"
    )


if __name__ == "__main__":
    sys.exit(main())
