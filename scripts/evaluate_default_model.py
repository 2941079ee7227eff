#!/usr/bin/env python
"""Evaluate the default model on held-out fstd subjects against aseg, next to the multi-atlas
baseline on the same subjects (the numbers of bids_cadiff/data/model_card.md).

    python scripts/evaluate_default_model.py [--model PATH] [--test sub-01,sub-02]
        [--atlases sub-03,sub-04,sub-06,sub-07] [--out bids_cadiff/data/model_card_scores.tsv]

For each test subject: CA-Diff through the app's own pipeline (raw T1.mgz with skull, and
brainmask.mgz without), for a model with a label prior also the prior alone (the network's
logits set to zero), and the multi-atlas baseline (each atlas subject registered to the test
image with the app's registration, labels majority-voted). A subject without ``T1.mgz``
(sub-03 had none in early copies of the data) is scored skull-stripped only: its skull-on and
prior-alone rows are absent and its multi-atlas target is ``brainmask.mgz``. Always pass
``--out`` when scoring another model or fold: its default is the shipped model's score file. Scores: Dice and NSD (1 mm) per
structure on the aseg grid, aseg mapped to the 32 structures. Writes per-subject scores to a
TSV and prints the class-average and per-structure tables of
:func:`bids_cadiff.evaluation.crossval.render` (the same as scripts/crossval_summary.py).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
FSTD = REPO.parent / "shared" / "data" / "fstd"
log = logging.getLogger("evaluate_default_model")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--test", default="sub-01,sub-02")
    parser.add_argument("--atlases", default="sub-03,sub-04,sub-06,sub-07")
    parser.add_argument("--work", type=Path, default=REPO / "work" / "evaluate")
    parser.add_argument("--out", type=Path, default=REPO / "bids_cadiff" / "data" / "model_card_scores.tsv")
    parser.add_argument("--no-multiatlas", action="store_true")
    parser.add_argument("--no-cadiff", action="store_true", help="only the multi-atlas baseline")
    parser.add_argument("--no-prior-alone", action="store_true",
                        help="skip the label-prior-alone rows")
    parser.add_argument("--refine", default="",
                        help="comma-separated refinement candidates to score beside the plain "
                        "argmax, each NAME=PRIOR_WEIGHT (e.g. 'em=1,em0.5=0.5'): rows "
                        "'CA-Diff + NAME (skull on|off)'")
    parser.add_argument("--refiner", type=Path, default=None,
                        help="a 1 mm refiner (refiner.pt from cadiff-train; default: the "
                        "model's own, if it has one) to score beside the plain argmax: rows "
                        "'CA-Diff + refiner (skull on|off)', and with the refiner's "
                        "probabilities as the EM refinement's prior: 'CA-Diff + refiner + em "
                        "(skull on|off)'")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import nibabel as nib
    import torch

    from bids_cadiff.app.participant import (
        labels_on_t1w_grid,
        load_model,
        prepare_for_model,
        segment_prepared,
    )
    from bids_cadiff.app.participant import corrected_intensity
    from bids_cadiff.inference.refine import RefineSettings
    from bids_cadiff.inference.refiner import refine_probabilities
    from bids_cadiff.inference.resample import posterior_on_grid
    from bids_cadiff.training.refiner_loop import load_refiner
    from bids_cadiff.evaluation.metrics import evaluate_pair
    from bids_cadiff.app.multiatlas import multiatlas_segment
    from bids_cadiff.evaluation.crossval import render
    from bids_cadiff.evaluation.multiatlas import MULTI_ATLAS
    from bids_cadiff.imaging.preprocess import to_ras
    from bids_cadiff.io.nifti import load_t1w
    from bids_cadiff.labels import ASEG_MERGE, aseg_to_table_values
    from bids_cadiff.registration.atlas import resolve_atlas

    if not FSTD.is_dir():
        sys.exit(f"evaluate_default_model: {FSTD} is missing (the project's shared data)")
    loaded = load_model(args.model)
    refiner = loaded.refiner if args.refiner is None else load_refiner(args.refiner)[0]
    prior_only = None
    refinements = {}
    for item in [i.strip() for i in args.refine.split(",") if i.strip()]:
        name, _, weight = item.partition("=")
        try:
            refinements[name] = RefineSettings(prior_weight=float(weight or 1.0))
        except ValueError as exc:
            parser.error(f"--refine {item!r}: {exc}; write NAME=PRIOR_WEIGHT, e.g. em=1")
    if loaded.model.model_config.label_prior_bins and not args.no_prior_alone:
        # the label prior alone: the same model with its network's label logits set to zero,
        # so the app's pipeline runs unchanged and only log P(label | D0) decides
        silenced = copy.deepcopy(loaded.model)
        torch.nn.init.zeros_(silenced.denoiser.label_head.weight)
        torch.nn.init.zeros_(silenced.denoiser.label_head.bias)
        prior_only = dataclasses.replace(loaded, model=silenced)
    atlas = resolve_atlas(None)
    table = loaded.metadata.labels
    structures = list(range(1, table.num_classes))
    rows = []

    def score(method: str, subject: str, pred_idx: np.ndarray, ref_idx: np.ndarray, zooms) -> None:
        scores = evaluate_pair(pred_idx, ref_idx, labels=structures, spacing=zooms)
        for idx, s in scores.items():
            rows.append({"method": method, "subject": subject,
                         "structure": table.entries[idx].abbreviation,
                         "dice": s.dice, "nsd": s.nsd, "hd95": s.hd95})
        mean = np.nanmean([s.dice for s in scores.values()])
        log.info("%s %s: mean Dice %.3f", method, subject, mean)

    atlas_subjects = [a.strip() for a in args.atlases.split(",") if a.strip()]
    atlases = []
    for a in atlas_subjects:
        image = FSTD / a / "T1.mgz"
        atlases.append((image if image.is_file() else FSTD / a / "brainmask.mgz", FSTD / a / "aseg.mgz"))
    for subject in [s.strip() for s in args.test.split(",") if s.strip()]:
        aseg = nib.load(FSTD / subject / "aseg.mgz")
        ref_values = aseg_to_table_values(np.asarray(aseg.dataobj), aseg.affine, table)
        ref_idx = table.value_to_index(ref_values)
        zooms = tuple(float(z) for z in aseg.header.get_zooms()[:3])
        # a subject without T1.mgz: only its skull-stripped image is scored (and registered)
        has_head = (FSTD / subject / "T1.mgz").is_file()
        if not has_head:
            log.warning("%s has no T1.mgz: skull-on methods skipped, multi-atlas on brainmask.mgz", subject)
        cadiff_inputs = () if args.no_cadiff else (
            ("CA-Diff (skull on)", "T1.mgz", loaded), ("CA-Diff (skull off)", "brainmask.mgz", loaded))
        if prior_only is not None and not args.no_cadiff:
            cadiff_inputs += (("Label prior alone (skull on)", "T1.mgz", prior_only),)
        cadiff_inputs = tuple(i for i in cadiff_inputs if has_head or i[1] != "T1.mgz")
        for method, fname, model in cadiff_inputs:
            t1 = load_t1w(FSTD / subject / fname)
            prepared = prepare_for_model(
                t1, model.metadata, atlas=atlas, cache_dir=args.work / "registration",
                image_path=FSTD / subject / fname,
            )
            probs, crop_affine = segment_prepared(
                model, prepared, steps=model.model.diffusion_config.sampling_steps, seed=0,
                device=torch.device("cpu"),
            )
            variants = {method: None}
            if model is loaded:
                kind = method[method.index("(") :]
                variants.update({f"CA-Diff + {name} {kind}": settings
                                 for name, settings in refinements.items()})
            for name, settings in variants.items():
                indices = labels_on_t1w_grid(t1, probs, crop_affine, prepared, settings)
                score(name, subject, indices.astype(np.int64), ref_idx, zooms)
            if refiner is not None and model is loaded:
                intensity = corrected_intensity(t1, prepared)
                fine, fine_affine = refine_probabilities(refiner, probs, crop_affine, intensity,
                                                         t1.affine)
                kind = method[method.index("(") :]
                for name, settings in {"refiner": None, "refiner + em": RefineSettings()}.items():
                    indices = posterior_on_grid(
                        fine, fine_affine, tuple(t1.shape[:3]), t1.affine,
                        intensity=intensity if settings else None, settings=settings).labels
                    score(f"CA-Diff + {name} {kind}", subject, indices.astype(np.int64),
                          ref_idx, zooms)
        if not args.no_multiatlas:
            channels, _ = multiatlas_segment(
                FSTD / subject / ("T1.mgz" if has_head else "brainmask.mgz"), atlases,
                table=table, merge=ASEG_MERGE,
                cache_dir=args.work / "registration",
            )
            score(MULTI_ATLAS, subject, channels.astype(np.int64), ref_idx, zooms)
    frame = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, sep="\t", index=False, float_format="%.4f", na_rep="n/a")
    print(render(frame, [e.abbreviation for e in table.entries[1:]], baseline=MULTI_ATLAS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
