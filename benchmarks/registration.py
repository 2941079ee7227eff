"""Time and score atlas registration settings on one T1w image.

Runs affine-only (2 mm), SyN at 2 mm and SyN at 1 mm (the baseline) from the same atlas, then
prints a table: seconds, registration NCC, and how far each setting's warped distance field is
from the 1 mm SyN one inside the brain (mean, mm), with time ratios against the baseline
measured in the same run.

Usage::

    .venv/bin/python benchmarks/registration.py [IMAGE] [--atlas PATH] [--skip-1mm]

IMAGE defaults to ``../shared/data/raw_t1/chris_t1.nii.gz``. Threads: set
``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` in the environment to fix ANTs' thread count.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_cadiff.imaging.distance_field import scaling_radii
from bids_cadiff.imaging.preprocess import to_ras
from bids_cadiff.registration.ants import RegistrationParams, register_atlas, warp_distance_field
from bids_cadiff.registration.atlas import atlas_distance_field, load_atlas, resolve_atlas

logger = logging.getLogger("benchmarks.registration")

DEFAULT_IMAGE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "raw_t1" / "chris_t1.nii.gz"

SETTINGS: dict[str, RegistrationParams] = {
    "affine 2mm": RegistrationParams(resolution_mm=2.0, type_of_transform="Affine"),
    "SyN 2mm": RegistrationParams(resolution_mm=2.0, type_of_transform="SyN"),
    "SyN 1mm": RegistrationParams(
        resolution_mm=1.0, type_of_transform="SyN",
        aff_shrink_factors=(8, 4, 2), aff_smoothing_sigmas=(3.0, 2.0, 1.0),
        reg_iterations=(40, 20, 10, 5),
    ),
}
BASELINE = "SyN 1mm"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", nargs="?", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--atlas", type=Path, default=None)
    parser.add_argument("--skip-1mm", action="store_true",
                        help="skip the slow 1 mm baseline (ratios then use SyN 2mm)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if not args.image.is_file():
        logger.error("image not found: %s (pass a T1w path)", args.image)
        return 1
    fixed = to_ras(nib.load(args.image))
    spec = resolve_atlas(args.atlas)
    atlas_img, field = atlas_distance_field(spec)
    radii = scaling_radii(load_atlas(spec).brain_mask, atlas_img.affine, spec.origin_world)
    names = [n for n in SETTINGS if not (args.skip_1mm and n == BASELINE)]
    baseline = BASELINE if BASELINE in names else "SyN 2mm"
    rows: dict[str, tuple[float, float, np.ndarray]] = {}
    for name in names:
        reg = register_atlas(fixed, spec, cache_dir=None, params=SETTINGS[name],
                             min_quality=-1.0, image_path=args.image)
        warped = warp_distance_field(field, atlas_img, reg, fixed)
        rows[name] = (reg.seconds, reg.quality, warped)
        for path in reg.forward_transforms:
            path.unlink(missing_ok=True)
    ref_seconds, _, ref_field = rows[baseline]
    brain = ref_field[0] > 0
    threads = os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", f"default ({os.cpu_count()} CPUs)")
    logger.info("\nimage %s, atlas %s, ITK threads %s", args.image, spec.name, threads)
    logger.info("%-11s %9s %7s %9s %18s", "setting", "seconds", "NCC", "x time", f"field vs {baseline}")
    for name, (seconds, quality, warped) in rows.items():
        diff_mm = (np.abs(warped - ref_field)[:, brain] * (2 * radii[:, None])).mean()
        logger.info("%-11s %9.1f %7.3f %9.2f %15.2f mm", name, seconds, quality,
                    seconds / ref_seconds, diff_mm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
