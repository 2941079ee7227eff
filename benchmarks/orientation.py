"""Measure the orientation check's margins on every real T1w of the shared data.

For each image (fstd sub-01..07 ``T1.mgz`` and ``brainmask.mgz``, ``raw_t1/chris_t1.nii.gz``,
``raw_t1/t1_crop.nii.gz``) and each header (the true one, and the 7 lying ones of
:data:`~bids_cadiff.registration.orientation.CANDIDATES`: each axis flipped, each 180°
rotation, all three flipped; made with :func:`~bids_cadiff.registration.orientation.flip_header`,
the voxels untouched), it runs what the participant pipeline runs (RAS, 2 mm, N4, then
:func:`~bids_cadiff.registration.orientation.check_orientation`) and writes one TSV row: the 8
fits, the decision, whether it is the expected one, and the seconds (wall and CPU).

``--extras`` adds correct headers that are unusual but valid (the head tilted 20° in its
affine, the top 30 mm or the bottom 45 mm of the field of view cut away) on chris_t1 and
sub-01; none may be flagged.

At the end it writes a per-image summary (Markdown, beside the TSV: ``summary.md``); with
``--summary-only`` it only rewrites that from an existing TSV.

Usage::

    .venv/bin/python benchmarks/orientation.py [--out artifacts/orientation/margins.tsv]
        [--images NAME ...] [--headers NAME ...] [--extras] [--summary-only]

Threads: set ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` (the app sets it from --omp-nthreads).
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np

from bids_cadiff.imaging.preprocess import n4_bias_correct, resample_to_spacing, to_ras
from bids_cadiff.registration.atlas import resolve_atlas
from bids_cadiff.registration.orientation import CANDIDATES, check_orientation, flip_header

logger = logging.getLogger("benchmarks.orientation")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DEFAULT_OUT = ROOT / "artifacts" / "orientation" / "margins.tsv"
#: Voxel size of the app's model grid, on which the app runs the check.
GRID_MM = 2.0


def real_images(shared: Path = SHARED) -> dict[str, Path]:
    """Name → path of every real T1w in the shared data (present or not)."""
    images = {}
    for i in range(1, 8):
        for kind in ("T1", "brainmask"):
            images[f"sub-0{i}_{kind}"] = shared / "fstd" / f"sub-0{i}" / f"{kind}.mgz"
    images["chris_t1"] = shared / "raw_t1" / "chris_t1.nii.gz"
    images["t1_crop"] = shared / "raw_t1" / "t1_crop.nii.gz"
    return images


def expected_flag(header: str) -> bool:
    """Whether a header made by reversing ``header``'s axes should be flagged (A-P or S-I)."""
    return any(CANDIDATES[header][1:])


def _tilted(img: nib.Nifti1Image, degrees: float = 20.0) -> nib.Nifti1Image:
    """The same voxels with the affine rotated about the L-R axis through the volume centre."""
    a = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[1:3, 1:3] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    centre = img.affine @ np.r_[(np.asarray(img.shape[:3]) - 1) / 2.0, 1.0]
    move, back = np.eye(4), np.eye(4)
    move[:3, 3], back[:3, 3] = -centre[:3], centre[:3]
    return nib.Nifti1Image(np.asanyarray(img.dataobj), back @ rot @ move @ img.affine)


def _cut(img: nib.Nifti1Image, *, top_mm: float = 0.0, bottom_mm: float = 0.0) -> nib.Nifti1Image:
    """The image with the top / bottom of its field of view (in world S-I) set to 0."""
    ras = to_ras(img)
    data = np.asanyarray(ras.dataobj).astype(np.float32).copy()
    z = ras.affine[2, 2] * np.arange(data.shape[2]) + ras.affine[2, 3]
    fg = np.argwhere(data > 0.1 * np.percentile(data[data > 0], 99))
    z_lo, z_hi = z[fg[:, 2].min()], z[fg[:, 2].max()]
    data[..., z > z_hi - top_mm] = 0
    data[..., z < z_lo + bottom_mm] = 0
    return nib.Nifti1Image(data, ras.affine)


def cases(
    images: dict[str, Path], headers: list[str], extras: bool
) -> Iterator[tuple[str, str, nib.Nifti1Image]]:
    """``(image name, header name, image with that header)`` to measure."""
    for name, path in images.items():
        img = nib.load(path)
        for header in headers:
            affine = flip_header(img.affine, img.shape, CANDIDATES[header])
            yield name, header, nib.Nifti1Image(np.asanyarray(img.dataobj), affine)
        if extras and name in ("chris_t1", "sub-01_T1", "sub-01_brainmask"):
            yield name, "AsGiven+tilt20", _tilted(img)
            yield name, "AsGiven+cut_top30", _cut(img, top_mm=30)
            yield name, "AsGiven+cut_bottom45", _cut(img, bottom_mm=45)


def summarise(tsv: Path) -> str:
    """A Markdown table per image from the TSV: the margin with the true header (negative:
    the header's orientation fits best), the smallest margin over the 6 A-P/S-I lies (must
    exceed the threshold), the left-right margins, and the check's seconds."""
    with open(tsv, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    lines = [
        "| image | atlas | true header: margin | A-P/S-I lies: smallest margin | "
        "L-R: true minus mirrored fit | L-R lie: margin | flagged as expected | "
        "check s (wall) | check s (CPU) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = list(dict.fromkeys(r["image"] for r in rows))
    for name in names:
        mine = [r for r in rows if r["image"] == name and "+" not in r["header"]]
        by = {r["header"]: r for r in mine}
        lies = [float(r["margin"]) for r in mine if r["expected"] == "True"]
        ok = sum(r["ok"] == "True" for r in mine)
        true = by.get("AsGiven")
        lines.append("| {} | {} | {} | {} | {} | {} | {}/{} | {:.1f} | {:.1f} |".format(
            name, mine[0]["atlas"] if mine else "n/a",
            f"{float(true['margin']):+.3f}" if true else "n/a",
            f"{min(lies):+.3f}" if lies else "n/a",
            f"{float(true['left_right_margin']):+.3f}" if true else "n/a",
            f"{float(by['FlipLR']['margin']):+.3f}" if "FlipLR" in by else "n/a",
            ok, len(mine),
            np.mean([float(r["check_s"]) for r in mine]) if mine else float("nan"),
            np.mean([float(r["check_cpu_s"]) for r in mine]) if mine else float("nan"),
        ))
    extras = [r for r in rows if "+" in r["header"]]
    if extras:
        lines += ["", "| image | unusual but correct header | as-given fit | margin | flagged |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['image']} | {r['header'].split('+')[1]} | {float(r['AsGiven']):.3f} | "
                  f"{float(r['margin']):+.3f} | {r['flagged']} |" for r in extras]
    true_rows = [r for r in rows if r["header"] == "AsGiven"]
    lies = [r for r in rows if r["expected"] == "True"]
    lr = [float(r["left_right_margin"]) for r in true_rows]
    if true_rows and lies:
        largest = max(float(r["margin"]) for r in true_rows)
        lines += ["", f"True headers: largest margin {largest:+.3f} "
                  f"over {len(true_rows)} images; A-P/S-I lies: smallest margin "
                  f"{min(float(r['margin']) for r in lies):+.3f} over {len(lies)}; left-right, "
                  f"true minus mirrored fit: {min(lr):+.3f} to {max(lr):+.3f} "
                  f"(mirrored fits better in {sum(v < 0 for v in lr)} of {len(lr)}). "
                  f"Wrong decisions: {sum(r['ok'] != 'True' for r in rows)} of {len(rows)}. "
                  f"Check: {np.mean([float(r['check_s']) for r in rows]):.1f} s wall, "
                  f"{np.mean([float(r['check_cpu_s']) for r in rows]):.1f} s CPU on average."]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="TSV to write")
    parser.add_argument("--images", nargs="+", default=None,
                        help=f"image names (default: all of {', '.join(real_images())})")
    parser.add_argument("--headers", nargs="+", default=list(CANDIDATES),
                        choices=list(CANDIDATES), help="headers to try (default: all 8)")
    parser.add_argument("--extras", action="store_true",
                        help="also tilted and cut correct headers on chris_t1 and sub-01")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in the TSV and measure only the others")
    parser.add_argument("--summary-only", action="store_true",
                        help="only rewrite summary.md from the existing TSV")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("bids_cadiff").setLevel(logging.WARNING)
    summary_path = args.out.with_name("summary.md")
    if args.summary_only:
        summary_path.write_text(summarise(args.out), encoding="utf-8")
        logger.info("wrote %s", summary_path)
        return 0
    images = real_images()
    if args.images:
        unknown = [n for n in args.images if n not in images]
        if unknown:
            logger.error("unknown image names %s; choose from %s", unknown, list(images))
            return 2
        images = {n: images[n] for n in args.images}
    missing = [str(p) for p in images.values() if not p.is_file()]
    if missing:
        logger.error("shared data missing: %s", ", ".join(missing))
        return 2
    atlas = resolve_atlas(None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    columns = ["image", "atlas", "header", "header_codes", *CANDIDATES, "margin",
               "left_right_margin", "flagged", "expected", "ok", "apparent", "check_s",
               "check_cpu_s"]
    done: set[tuple[str, str]] = set()
    if args.resume and args.out.is_file():
        with open(args.out, encoding="utf-8") as handle:
            done = {(r["image"], r["header"]) for r in csv.DictReader(handle, delimiter="\t")}
    with open(args.out, "a" if done else "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        if not done:
            writer.writerow(columns)
        for name, header, img in cases(images, args.headers, args.extras):
            if (name, header) in done:
                continue
            codes = "".join(nib.aff2axcodes(img.affine))
            grid = n4_bias_correct(resample_to_spacing(to_ras(img), GRID_MM))
            wall, cpu = time.perf_counter(), time.process_time()
            check = check_orientation(grid, atlas, header_codes=codes)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            expected = expected_flag(header.split("+")[0])
            writer.writerow([
                name, "brain" if check.brain_only else "head", header, codes,
                *(f"{check.scores[c]:.4f}" for c in CANDIDATES), f"{check.margin:.4f}",
                f"{check.left_right_margin:.4f}", check.flagged, expected,
                check.flagged == expected, " or ".join(check.apparent) or "n/a",
                f"{wall:.2f}", f"{cpu:.2f}",
            ])
            handle.flush()
            logger.info("%-18s %-22s %s margin %+.3f LR %+.3f flagged %-5s %s %.1f s (cpu %.1f)",
                        name, header, codes, check.margin, check.left_right_margin,
                        check.flagged, "ok" if check.flagged == expected else "WRONG", wall, cpu)
    summary = summarise(args.out)
    summary_path.write_text(summary, encoding="utf-8")
    logger.info("%s\nwrote %s and %s", summary, args.out, summary_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
