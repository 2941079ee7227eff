#!/usr/bin/env python
"""Validation Dice against training hours, from cadiff-train output folders: a TSV and an SVG.

    python scripts/learning_curve.py --run fold1 work/default_model_v2/fold1 \
        --run fold2 work/default_model_v2/fold2 --run fold3 work/default_model_v2/fold3 \
        --tsv artifacts/default_model_v2/learning_curve.tsv --svg docs/images/learning_curve.svg

Each run's ``val_log.tsv`` gives the mean validation Dice at each validated iteration (the
validation subject of a fold is one of its training subjects held out, never a test subject);
its ``train_log.tsv`` gives the wall-clock seconds of training there (counted across
resumes; the validations themselves included). The SVG draws one line per run; it needs no plotting
library.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger("learning_curve")
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def curve(run_dir: Path) -> list[tuple[int, float, float]]:
    """``(iteration, hours, mean validation Dice)`` of one run, by iteration."""
    val = run_dir / "val_log.tsv"
    train = run_dir / "train_log.tsv"
    if not val.is_file() or not train.is_file():
        raise SystemExit(f"{run_dir}: no val_log.tsv/train_log.tsv (a cadiff-train output folder "
                         "with validation, --val-participants, is needed)")
    with train.open() as fh:
        rows = [(int(r["iteration"]), float(r["seconds"])) for r in csv.DictReader(fh, delimiter="\t")]
    its, secs = (np.array(v, dtype=float) for v in zip(*rows)) if rows else (np.zeros(1), np.zeros(1))
    out = []
    with val.open() as fh:
        for r in csv.DictReader(fh, delimiter="\t"):
            if r["image"] != "mean":
                continue
            it = int(r["iteration"])
            hours = float(np.interp(it, its, secs)) / 3600.0
            out.append((it, hours, float(r["dice"])))
    return sorted(out)


def svg(curves: dict[str, list[tuple[int, float, float]]], title: str) -> str:
    """A line chart of Dice (y) against hours (x), one polyline per run."""
    width, height, left, right, top, bottom = 640, 380, 60, 130, 40, 50
    points = [p for c in curves.values() for p in c]
    x_max = max([p[1] for p in points] + [0.1])
    y_lo = min([p[2] for p in points] + [1.0])
    y_lo = max(0.0, np.floor(y_lo * 10) / 10 - 0.05)
    y_hi = 1.0

    def x(h: float) -> float:
        return left + (width - left - right) * h / x_max

    def y(d: float) -> float:
        return top + (height - top - bottom) * (1 - (d - y_lo) / (y_hi - y_lo))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>']
    for tick in np.linspace(y_lo, y_hi, 6):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
                     'stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:.2f}</text>')
    for tick in np.linspace(0, x_max, 6):
        parts.append(f'<text x="{x(tick):.1f}" y="{height - bottom + 16}" text-anchor="middle">'
                     f'{tick:.1f}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">'
                 'training hours (2 CPU cores)</text>')
    parts.append(f'<text x="16" y="{(top + height - bottom) / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 16 {(top + height - bottom) / 2})">validation Dice '
                 '(class average)</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{width - left - right}" '
                 f'height="{height - top - bottom}" fill="none" stroke="#333"/>')
    for i, (name, points_) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(f"{x(h):.1f},{y(d):.1f}" for _, h, d in points_)
        if len(points_) > 1:
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for _, h, d in points_:
            parts.append(f'<circle cx="{x(h):.1f}" cy="{y(d):.1f}" r="3" fill="{colour}"/>')
        ly = top + 16 * i + 10
        parts.append(f'<line x1="{width - right + 10}" x2="{width - right + 30}" y1="{ly}" '
                     f'y2="{ly}" stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text x="{width - right + 36}" y="{ly + 4}">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", nargs=2, action="append", metavar=("NAME", "DIR"), required=True)
    parser.add_argument("--tsv", type=Path, required=True)
    parser.add_argument("--svg", type=Path, required=True)
    parser.add_argument("--title", default="Default model recipe: validation Dice while training")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from bids_cadiff.io.atomic import atomic_write

    curves = {name: curve(Path(folder)) for name, folder in args.run}
    lines = ["run\titeration\thours\tdice"] + [
        f"{name}\t{it}\t{h:.3f}\t{d:.4f}" for name, c in curves.items() for it, h, d in c]
    atomic_write(args.tsv, "\n".join(lines) + "\n")
    atomic_write(args.svg, svg(curves, args.title))
    for name, c in curves.items():
        if c:
            log.info("%s: %d validations, last %.4f at %.2f h (iteration %d)", name, len(c),
                     c[-1][2], c[-1][1], c[-1][0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
