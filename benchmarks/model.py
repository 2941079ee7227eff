#!/usr/bin/env python
"""Parameter count and forward-pass time of the CA-Diff denoiser on one patch.

    python benchmarks/model.py [--channels 16,32,64,128] [--patch 96] [--classes 33] [--repeats 3]

Prints the parameter count and the median seconds of one no-grad forward pass, for the given
width and, as the baseline measured in the same run, the same network without TACA (plain
concatenation in the skip connections); the ratio shows what TACA costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", default="16,32,64,128")
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--classes", type=int, default=33)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    import torch

    from bids_cadiff.models.config import ModelConfig
    from bids_cadiff.models.denoiser import CADiffDenoiser

    torch.set_num_threads(args.threads)
    channels = tuple(int(c) for c in args.channels.split(","))
    shape = (1, 1, *(args.patch,) * 3)
    device = torch.device(args.device)
    results = {}
    for name, taca in (("CA-Diff (TACA)", True), ("baseline: no TACA", False)):
        cfg = ModelConfig(num_classes=args.classes, channels=channels, taca=taca)
        net = CADiffDenoiser(cfg).eval().to(device)
        params = sum(p.numel() for p in net.parameters())
        image = torch.rand(shape, device=device)
        dist = torch.rand(1, 3, *shape[2:], device=device)
        labels = torch.randn(1, args.classes, *shape[2:], device=device)
        t = torch.zeros(1, dtype=torch.long, device=device)
        times = []
        with torch.no_grad():
            net(image, dist, labels, t, t)  # warm-up
            for _ in range(args.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                net(image, dist, labels, t, t)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        results[name] = (params, statistics.median(times))
    base = results["baseline: no TACA"][1]
    print(f"denoiser forward pass, patch {args.patch}^3, {args.classes} classes, channels "
          f"{channels}, {args.device}, {args.threads} threads, median of {args.repeats}")
    print(f"{'network':22s} {'parameters':>11s} {'seconds':>8s} {'vs baseline':>11s}")
    for name, (params, sec) in results.items():
        print(f"{name:22s} {params:11,d} {sec:8.2f} {sec / base:10.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
