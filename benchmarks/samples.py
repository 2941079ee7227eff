#!/usr/bin/env python
"""What extra CA-Diff samples and the reports cost, through the app itself.

    python benchmarks/samples.py [T1W] [--samples 3] [--device cpu|cuda] [--threads 2]

Builds a one-subject BIDS dataset around the T1w (default: ../shared/data/raw_t1/chris_t1.nii.gz)
in a temporary folder and runs the participant level three times with one shared work folder:
first ``--samples 1 --no-reports`` (which also caches the registration, so it is not timed),
then ``--samples 1`` (the baseline) and ``--samples N``, both with reports, in fresh output
folders. Prints the seconds per stage of the last two (from their sidecars' ``StageSeconds``),
the cost of one extra sample as a ratio to the baseline's inference + refinement, and the
time to write the participant report (figures are in the ``writing`` stage) and the group
report.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_T1W = REPO.parent / "shared" / "data" / "raw_t1" / "chris_t1.nii.gz"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("t1w", type=Path, nargs="?", default=None)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.samples < 2:
        parser.error("--samples must be at least 2")
    t1w = args.t1w or DEFAULT_T1W
    if not t1w.is_file():
        sys.exit(f"samples benchmark: {t1w} not found; pass a T1w")

    from bids_cadiff.app.group import run_group  # noqa: F401 - imported before timing
    from bids_cadiff.cli.run import main as app
    from bids_cadiff.reports.html import write_group_report, write_participant_report

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bids = root / "bids"
        (bids / "sub-01" / "anat").mkdir(parents=True)
        (bids / "dataset_description.json").write_text(
            json.dumps({"Name": "benchmark", "BIDSVersion": "1.10.0"}))
        shutil.copy(t1w, bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
        common = ["--skip-bids-validation", "-w", str(root / "work"), "--device", args.device,
                  "--nprocs", str(args.threads), "--omp-nthreads", str(args.threads)]
        runs = {}
        for name, extra in (("warm-up", ["--samples", "1", "--no-reports"]),
                            ("1 sample", ["--samples", "1"]),
                            (f"{args.samples} samples", ["--samples", str(args.samples)])):
            out = root / name.replace(" ", "_")
            start = time.perf_counter()
            if app([str(bids), str(out), "participant", *extra, *common]) != 0:
                sys.exit(f"the participant level failed ({name})")
            wall = time.perf_counter() - start
            side = json.loads((out / "sub-01" / "anat" / "sub-01_desc-cadiff_dseg.json").read_text())
            runs[name] = (out, wall, side["StageSeconds"])
        base_out = runs["1 sample"][0]
        start = time.perf_counter()
        write_participant_report(base_out, "01")
        report_s = time.perf_counter() - start
        app([str(bids), str(base_out), "group", "--no-reports"])
        start = time.perf_counter()
        write_group_report(base_out)
        group_s = time.perf_counter() - start

    names = ["1 sample", f"{args.samples} samples"]
    stages = list(dict.fromkeys(k for n in names for k in runs[n][2]))
    print(f"samples benchmark: {t1w.name}, {args.device}, {args.threads} threads "
          "(registration cached)")
    print(f"{'stage':18s}" + "".join(f"{n:>14s}" for n in names))
    for stage in stages:
        print(f"{stage:18s}" + "".join(f"{runs[n][2].get(stage, 0.0):14.1f}" for n in names))
    print(f"{'wall (app)':18s}" + "".join(f"{runs[n][1]:14.1f}" for n in names))

    def model_part(name: str) -> float:
        s = runs[name][2]
        return s.get("inference", 0.0) + s.get("refinement", s.get("to_native_grid", 0.0)) + (
            s.get("sample_labels", 0.0))

    base, many = model_part(names[0]), model_part(names[1])
    extra = (many - base) / (args.samples - 1)
    print(f"one extra sample: {extra:.1f} s = {extra / base:.2f} x the baseline's inference + "
          f"refinement ({base:.1f} s); wall {runs[names[1]][1] / runs[names[0]][1]:.2f} x")
    print(f"participant report (HTML): {report_s:.2f} s; figures: in 'writing' "
          f"({runs[names[0]][2].get('writing', 0.0):.1f} s with the label map, maps and tables); "
          f"group report: {group_s:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
