#!/usr/bin/env python
"""Where a training iteration of the default recipe spends its time: data against network.

    python benchmarks/training.py [--prepared work/default_model/prepared] [--iterations 20]
        [--threads 2] [--phase 1|4]

Builds the recipe's patch sampler (bids_cadiff/training/sampler.py) over the prepared maps
(``scripts/train_default_model.py --stage prepare`` writes them) and the recipe's network
(phase 1: without the label prior; phase 4: with it, 70 % real images, half class-balanced,
smooth deformations), then times, per iteration of batch 2 at 48³:

- data: drawing the patches (real or synthesised), the random affine (MONAI RandAffined) and,
  in phase 4, the smooth deformation;
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, default=REPO / "work" / "default_model" / "prepared")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--phase", type=int, choices=(1, 4), default=4)
    args = parser.parse_args(argv)

    import torch
    from monai.transforms import RandAffined

    from bids_cadiff.models.config import DiffusionConfig, ModelConfig
    from bids_cadiff.models.diffusion import CADiff
    from bids_cadiff.training.sampler import PatchSampler, augmented_batch, load_item

    files = sorted(args.prepared.glob("*.npz"))
    if not files:
        sys.exit(f"benchmarks/training.py: no prepared maps in {args.prepared}; run "
                 "scripts/train_default_model.py --stage prepare first")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    patch = (48, 48, 48)
    phase4 = args.phase == 4
    model = CADiff(
        ModelConfig(spatial_dims=3, num_classes=33, channels=(16, 32, 64), num_res_blocks=1,
                    time_embed_dim=64, taca=True, mode="collaborative",
                    label_prior_bins=48 if phase4 else 0),
        DiffusionConfig(timesteps=1000, sampling_steps=5, consistency_loss=True,
                        t_m_max_fraction=0.5 if phase4 else 0.0,
                        t_d_zero_fraction=0.5 if phase4 else 0.0, batch_dice=phase4),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sampler = PatchSampler(
        [load_item(f, csf_to_background=phase4) for f in files], [f.stem for f in files], 0,
        patch, real_fraction=0.7 if phase4 else None, balanced_fraction=0.5 if phase4 else None,
    )
    affine = RandAffined(keys=["image", "distance", "labels"], prob=0.7, rotate_range=[0.17] * 3,
                         scale_range=[0.1] * 3, mode=["bilinear", "bilinear", "nearest"],
                         padding_mode="zeros")
    affine.set_random_state(0)
    gen = torch.Generator().manual_seed(0)
    data_s, net_s = [], []
    for it in range(args.iterations + 2):  # two warm-up iterations, not counted
        start = time.perf_counter()
        images, distances, labels = augmented_batch(sampler, affine, 2, elastic=phase4)
        middle = time.perf_counter()
        losses = model.training_losses(images, distances, labels, generator=gen)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        end = time.perf_counter()
        if it >= 2:
            data_s.append(middle - start)
            net_s.append(end - middle)
    data, net = statistics.median(data_s), statistics.median(net_s)
    total = data + net
    print(f"training benchmark: phase {args.phase} recipe, {len(files)} prepared maps, batch 2 at "
          f"48³, {args.threads} threads, median of {args.iterations} iterations")
    print(f"{'part':30s} {'s/iteration':>12s} {'share':>6s}")
    print(f"{'data (patches, augmentation)':30s} {data:12.3f} {data / total:6.1%}")
    print(f"{'network (forward, backward, step)':30s} {net:12.3f} {net / total:6.1%}")
    print(f"{'total':30s} {total:12.3f} {1:6.0%}")
    print(f"iterations per hour: {3600 / total:.0f} (network alone: {3600 / net:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
