#!/usr/bin/env python
"""Reproduce the bundled default model from the project's shared data: one command.

    python scripts/train_default_model.py [--work WORK] [--iterations N] [--threads T]

Stages (each resumable; rerunning the command continues where it stopped):

1. prepare: every labelled fstd subject (T1.mgz, or brainmask.mgz where there is no T1.mgz;
   aseg mapped to the 32 structures) and every SynthSeg label map (a T1w-like image drawn from
   its labels) goes through the app's own preprocessing and one registration to Colin27
   (:func:`bids_cadiff.app.participant.prepare_image`), cached as .npz in WORK/prepared.
2. train: patches of real images (intensity-augmented, with or without skull) and of images
   synthesised on the fly from the label maps (SynthSeg manner), jointly rotated/scaled with
   their labels and distance field; AdamW with cosine decay; checkpoint + optimizer + RNG
   state every 100 iterations in WORK (exact resume); losses logged to WORK/train_log.tsv.
3. export: the final weights, half precision, into bids_cadiff/data/cadiff-default.pt with
   the recipe in the checkpoint's provenance.

``--holdout sub-01,sub-02`` leaves fstd subjects out (cross-validation folds).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
log = logging.getLogger("train_default_model")

VOXEL = (2.0, 2.0, 2.0)
PATCH = (48, 48, 48)
#: SynthSeg label maps used (each costs one registration to prepare).
SYNTHSEG_MAPS = 20
NORMALIZATION = {"method": "percentile", "lower": 0.5, "upper": 99.5}
MODEL = {"spatial_dims": 3, "num_classes": 33, "channels": [16, 32, 64], "num_res_blocks": 1,
         "time_embed_dim": 64, "taca": True, "mode": "collaborative"}
DIFFUSION = {"timesteps": 1000, "schedule": "linear", "sampling_steps": 5,
             "consistency_loss": True, "similarity": "cosine"}
#: Phase 3: more weight on the cases inference meets (t_m = T, clean field t_d = 0) and batch
#: Dice; see DiffusionConfig. Phases 1-2 used the paper's uniform timesteps.
DIFFUSION_PHASE3 = {**DIFFUSION, "t_m_max_fraction": 0.5, "t_d_zero_fraction": 0.5,
                    "batch_dice": True}
#: Phases 1-2 used the first 10 SynthSeg maps; phases 3-4 all of them.
EARLY_SYNTHSEG_MAPS = 10
#: Phase 4: the model carries the distance-field label prior (models/prior.py) built from the
#: training maps: 48³ cells, smoothing 0.3 cells (chosen on training subjects sub-04/sub-06
#: with a prior built without them: class-average Dice at 2 mm 0.659/0.639 for the prior alone;
#: 64³ cells gave the same, 40³ 0.50).
PRIOR_BINS, PRIOR_SIGMA = 48, 0.3
MODEL_PHASE4 = {**MODEL, "label_prior_bins": PRIOR_BINS}
#: Phase 4: the SynthSeg maps' CSF (24: all extra-cerebral CSF there, a ~1 mL region in aseg)
#: is background in the targets and the prior (training/synth.py); without it the first
#: phase-4 model scored CSF Dice 0.02 on the held-out fold, against 0.68 for multi-atlas.
PHASE4_CSF_TO_BACKGROUND = True
#: Logged per iteration: the losses, and the pair similarities L_sac fits Sim_D to Sim_M with.
LOG_KEYS = ("loss", "dice_ce", "mse", "sac", "sim_d", "sim_m")


def _sources() -> list[tuple[str, Path, Path | None, Path | None]]:
    """(name, image-or-labels path, aseg path or None, brainmask path or None)."""
    out = []
    for sub in sorted((SHARED / "fstd").glob("sub-*")):
        aseg = sub / "aseg.mgz"
        if not aseg.is_file():
            continue
        image = sub / "T1.mgz" if (sub / "T1.mgz").is_file() else sub / "brainmask.mgz"
        out.append((f"fstd-{sub.name}", image, aseg, sub / "brainmask.mgz"))
    maps = sorted((SHARED / "synthseg_label_maps").glob("training_seg_*.nii.gz"))
    for seg in maps[:SYNTHSEG_MAPS]:
        out.append((f"synthseg-{seg.name.split('.')[0]}", seg, None, None))
    return out


def prepare(work: Path) -> list[Path]:
    from bids_cadiff.app.participant import prepare_image
    from bids_cadiff.imaging.preprocess import normalise_intensity, resample_to_reference, to_ras
    from bids_cadiff.io.nifti import load_t1w
    from bids_cadiff.labels import aseg_to_table_values
    from bids_cadiff.registration.atlas import resolve_atlas
    from bids_cadiff.training.synth import BRAIN_VALUES, mean_t1_image

    atlas = resolve_atlas(None)
    out_dir = work / "prepared"
    out_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for name, image_path, aseg_path, mask_path in _sources():
        dst = out_dir / f"{name}.npz"
        if dst.is_file():
            done.append(dst)
            continue
        start = time.time()
        if aseg_path is not None:
            t1 = load_t1w(image_path)
            lab_img = to_ras(nib.load(aseg_path))
        else:
            lab_img = to_ras(nib.load(image_path))
            raw = np.asarray(lab_img.dataobj).astype(np.int32)
            # brain only: one brain-to-brain registration (the field matters inside the brain)
            brain_raw = np.where(np.isin(raw, list(BRAIN_VALUES)), raw, 0)
            t1 = nib.Nifti1Image(mean_t1_image(brain_raw) * 100.0, lab_img.affine)
        prepared = prepare_image(
            t1, atlas=atlas, voxel_size=VOXEL, normalization=NORMALIZATION,
            cache_dir=work / "registration", image_path=image_path,
        )
        shape = prepared.image.shape
        raw_lab = resample_to_reference(
            np.asarray(lab_img.dataobj).astype(np.int32), lab_img.affine, shape,
            prepared.affine, order=0,
        )
        values = aseg_to_table_values(raw_lab, prepared.affine)
        if mask_path is not None:
            m = to_ras(nib.load(mask_path))
            mask = resample_to_reference(
                (np.asarray(m.dataobj) > 0).astype(np.uint8), m.affine, shape, prepared.affine, 0
            ) > 0
        else:
            mask = np.isin(raw_lab, list(BRAIN_VALUES))
        # the app's input for the skull-stripped image (training/sampler.py)
        image_brain = normalise_intensity(
            prepared.corrected * mask, lower_percentile=NORMALIZATION["lower"],
            upper_percentile=NORMALIZATION["upper"])
        tmp = dst.with_suffix(".tmp.npz")
        np.savez_compressed(
            tmp, image=prepared.image.astype(np.float32), image_brain=image_brain,
            distance=prepared.distance.astype(np.float16), values=values.astype(np.int16),
            raw_labels=raw_lab.astype(np.int16), mask=mask, affine=prepared.affine,
            real=np.array(aseg_path is not None), quality=np.array(prepared.registration.quality),
        )
        tmp.rename(dst)
        log.info("prepared %s in %.0f s (NCC %.2f)", name, time.time() - start,
                 prepared.registration.quality)
        done.append(dst)
    return done


def train(work: Path, files: list[Path], iterations: int, batch: int, lr: float, seed: int,
          *, phase: str = "", init: Path | None = None, balanced: bool = False,
          diffusion: dict | None = None, real_fraction: float | None = None,
          balanced_fraction: float | None = None, stop_at: int | None = None,
          prior: bool = False, elastic: bool = False, csf_to_background: bool = False,
          accept_unrecorded: bool = False) -> Path:
    """One training phase; ``init``: start from the weights of a finished phase's state.

    ``stop_at``: end the phase there although its schedule runs to ``iterations``.
    ``prior``: the model carries the label prior built from ``files`` (phase 4).
    ``elastic``: a smooth random deformation after the random affine (phase 4).
    ``csf_to_background``: SynthSeg maps' CSF (all extra-cerebral CSF) is background in the
    targets and in the prior, aseg's convention (phase 4).
    """
    from monai.transforms import RandAffined

    from bids_cadiff.models.config import DiffusionConfig, ModelConfig
    from bids_cadiff.models.diffusion import CADiff
    from bids_cadiff.training.sampler import PatchSampler, augmented_batch, load_item

    torch.manual_seed(seed)
    model = CADiff(ModelConfig.from_dict(MODEL_PHASE4 if prior else MODEL),
                   DiffusionConfig.from_dict(diffusion or DIFFUSION))
    if prior:
        model.set_label_prior(torch.as_tensor(label_prior(files, csf_to_background)))
    if init is not None:
        _load_weights(model, torch.load(init, weights_only=False)["model"], init)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=iterations, pct_start=0.05)
    sampler = PatchSampler([load_item(f, csf_to_background) for f in files],
                           [f.stem for f in files], seed, PATCH, balanced=balanced,
                           real_fraction=real_fraction, balanced_fraction=balanced_fraction)
    affine = RandAffined(
        keys=["image", "distance", "labels"], prob=0.7, rotate_range=[0.17] * 3,
        scale_range=[0.1] * 3, mode=["bilinear", "bilinear", "nearest"], padding_mode="zeros",
    )
    affine.set_random_state(seed)
    gen = torch.Generator().manual_seed(seed)
    state_path = work / f"train_state{phase}.pt"
    start_it = 0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        _check_csf_setting(state, csf_to_background, state_path)
        _check_training_items(state, files, state_path, accept_unrecorded)
        _load_weights(model, state["model"], state_path)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        sampler.rng.bit_generator.state = state["sampler_rng"]
        affine.R.set_state(state["affine_rng"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        start_it = state["iteration"]
        log.info("resumed at iteration %d", start_it)
    log_path = work / f"train_log{phase}.tsv"
    header = "iteration\tseconds\t" + "\t".join(LOG_KEYS) + "\tlr\n"
    if not log_path.exists():
        log_path.write_text(header)
    # on resume: drop rows logged after the last saved state, and keep counting seconds on
    lines = log_path.read_text().splitlines()[1:]
    kept = [line for line in lines if int(line.split("\t")[0]) <= start_it]
    if len(kept) != len(lines):
        log_path.write_text(header + "".join(line + "\n" for line in kept))
    model.train()
    t0 = time.time() - (float(kept[-1].split("\t")[1]) if kept else 0.0)
    from tqdm import tqdm

    end = min(iterations, stop_at) if stop_at else iterations
    for it in tqdm(range(start_it, end), initial=start_it, total=end, mininterval=30):
        images, distances, labels = augmented_batch(sampler, affine, batch, elastic=elastic)
        losses = model.training_losses(images, distances, labels, generator=gen)
        opt.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with log_path.open("a") as fh:
            fh.write("\t".join([str(it + 1), f"{time.time() - t0:.1f}"] + [
                f"{float(losses[k].detach()) if k in losses else float('nan'):.4f}"
                for k in LOG_KEYS
            ] + [f"{sched.get_last_lr()[0]:.2e}"]) + "\n")
        if (it + 1) % 100 == 0 or it + 1 == end:
            tmp = state_path.with_suffix(".tmp")
            torch.save({
                "model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "sampler_rng": sampler.rng.bit_generator.state, "affine_rng": affine.R.get_state(),
                "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "iteration": it + 1,
                "csf_to_background": csf_to_background,
                "training_items": sorted(f.stem for f in files),
            }, tmp)
            tmp.rename(state_path)
    return state_path


def _check_training_items(state: dict, files: list[Path], source: Path,
                          accept_unrecorded: bool = False) -> None:
    """Refuse a state whose training maps differ from ``files`` (another ``--holdout``): its
    weights, and the label prior built from ``files``, would mix the two sets. A state
    without the record (written before it existed, like those in artifacts/default_model/)
    is refused too, unless ``accept_unrecorded`` (``--accept-unrecorded-state``) takes it as
    trained on ``files``."""
    if "training_items" not in state:
        if accept_unrecorded:
            log.warning("%s does not record its training maps; taken as trained on this run's "
                        "%d maps (--accept-unrecorded-state)", source, len(files))
            return
        raise RuntimeError(
            f"{source}: the state does not record its training maps (written before "
            "train_default_model recorded them), so it cannot be checked against --holdout; "
            "train again in a fresh --work, or pass --accept-unrecorded-state with the "
            "--holdout it was trained with (the shipped states: --holdout sub-01,sub-02,sub-05, "
            "as sub-05 had no labels then)")
    recorded, current = set(state["training_items"]), {f.stem for f in files}
    if recorded != current:
        raise RuntimeError(
            f"{source}: trained on other maps than this run's (only in the state: "
            f"{sorted(recorded - current)}; only in this run: {sorted(current - recorded)}): "
            "pass the --holdout it was trained with, or use another --work")


def _check_csf_setting(state: dict, expected: bool, source: Path) -> None:
    """Refuse a state trained with the other CSF convention (a state without the field predates
    it: phases 1-3, or the previous release's phase 4, all without the CSF change)."""
    found = bool(state.get("csf_to_background", False))
    if found != expected:
        raise RuntimeError(
            f"{source}: trained with csf_to_background={found}, but this phase uses {expected} "
            "(PHASE4_CSF_TO_BACKGROUND); move the state away to train this phase again")


def _load_weights(model: torch.nn.Module, weights: dict, source: Path) -> None:
    """Load ``weights`` exactly; weights without the label prior (a phase-3 state, or a state
    in artifacts/, which leaves it out) keep the model's own, rebuilt from the data."""
    weights = dict(weights)
    if model.model_config.label_prior_bins:
        weights.setdefault("label_prior", model.label_prior)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise RuntimeError(f"{source}: weights do not match this phase's model ({exc})") from None


def label_prior(files: list[Path], csf_to_background: bool = False) -> np.ndarray:
    """The distance-field label prior of the training maps: ``(33, B, B, B)`` probabilities."""
    from bids_cadiff.labels import SYNTHSEG32
    from bids_cadiff.models.prior import build_label_prior

    from bids_cadiff.training.sampler import load_item

    def samples():
        for f in files:
            item = load_item(f, csf_to_background, keys=("distance", "values", "real"))
            yield item["distance"].astype(np.float32), SYNTHSEG32.value_to_index(item["values"])

    start = time.time()
    probs = build_label_prior(samples(), SYNTHSEG32.num_classes, PRIOR_BINS, PRIOR_SIGMA)
    log.info("label prior from %d maps, %d³ cells, in %.0f s", len(files), PRIOR_BINS, time.time() - start)
    return probs


def export(work: Path, dest: Path, files: list[Path], iterations: int, args: argparse.Namespace) -> None:
    from bids_cadiff.inference.checkpoint import ModelMetadata, save_checkpoint
    from bids_cadiff.labels import SYNTHSEG32
    from bids_cadiff.models.config import DiffusionConfig, ModelConfig
    from bids_cadiff.models.diffusion import CADiff
    from bids_cadiff.registration.atlas import resolve_atlas

    phases = [p for p in ("", "_phase2", "_phase3", "_phase4")
              if (work / f"train_state{p}.pt").is_file()]
    state = torch.load(work / f"train_state{phases[-1]}.pt", weights_only=False)
    _check_csf_setting(state, PHASE4_CSF_TO_BACKGROUND and phases[-1] == "_phase4",
                       work / f"train_state{phases[-1]}.pt")
    # the label prior is rebuilt from ``files``: they must be the state's training maps
    _check_training_items(state, files, work / f"train_state{phases[-1]}.pt",
                          getattr(args, "accept_unrecorded_state", False))
    diffusion = DIFFUSION_PHASE3 if phases[-1] in ("_phase3", "_phase4") else DIFFUSION
    model_config = MODEL_PHASE4 if phases[-1] == "_phase4" else MODEL
    model = CADiff(ModelConfig.from_dict(model_config), DiffusionConfig.from_dict(diffusion))
    if model_config.get("label_prior_bins") and "label_prior" not in state["model"]:
        model.set_label_prior(torch.as_tensor(label_prior(files, PHASE4_CSF_TO_BACKGROUND)))
    _load_weights(model, state["model"], work / f"train_state{phases[-1]}.pt")
    atlas = resolve_atlas(None)
    hours, total_iterations = 0.0, 0
    for p in phases:
        log_lines = (work / f"train_log{p}.tsv").read_text().strip().splitlines()
        hours += float(log_lines[-1].split("\t")[1]) / 3600 if len(log_lines) > 1 else 0.0
        total_iterations += len(log_lines) - 1
    meta = ModelMetadata(
        name="cadiff-default", labels=SYNTHSEG32, normalization=NORMALIZATION,
        voxel_size=VOXEL, patch_size=PATCH,
        atlas={"name": atlas.name, "source": atlas.description},
        training={
            "recipe": "python scripts/train_default_model.py"
            + (f" --holdout {args.holdout}" if args.holdout else ""),
            "data": [f.stem for f in files], "iterations": total_iterations,
            "phases": {"uniform patches, OneCycle lr": args.iterations,
                       "class-balanced patches, OneCycle lr/2": args.phase2_iterations,
                       "70% real images, half class-balanced, t_m=T / t_d=0 for half, batch "
                       "Dice, OneCycle phase3-lr (schedule planned over phase3-iterations, "
                       "stopped at phase3-stop-at)": args.phase3_stop_at,
                       "as phase 3 plus the distance-field label prior added to the logits, "
                       "smooth random deformations and the SynthSeg maps' extra-cerebral CSF as "
                       "background, OneCycle phase4-lr": args.phase4_iterations},
            "label_prior": {"bins": PRIOR_BINS, "sigma": PRIOR_SIGMA,
                            "synthseg_csf_to_background": PHASE4_CSF_TO_BACKGROUND}
            if phases[-1] == "_phase4" else None,
            "hours": round(hours, 2), "hardware": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "batch_size": args.batch, "lr": args.lr,
            "seed": args.seed, "holdout": args.holdout,
        },
    )
    digest = save_checkpoint(dest, model, meta, half=True)
    log.info("exported %s (sha256 %s…)", dest, digest[:12])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "work" / "default_model")
    parser.add_argument("--iterations", type=int, default=2500)
    parser.add_argument("--phase2-iterations", type=int, default=1400,
                        help="second phase: class-balanced patches, fresh schedule at lr/2")
    parser.add_argument("--phase3-iterations", type=int, default=3600,
                        help="third phase: 70%% real images, inference-weighted timesteps")
    parser.add_argument("--phase3-lr", type=float, default=1e-3)
    parser.add_argument("--phase3-stop-at", type=int, default=1200,
                        help="end phase 3 here (the shipped run stopped at 1200 of 3600 to "
                        "make room for phase 4)")
    parser.add_argument("--phase4-iterations", type=int, default=2400,
                        help="fourth phase: as phase 3 with the label prior in the model and "
                        "smooth random deformations")
    parser.add_argument("--phase4-lr", type=float, default=5e-4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--holdout", default="", help="comma-separated fstd subjects to leave out")
    parser.add_argument("--output", type=Path, default=REPO / "bids_cadiff" / "data" / "cadiff-default.pt")
    parser.add_argument("--stage", choices=["all", "prepare", "train", "export"], default="all")
    parser.add_argument("--accept-unrecorded-state", action="store_true",
                        help="take a resumable state that does not record its training maps "
                        "(written before they were recorded) as trained on this run's maps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "recipe.json").write_text(json.dumps(
        {"argv": sys.argv[1:], "model": MODEL, "diffusion": DIFFUSION,
         "diffusion_phase3": DIFFUSION_PHASE3, "voxel": VOXEL, "patch": PATCH}, indent=2))
    files = prepare(args.work) if args.stage in ("all", "prepare") else sorted((args.work / "prepared").glob("*.npz"))
    held = {f"fstd-{h.strip()}" for h in args.holdout.split(",") if h.strip()}
    files = [f for f in files if f.stem not in held]
    early = [f for f in files if not f.stem.startswith("synthseg-")
             or int(f.stem.rsplit("_", 1)[-1]) <= EARLY_SYNTHSEG_MAPS]
    if args.stage in ("all", "train"):
        accept = args.accept_unrecorded_state
        last = train(args.work, early, args.iterations, args.batch, args.lr, args.seed,
                     accept_unrecorded=accept)
        if args.phase2_iterations:
            last = train(args.work, early, args.phase2_iterations, args.batch, args.lr / 2,
                         args.seed + 1, phase="_phase2", init=last, balanced=True,
                         accept_unrecorded=accept)
        if args.phase3_iterations:
            last = train(args.work, files, args.phase3_iterations, args.batch, args.phase3_lr,
                         args.seed + 2, phase="_phase3", init=last, diffusion=DIFFUSION_PHASE3,
                         real_fraction=0.7, balanced_fraction=0.5, stop_at=args.phase3_stop_at,
                         accept_unrecorded=accept)
        if args.phase4_iterations:
            train(args.work, files, args.phase4_iterations, args.batch, args.phase4_lr,
                  args.seed + 3, phase="_phase4", init=last, diffusion=DIFFUSION_PHASE3,
                  real_fraction=0.7, balanced_fraction=0.5, prior=True, elastic=True,
                  csf_to_background=PHASE4_CSF_TO_BACKGROUND, accept_unrecorded=accept)
    if args.stage in ("all", "export"):
        export(args.work, args.output, files, args.iterations, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
