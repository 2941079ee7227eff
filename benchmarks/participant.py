#!/usr/bin/env python
"""Time each stage of the participant level on one T1w, and the peak memory.

    python benchmarks/participant.py [T1W] [--model PATH] [--device cpu|cuda] [--steps 5]
        [--refine auto|refiner|refiner+em|em|none]

Default T1w: ../shared/data/raw_t1/chris_t1.nii.gz (raw, skull on), else Colin27. Prints a
table of seconds per stage of the app's path (``--refine``, default ``auto`` as in the app), each
stage's share of the total, and the process's peak resident memory. Registration is not cached
(a fresh temporary cache), so the figures are a first run's. The refinement is also compared
with the plain argmax of the same probabilities, timed in the same run (the baseline), and that
plain argmax with the resampling of every voxel the model's grid reaches (the baseline of
skipping the voxels out of reach of every structure: ``BACKGROUND_EPS``).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()
REPO = Path(__file__).resolve().parents[1]
DEFAULT_T1W = REPO.parent / "shared" / "data" / "raw_t1" / "chris_t1.nii.gz"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("t1w", type=Path, nargs="?", default=None)
    parser.add_argument("--model", type=Path, default=None, help="default: the bundled model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--refine", choices=("auto", "refiner", "refiner+em", "em", "none"),
                        default="auto")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from bids_cadiff.app.participant import (
        labels_on_t1w_grid,
        load_model,
        prepare_for_model,
        resolve_refinement,
        segment_prepared,
    )
    from bids_cadiff.bidsio import derivatives as deriv
    from bids_cadiff.inference.predict import resolve_device
    from bids_cadiff.inference.resample import posterior_on_grid
    from bids_cadiff.io.nifti import load_t1w
    from bids_cadiff.registration.atlas import atlas_distance_field, resolve_atlas
    from bids_cadiff.reports.overlay import overlay_png

    torch.set_num_threads(args.threads)
    t1w = args.t1w or (DEFAULT_T1W if DEFAULT_T1W.is_file() else Path("/usr/share/mricron/templates/ch2.nii.gz"))
    stages: dict[str, float] = {}
    start = time.perf_counter()
    loaded = load_model(args.model)
    meta = loaded.metadata
    refinement = resolve_refinement(args.refine, loaded)
    atlas = resolve_atlas(None)
    atlas_distance_field(atlas)
    stages["start-up (imports, model, atlas field)"] = time.perf_counter() - T0
    start = time.perf_counter()
    t1 = load_t1w(t1w)
    stages["loading"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare_for_model(t1, meta, atlas=atlas,
                                     cache_dir=Path(tmp) / "reg", image_path=t1w)
        stages["resample to model grid"] = prepared.timings["resample"]
        stages["N4"] = prepared.timings["n4"]
        stages["registration"] = prepared.timings["registration"]
        stages["field warp"] = prepared.timings["field_warp"]
        start = time.perf_counter()
        probs, crop_affine = segment_prepared(
            loaded, prepared, steps=args.steps, seed=0, device=resolve_device(args.device)
        )
        stages["inference"] = time.perf_counter() - start
        start = time.perf_counter()
        plain = labels_on_t1w_grid(t1, probs, crop_affine, prepared, None)
        plain_s = time.perf_counter() - start
        start = time.perf_counter()
        dense = posterior_on_grid(probs, crop_affine, tuple(t1.shape[:3]), t1.affine,
                                  background_eps=-1.0).labels
        dense_s = time.perf_counter() - start
        labels = plain
        refine_s = None
        if refinement.kind != "none":
            start = time.perf_counter()
            labels = labels_on_t1w_grid(t1, probs, crop_affine, prepared, refinement.em,
                                        refinement.refiner)
            refine_s = time.perf_counter() - start
            stages[f"back to T1w grid + {refinement.kind}"] = refine_s
        else:
            stages["back to T1w grid (argmax)"] = plain_s
        labels = meta.labels.index_to_value(labels)
        start = time.perf_counter()
        out = Path(tmp) / "out"
        ents = {"subject": "bench"}
        deriv.save_label_map(deriv.dseg_path(out, ents), labels, t1.affine, t1.header)
        deriv.compute_volumes(labels, float(np.prod(t1.header.get_zooms()[:3])), loaded.metadata.labels)
        overlay_png(t1, labels, loaded.metadata.labels, deriv.figure_path(out, ents))
        stages["writing (label map, volumes, picture)"] = time.perf_counter() - start
    total = sum(stages.values())
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"participant benchmark: {t1w.name} {t1.shape}, model {loaded.metadata.name} "
          f"(voxel {loaded.metadata.voxel_size} mm), {args.device}, {args.threads} threads, "
          f"{args.steps} steps")
    print(f"{'stage':42s} {'seconds':>8s} {'share':>6s}")
    for name, sec in stages.items():
        print(f"{name:42s} {sec:8.1f} {sec / total:6.1%}")
    print(f"{'total':42s} {total:8.1f} {1:6.0%}")
    print(f"peak resident memory: {peak_gib:.2f} GiB")
    print(f"resampling onto the T1w grid (plain argmax): {plain_s:.1f} s, skipping the voxels "
          f"out of reach of every structure, against {dense_s:.1f} s resampling every voxel in "
          f"this run ({plain_s / dense_s:.2f}x; not in the total); labels "
          f"{'identical' if (dense == plain).all() else 'DIFFERENT'}")
    if refine_s is not None:
        changed = float((plain != meta.labels.value_to_index(labels)).mean())
        print(f"refinement ({refinement.kind}): {refine_s:.1f} s against {plain_s:.1f} s for the plain argmax of the "
              f"same probabilities in this run ({refine_s / plain_s:.2f}x; not in the total), "
              f"{changed:.1%} of the T1w's voxels relabelled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
