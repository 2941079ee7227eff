#!/usr/bin/env python
"""Peak memory of the participant level: one image, and several images in parallel workers.

    .venv/bin/python benchmarks/memory.py T1W [T1W ...] [--nprocs 2] [--omp-nthreads 1]
        [--interval 0.2] [-- EXTRA BIDS_CADIFF OPTIONS]

Builds a BIDS dataset with one participant per T1w, runs ``bids_cadiff … participant`` on it
in a child process with a fresh work dir (so registration is not cached), and samples the
memory of the whole process tree (the app and its worker processes) every ``--interval``
seconds from ``/proc``: the sum of the processes' proportional set sizes (PSS: pages shared
between processes counted once in the sum, which is what the node's memory holds) and the
largest resident set (RSS) of any one process. Prints the peaks and the wall time.

A job scheduler that limits memory per job (SLURM's cgroups) sees the tree's total: request at
least the printed total peak, with some margin.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1024 ** 3


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from ``/proc/*/stat``)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def memory(pid: int) -> tuple[int, int]:
    """``(PSS, RSS)`` in bytes of one process (0, 0 when it is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    values = {line.split(":")[0]: int(line.split()[1]) * 1024
              for line in text.splitlines()[1:] if line.split(":")[0] in ("Pss", "Rss")}
    return values.get("Pss", 0), values.get("Rss", 0)


def measure(cmd: list[str], interval: float) -> dict[str, float]:
    """Run ``cmd``; the peaks of the tree's total PSS and of one process's RSS (GiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_total = peak_one = 0
    most = 0
    while proc.poll() is None:
        pids = [proc.pid, *children(proc.pid)]
        sizes = [memory(p) for p in pids]
        peak_total = max(peak_total, sum(s[0] for s in sizes))
        peak_one = max(peak_one, max(s[1] for s in sizes))
        most = max(most, sum(1 for s in sizes if s[1] > 200 * 1024 ** 2))
        time.sleep(interval)
    stderr = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        sys.exit(f"the participant run failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {"total_pss_gib": peak_total / GIB, "one_process_rss_gib": peak_one / GIB,
            "big_processes": most, "wall_s": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("t1w", type=Path, nargs="+")
    parser.add_argument("--nprocs", type=int, default=1)
    parser.add_argument("--omp-nthreads", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        bids = Path(tmp) / "bids"
        bids.mkdir()
        (bids / "dataset_description.json").write_text(
            json.dumps({"Name": "memory", "BIDSVersion": "1.10.0"}))
        for i, t1w in enumerate(args.t1w, start=1):
            if not t1w.is_file():
                sys.exit(f"memory benchmark: {t1w} not found")
            anat = bids / f"sub-{i:02d}" / "anat"
            anat.mkdir(parents=True)
            suffix = ".nii" if t1w.name.endswith(".nii") else ".nii.gz"
            shutil.copy(t1w, anat / f"sub-{i:02d}_T1w{suffix}")
        cmd = [sys.executable, "-m", "bids_cadiff.cli.run", str(bids), str(Path(tmp) / "out"),
               "participant", "-w", str(Path(tmp) / "work"), "--skip-bids-validation",
               "--nprocs", str(args.nprocs), "--omp-nthreads", str(args.omp_nthreads), *extra]
        result = measure(cmd, args.interval)
    print(f"images: {len(args.t1w)}, --nprocs {args.nprocs} --omp-nthreads {args.omp_nthreads}"
          f"{' ' + ' '.join(extra) if extra else ''}")
    print(f"peak total memory of the process tree (PSS): {result['total_pss_gib']:.2f} GiB")
    print(f"peak resident memory of one process (RSS): {result['one_process_rss_gib']:.2f} GiB")
    print(f"processes above 200 MiB at once: {result['big_processes']}")
    print(f"wall: {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
