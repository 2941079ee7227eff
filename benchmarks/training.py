#!/usr/bin/env python
"""Where a training iteration of the default recipe spends its time: data against network.

    python benchmarks/training.py [--config configs/default_model.toml] [--iterations 20]
        [--threads 2] [--work work/default_model_v2/work]

Builds the recipe's data (:class:`bids_cadiff.training.sampler.MixedPatchDataset` over the
prepared images and label maps that ``make default-model-folds`` caches in ``--work``; nothing
is registered here) and the recipe's network, then times, per iteration of the recipe's batch
and patch:

- data: drawing the patches (real or synthesised), the random affine, the smooth deformation
  and the registration jitter, exactly as ``cadiff-train`` draws them;
- network: forward, backward and optimiser step.

Prints seconds per iteration of each, their shares, and iterations per hour. Run it alone:
other jobs on the same cores distort every figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / "work" / "shared_bids"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default_model.toml")
    parser.add_argument("--work", type=Path, default=REPO / "work" / "default_model_v2" / "work")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from bids_cadiff.app.train import (
        TrainConfig,
        find_label_maps,
        find_training_pairs,
        load_recipe,
        merge_recipes,
        prepare_items,
        prepare_label_map_items,
        resolve_labels,
    )
    from bids_cadiff.models.diffusion import CADiff
    from bids_cadiff.registration.atlas import resolve_atlas
    from bids_cadiff.training.sampler import MixedPatchDataset

    if not (args.work / "prepared").is_dir():
        sys.exit(f"benchmarks/training.py: no prepared images in {args.work}; run "
                 "`make default-model-folds` (its preparation stage) first")
    torch.set_num_threads(args.threads)
    config = TrainConfig.from_dict(merge_recipes(load_recipe(args.config), {"data": {
        "bids_dir": str(SHARED / "bids"), "labels_dir": str(SHARED / "labels"),
        "synth_label_maps": str(SHARED / "label_maps")}}))
    table, merge = resolve_labels(config.data.labels, config.data.labels_dir)
    atlas = resolve_atlas(config.data.atlas)
    pairs = find_training_pairs(config.data.bids_dir, config.data.labels_dir)
    items = prepare_items(pairs, config=config, table=table, merge=merge, atlas=atlas,
                          work_dir=args.work)
    items += prepare_label_map_items(find_label_maps(config.data.synth_label_maps), config=config,
                                     table=table, merge=merge, atlas=atlas, work_dir=args.work)
    torch.manual_seed(0)
    model = CADiff(config.model, config.diffusion)
    opt = torch.optim.AdamW(model.parameters(), lr=config.training.lr)
    data = MixedPatchDataset(items, patch_size=config.training.patch_size, seed=0,
                             settings=config.sampling)
    batch = config.training.batch_size
    gen = torch.Generator().manual_seed(0)
    data_s, net_s = [], []
    for it in range(args.iterations + 2):  # two warm-up iterations, not counted
        start = time.perf_counter()
        samples = [data[it * batch + b] for b in range(batch)]
        images, distances, labels = (torch.stack([s[k] for s in samples])
                                     for k in ("image", "distance", "label"))
        middle = time.perf_counter()
        losses = model.training_losses(images, distances, labels, generator=gen)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        end = time.perf_counter()
        if it >= 2:
            data_s.append(middle - start)
            net_s.append(end - middle)
    data_t, net = statistics.median(data_s), statistics.median(net_s)
    total = data_t + net
    patch = "x".join(str(p) for p in config.training.patch_size)
    print(f"training benchmark: {args.config.name}, {len(items)} images and label maps, batch "
          f"{batch} at {patch}, {args.threads} threads, median of {args.iterations} iterations")
    print(f"{'part':34s} {'s/iteration':>12s} {'share':>6s}")
    print(f"{'data (patches, augmentation)':34s} {data_t:12.3f} {data_t / total:6.1%}")
    print(f"{'network (forward, backward, step)':34s} {net:12.3f} {net / total:6.1%}")
    print(f"{'total':34s} {total:12.3f} {1:6.0%}")
    print(f"iterations per hour: {3600 / total:.0f} (network alone: {3600 / net:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
