#!/usr/bin/env python
"""Unusual but valid T1w images through the participant level, scored against their aseg.

    .venv/bin/python benchmarks/unusual_images.py [--subject 01] [--out artifacts/unusual_images]
        [--variants NAME ...] [--work DIR] [--summary-only]

From one fstd subject of the shared data (``T1.mgz``, ``brainmask.mgz``, ``aseg.mgz``: 256³,
1 mm, LIA, uint8) it makes the variants of :data:`VARIANTS` (field of view cut through the
cerebellum or the top of the head, 1 × 1 × 3 mm voxels, 0.7 mm 320³, an oblique grid rotated
20°, int16/float64 data, intensities × 1e-3 and × 1e4, an uncompressed ``.nii``, the
skull-stripped brain with and without its cerebellum), each as one participant of a BIDS
dataset, and runs ``bids_cadiff … participant`` on them with the bundled model and defaults
(one process; a rerun resumes: finished images are skipped).

Each label map is brought back onto the subject's own 1 mm grid (nearest neighbour through the
world coordinates) and scored with Dice against the aseg (the 32 structures) inside the part
of the head the variant's field of view covers. It writes ``results.tsv`` (one row per
variant: mean Dice, its difference from the plain image of the same kind, the QC status and
flags) and ``summary.md`` into ``--out``.

The fstd subjects are the bundled model's training subjects; the benchmark measures how much
each change of the image costs (Dice against the plain image), not accuracy on new subjects.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DEFAULT_OUT = ROOT / "artifacts" / "unusual_images"
logger = logging.getLogger("benchmarks.unusual_images")

#: aseg values of the cerebellum (white matter and cortex, both sides).
CEREBELLUM = (7, 8, 46, 47)


@dataclass(frozen=True)
class Source:
    """One subject: the skull-on T1, its skull-stripped brain and its aseg, on one grid."""

    t1: np.ndarray
    brain: np.ndarray
    aseg: np.ndarray
    affine: np.ndarray


@dataclass(frozen=True)
class Variant:
    """A T1w made from a :class:`Source`: its data, affine and file suffix."""

    data: np.ndarray
    affine: np.ndarray
    suffix: str = ".nii.gz"


def load_source(subject: str, shared: Path = SHARED) -> Source:
    """The fstd subject's T1.mgz, brainmask.mgz and aseg.mgz (one grid)."""
    folder = shared / "fstd" / f"sub-{subject}"
    imgs = [nib.load(folder / f"{name}.mgz") for name in ("T1", "brainmask", "aseg")]
    return Source(*(np.asanyarray(i.dataobj) for i in imgs), affine=imgs[0].affine.copy())


def _axis_towards(affine: np.ndarray, world_axis: int) -> tuple[int, int]:
    """(voxel axis closest to world axis ``world_axis``, +1/-1: voxel index grows towards +)."""
    column = np.argmax(np.abs(affine[world_axis, :3]))
    return int(column), int(np.sign(affine[world_axis, column]))


def cut(src: Source, data: np.ndarray, *, structures: tuple[int, ...] | None, top_mm: float = 0.0
        ) -> Variant:
    """Cut the field of view in the superior-inferior direction.

    ``structures``: cut through the middle of their S-I extent, keeping the part above (a field
    of view through the cerebellum); ``None``: keep all but the top ``top_mm`` of the brain.
    """
    axis, sign = _axis_towards(src.affine, 2)
    mask = np.isin(src.aseg, structures) if structures else src.aseg > 0
    coords = np.nonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))[0]
    lo, hi = int(coords.min()), int(coords.max())
    keep = [slice(None)] * 3
    if structures:
        middle = (lo + hi) // 2
        keep[axis] = slice(middle, None) if sign > 0 else slice(None, middle + 1)
    else:
        step = int(round(top_mm))
        keep[axis] = slice(None, hi + 1 - step) if sign > 0 else slice(lo + step, None)
    start = np.array([k.start or 0 for k in keep] + [1])
    affine = src.affine.copy()
    affine[:, 3] = src.affine @ start
    return Variant(np.ascontiguousarray(data[tuple(keep)]), affine)


def thick_slices(src: Source, thickness: int = 3) -> Variant:
    """Average ``thickness`` neighbouring 1 mm slices along the S-I axis (thick axial slices)."""
    axis, _ = _axis_towards(src.affine, 2)
    n = src.t1.shape[axis] // thickness
    data = np.moveaxis(src.t1.astype(np.float32), axis, 0)[: n * thickness]
    data = data.reshape(n, thickness, *data.shape[1:]).mean(axis=1)
    affine = src.affine.copy()
    affine[:, 3] = src.affine @ np.r_[np.eye(3)[axis] * (thickness - 1) / 2, 1]
    affine[:3, axis] *= thickness
    return Variant(np.round(np.moveaxis(data, 0, axis)).astype(np.int16), affine)


def resample(src: Source, data: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int],
             order: int = 3) -> np.ndarray:
    """``data`` (on ``src``'s grid) onto the grid ``(affine, shape)``."""
    matrix = np.linalg.inv(src.affine) @ affine
    out = ndimage.affine_transform(data.astype(np.float32), matrix[:3, :3], matrix[:3, 3],
                                   output_shape=shape, order=order, mode="constant", cval=0.0)
    return np.clip(out, 0, None) if order > 0 else out


def _centred(src: Source, linear: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Affine with ``linear`` (3×3) whose grid centre is the source grid's centre."""
    centre = src.affine @ np.r_[(np.array(src.t1.shape) - 1) / 2, 1]
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = centre[:3] - linear @ ((np.array(shape) - 1) / 2)
    return affine


def fine_grid(src: Source, voxel_mm: float = 0.7, size: int = 320) -> Variant:
    """An HCP-like grid: ``voxel_mm`` isotropic, ``size``³, same axes, cubic interpolation."""
    direction = src.affine[:3, :3] / np.linalg.norm(src.affine[:3, :3], axis=0)
    affine = _centred(src, direction * voxel_mm, (size,) * 3)
    return Variant(resample(src, src.t1, affine, (size,) * 3).astype(np.float32), affine)


def oblique(src: Source, degrees: float = 20.0) -> Variant:
    """The same head on a grid rotated ``degrees`` about the left-right axis (an oblique
    acquisition: the voxel axes, not the head, are tilted)."""
    a = math.radians(degrees)
    rotation = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    affine = _centred(src, rotation @ src.affine[:3, :3], src.t1.shape)
    return Variant(resample(src, src.t1, affine, src.t1.shape).astype(np.float32), affine)


def without_cerebellum(src: Source) -> Variant:
    """The skull-stripped brain with the cerebellum (dilated by 2 voxels) set to 0."""
    cerebellum = ndimage.binary_dilation(np.isin(src.aseg, CEREBELLUM), iterations=2)
    return Variant(np.where(cerebellum, 0, src.brain).astype(src.brain.dtype), src.affine)


#: name → how to make it; names are BIDS subject labels.
VARIANTS: dict[str, Callable[[Source], Variant]] = {
    "plain": lambda s: Variant(s.t1, s.affine),
    "int16": lambda s: Variant((s.t1.astype(np.int16) * 16), s.affine),
    "float64": lambda s: Variant(s.t1.astype(np.float64), s.affine),
    "scaledown": lambda s: Variant((s.t1 * 1e-3).astype(np.float32), s.affine),
    "scaleup": lambda s: Variant((s.t1 * 1e4).astype(np.float32), s.affine),
    "uncompressed": lambda s: Variant(s.t1, s.affine, suffix=".nii"),
    "cutcerebellum": lambda s: cut(s, s.t1, structures=CEREBELLUM),
    "cuttop": lambda s: cut(s, s.t1, structures=None, top_mm=15.0),
    "thickslices": thick_slices,
    "hcp": fine_grid,
    "oblique": oblique,
    "brain": lambda s: Variant(s.brain, s.affine),
    "brainnocerebellum": without_cerebellum,
}


def write_dataset(src: Source, bids: Path, names: list[str]) -> None:
    """A BIDS dataset with one participant per variant (existing files are kept)."""
    bids.mkdir(parents=True, exist_ok=True)
    (bids / "dataset_description.json").write_text(
        json.dumps({"Name": "unusual images", "BIDSVersion": "1.10.0"}))
    for name in names:
        variant = VARIANTS[name](src)
        anat = bids / f"sub-{name}" / "anat"
        path = anat / f"sub-{name}_T1w{variant.suffix}"
        if path.exists():
            continue
        anat.mkdir(parents=True, exist_ok=True)
        img = nib.Nifti1Image(variant.data, variant.affine)
        img.set_qform(variant.affine, code=1)
        img.set_sform(variant.affine, code=1)
        nib.save(img, path)


def to_source_grid(labels: nib.Nifti1Image, src: Source) -> tuple[np.ndarray, np.ndarray]:
    """``(labels on the source grid, mask of the source grid inside the labels' field of view)``,
    nearest neighbour through world coordinates."""
    matrix = np.linalg.inv(labels.affine) @ src.affine
    grid = np.indices(src.aseg.shape, dtype=np.float32).reshape(3, -1)
    vox = np.rint(matrix[:3, :3] @ grid + matrix[:3, 3:4]).astype(np.int64)
    shape = np.array(labels.shape[:3])[:, None]
    inside = np.all((vox >= 0) & (vox < shape), axis=0)
    data = np.asarray(labels.dataobj)
    out = np.zeros(grid.shape[1], dtype=np.int32)
    out[inside] = data[tuple(vox[:, inside])]
    return out.reshape(src.aseg.shape), inside.reshape(src.aseg.shape)


def score(pred: np.ndarray, ref: np.ndarray, inside: np.ndarray, values: list[int],
          leave_out: tuple[int, ...] = ()) -> float:
    """Mean Dice over the structures of ``values`` present in the reference inside the field
    of view (``leave_out``: values not averaged)."""
    from bids_cadiff.evaluation.metrics import dice_score

    pred = np.where(inside, pred, 0)
    ref = np.where(inside, ref, 0)
    dices = [dice_score(pred == v, ref == v) for v in values
             if v not in leave_out and (ref == v).any()]
    return float(np.mean(dices))


def run_app(bids: Path, out: Path, work: Path, names: list[str]) -> float:
    """Run the participant level on the variants; seconds."""
    cmd = [sys.executable, "-m", "bids_cadiff.cli.run", str(bids), str(out), "participant",
           "-w", str(work), "--skip-bids-validation", "--participant-label", *names]
    logger.info("running: %s", " ".join(cmd))
    start = time.perf_counter()
    subprocess.run(cmd, check=False)
    return time.perf_counter() - start


COLUMNS = ("variant", "shape", "voxel_mm", "dtype", "file", "mean_dice", "baseline",
           "dice_change", "mean_dice_without_cerebellum", "qc", "flags")


def results(src: Source, bids: Path, out: Path, names: list[str]) -> list[dict]:
    """One row per variant with a finished label map (others: its error)."""
    from bids_cadiff.labels import SYNTHSEG32, aseg_to_table_values

    ref = aseg_to_table_values(src.aseg, src.affine)
    values = [v for v in SYNTHSEG32.values if v != 0]
    cerebellum = tuple(v for v in values if v in CEREBELLUM)
    rows: dict[str, dict] = {}
    for name in names:
        t1w = next((bids / f"sub-{name}" / "anat").glob(f"sub-{name}_T1w.nii*"))
        img = nib.load(t1w)
        row = {"variant": name, "shape": "x".join(map(str, img.shape[:3])),
               "voxel_mm": "x".join(f"{z:g}" for z in img.header.get_zooms()[:3]),
               "dtype": str(img.get_data_dtype()), "file": t1w.name.split("_T1w")[1]}
        dseg = out / f"sub-{name}" / "anat" / f"sub-{name}_desc-cadiff_dseg.nii.gz"
        sidecar = dseg.with_name(dseg.name.replace(".nii.gz", ".json"))
        if not sidecar.exists():
            errors = list((out / "logs").glob(f"sub-{name}_*error.json"))
            row.update(qc="error", flags=json.loads(errors[0].read_text()).get("Message", "")
                       if errors else "no output")
            rows[name] = row
            continue
        labels = nib.load(dseg)
        assert labels.shape[:3] == img.shape[:3] and np.allclose(labels.affine, img.affine), \
            f"{dseg}: not on the T1w's grid"
        pred, inside = to_source_grid(labels, src)
        qc = json.loads(sidecar.read_text())["QC"]
        row.update(
            mean_dice=round(score(pred, ref, inside, values), 4),
            mean_dice_without_cerebellum=round(score(pred, ref, inside, values, cerebellum), 4),
            qc=qc["Status"],
            flags="; ".join(f"{f['Check']}{' ' + f['Structure'] if f['Structure'] else ''}"
                            for f in qc["Flags"]),
        )
        rows[name] = row
    for row in rows.values():
        base = rows.get(_baseline(row["variant"]))
        if base and "mean_dice" in row and "mean_dice" in base:
            row["baseline"] = base["variant"]
            row["dice_change"] = round(row["mean_dice"] - base["mean_dice"], 4)
    return list(rows.values())


def _baseline(variant: str) -> str:
    """The variant a variant's Dice is compared with: the plain image of the same kind."""
    return "brain" if variant.startswith("brain") else "plain"


def write_results(rows: list[dict], out: Path) -> Path:
    """``results.tsv`` and ``summary.md`` in ``out``; returns the TSV's path."""
    out.mkdir(parents=True, exist_ok=True)
    tsv = out / "results.tsv"
    with tsv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, COLUMNS, delimiter="\t", extrasaction="ignore", restval="n/a")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| variant | grid | dtype | file | mean Dice | change | QC | flags |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['shape']} at {r['voxel_mm']} mm | {r['dtype']} | "
                     f"{r['file']} | {r.get('mean_dice', 'n/a')} | {r.get('dice_change', 'n/a')}"
                     f" | {r['qc']} | {r.get('flags') or ''} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return tsv


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subject", default="01", help="fstd subject label (default 01)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "unusual_images",
                        help="dataset, derivatives and work dir (kept: a rerun resumes)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--summary-only", action="store_true",
                        help="score existing outputs without running the app")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not (SHARED / "fstd" / f"sub-{args.subject}" / "aseg.mgz").exists():
        sys.exit(f"unusual images: {SHARED}/fstd/sub-{args.subject} not found (the shared data)")
    names = [n for n in VARIANTS if n in args.variants]
    if "plain" not in names:
        names.insert(0, "plain")
    if any(n.startswith("brain") for n in names) and "brain" not in names:
        names.append("brain")
    src = load_source(args.subject)
    bids, deriv = args.work / "bids", args.work / "derivatives"
    write_dataset(src, bids, names)
    if not args.summary_only:
        seconds = run_app(bids, deriv, args.work / "work", names)
        logger.info("participant level: %.0f s for %d images", seconds, len(names))
    tsv = write_results(results(src, bids, deriv, names), args.out)
    print((args.out / "summary.md").read_text())
    logger.info("wrote %s", tsv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
