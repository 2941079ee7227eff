#!/usr/bin/env python
"""Run-to-run agreement and cost of ``--reproducible``, through the app.

    python benchmarks/reproducible.py [T1W] [--threads 2] [--compare runs|threads] [--model PATH]

Builds a one-subject BIDS dataset around the T1w (default: ../shared/data/raw_t1/chris_t1.nii.gz)
and runs the participant level, each run in its own process with a fresh work dir (no cached
registration). ``--compare runs`` (the default): four runs, twice as is (the baseline) and
twice with ``--reproducible``. ``--compare threads``: ``--reproducible`` with ``--threads`` and
with one thread (``--reproducible`` registers single-threaded either way, so the runs differ
only in PyTorch's thread count). ``--model``: a checkpoint from ``cadiff-train`` instead of the
bundled model. Prints the seconds per stage, the time ratio against the baseline (``runs``),
and for each pair of runs the fraction of brain voxels with the same label, whether the label
maps are identical, and the left hippocampus' Dice between them. How far the labels follow
the registration is measured by ``benchmarks/registration_agreement.py``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_T1W = REPO.parent / "shared" / "data" / "raw_t1" / "chris_t1.nii.gz"
#: (name, extra options, threads: None for --threads)
RUNS = (("default 1", (), None), ("default 2", (), None),
        ("reproducible 1", ("--reproducible",), None),
        ("reproducible 2", ("--reproducible",), None))
THREAD_RUNS = (("reproducible N threads", ("--reproducible",), None),
               ("reproducible 1 thread", ("--reproducible",), 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("t1w", type=Path, nargs="?", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compare", choices=("runs", "threads"), default="runs")
    parser.add_argument("--model", type=Path, default=None,
                        help="a checkpoint from cadiff-train (default: the bundled model)")
    args = parser.parse_args(argv)
    t1w = args.t1w or DEFAULT_T1W
    if not t1w.is_file():
        sys.exit(f"reproducible benchmark: {t1w} not found; pass a T1w")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bids = root / "bids"
        (bids / "sub-01" / "anat").mkdir(parents=True)
        (bids / "dataset_description.json").write_text(
            json.dumps({"Name": "benchmark", "BIDSVersion": "1.10.0"}))
        shutil.copy(t1w, bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
        runs = RUNS if args.compare == "runs" else THREAD_RUNS
        model = ("--model", str(args.model.resolve())) if args.model else ()
        for k, (name, extra, threads) in enumerate(runs):
            threads = threads or args.threads
            name = name.replace("N threads", f"{args.threads} threads")
            out = root / f"out{k}"
            cmd = [sys.executable, "-m", "bids_cadiff.cli.run", str(bids), str(out), "participant",
                   "-w", str(root / f"work{k}"), "--skip-bids-validation", "--no-reports",
                   "--nprocs", str(threads), "--omp-nthreads", str(threads), *model, *extra]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stderr[-2000:]}")
            anat = out / "sub-01" / "anat"
            side = json.loads((anat / "sub-01_desc-cadiff_dseg.json").read_text())
            labels = np.asarray(nib.load(anat / "sub-01_desc-cadiff_dseg.nii.gz").dataobj)
            results[name] = (wall, side["StageSeconds"], side["Registration"]["Value"], labels)

    print(f"reproducible benchmark: {t1w.name}, {args.threads} threads, fresh work dir each run, "
          f"model {args.model or 'bundled'}")
    stages = ["n4", "registration", "inference", "refinement"]
    print(f"{'run':16s}" + "".join(f"{s:>13s}" for s in stages) + f"{'wall':>9s}{'NCC':>8s}")
    for name, (wall, secs, ncc, _) in results.items():
        print(f"{name:16s}" + "".join(f"{secs.get(s, 0.0):13.1f}" for s in stages)
              + f"{wall:9.1f}{ncc:8.4f}")
    if args.compare == "runs":
        base = np.mean([results[n][0] for n in ("default 1", "default 2")])
        repro = np.mean([results[n][0] for n in ("reproducible 1", "reproducible 2")])
        print(f"--reproducible wall time: {repro:.1f} s against {base:.1f} s "
              f"({repro / base:.2f}x)")
    for a, b in itertools.combinations(results, 2):
        la, lb = results[a][3], results[b][3]
        brain = (la > 0) | (lb > 0)
        ha, hb = la == 17, lb == 17
        dice = 2 * (ha & hb).sum() / max(int(ha.sum() + hb.sum()), 1)
        print(f"{a} vs {b}: {(la == lb)[brain].mean():.4%} of brain voxels agree, "
              f"identical: {np.array_equal(la, lb)}, left hippocampus Dice {dice:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
