"""k-fold cross-validation of training recipes, with the multi-atlas baseline on the same folds.

Subjects (not images) are split into ``k`` folds (:func:`make_folds`, seeded). For each method
(the base recipe, then each ablation variant) and fold, a model is trained on the other folds'
subjects (:func:`bids_cadiff.app.train.run_training`, no validation split), read back from its
``model.pt`` and run on every held-out image with the app's inference
(:func:`bids_cadiff.app.participant.segment_prepared` on the cached prepared arrays, 2D models
slice by slice); the label map (the plain argmax: the app's ``--refine em`` is not applied, so
the table compares the networks alone) is brought onto the reference label map's own grid and scored
with :func:`bids_cadiff.evaluation.metrics.evaluate_pair` (Dice, NSD, HD95 per structure).
The multi-atlas baseline (:mod:`bids_cadiff.app.multiatlas`) segments each held-out
image from the fold's training subjects.

Outputs in ``OUTPUT_DIR``::

    folds.tsv          participant_id, fold
    scores.tsv         method, fold, participant_id, ..., structure, label, dice, nsd, hd95
    fold_scores.tsv    method, fold, n_images, dice, nsd (mean over images of the class average)
    table1.tsv         method, n_folds, dice_mean, dice_std, nsd_mean, nsd_std (over folds)
    table2.tsv         the same for every variant, with its switches (mode, taca, ...)
    <method>/fold-<k>/ the fold's training output (model.pt, logs); reruns resume or skip it

Scores are fractions in [0, 1]; standard deviations are over folds (``ddof=1``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from bids_cadiff.app.train import (
    TrainConfig,
    TrainingPair,
    find_training_pairs,
    merge_recipes,
    resolve_labels,
    run_training,
)
from bids_cadiff.errors import InputError, UsageError
from bids_cadiff.evaluation.multiatlas import MULTI_ATLAS

logger = logging.getLogger(__name__)

__all__ = ["MULTI_ATLAS", "Variant", "make_folds", "run_crossval", "summarise"]

SWITCHES = (("model", "mode"), ("model", "taca"), ("diffusion", "consistency_loss"),
            ("diffusion", "similarity"), ("model", "spatial_dims"))


@dataclass(frozen=True)
class Variant:
    """One method to cross-validate: a name and the recipe tables it sets over the base."""

    name: str
    recipe: Mapping[str, Any]


def make_folds(subjects: Sequence[str], k: int, seed: int = 0) -> list[list[str]]:
    """Split subjects into ``k`` folds of near-equal size (seeded shuffle, then round robin).

    Example:
        >>> [len(f) for f in make_folds([f"{i:02d}" for i in range(7)], 3)]
        [3, 2, 2]
    """
    subjects = sorted(set(subjects))
    if k < 2:
        raise UsageError(f"--folds must be >= 2, got {k}")
    if len(subjects) < k:
        raise UsageError(
            f"{len(subjects)} labelled subject(s) cannot make {k} folds; use --folds {max(len(subjects), 2)} "
            "or fewer, or label more subjects"
        )
    order = np.random.default_rng(seed).permutation(len(subjects))
    folds: list[list[str]] = [[] for _ in range(k)]
    for i, idx in enumerate(order):
        folds[i % k].append(subjects[idx])
    return [sorted(f) for f in folds]


def _reference(dseg: Path, table: Any, merge: Mapping[int, int]) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """The reference label map as channels on its own grid: ``(channels, affine, spacing)``."""
    from bids_cadiff.io.nifti import load_label_map
    from bids_cadiff.training.prepare import labels_to_index

    ref = load_label_map(dseg)
    return labels_to_index(ref.values, table, merge, ref.affine), ref.affine, ref.spacing


def _score(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], table: Any,
           tolerance: float) -> dict[int, Any]:
    from bids_cadiff.evaluation.metrics import evaluate_pair

    by_index = evaluate_pair(pred, ref, labels=list(range(1, table.num_classes)), spacing=spacing,
                             nsd_tolerance_mm=tolerance)
    return {table.values[i]: s for i, s in by_index.items()}


def _predict(model_path: Path, pair: TrainingPair, config: TrainConfig, ref_shape: tuple[int, ...],
             ref_affine: np.ndarray, *, steps: int | None, seed: int, device: Any) -> np.ndarray:
    """Channels of the held-out image on the reference label map's grid."""
    from bids_cadiff.app.participant import PreparedImage, prepare_image, segment_prepared
    from bids_cadiff.imaging.preprocess import resample_to_reference
    from bids_cadiff.inference.checkpoint import load_checkpoint
    from bids_cadiff.inference.resample import probabilities_to_grid
    from bids_cadiff.registration.atlas import resolve_atlas
    from bids_cadiff.training.loop import predict_indices
    from bids_cadiff.training.prepare import PrepareSettings, prepare_training_image

    loaded = load_checkpoint(model_path)
    meta = loaded.metadata
    settings = PrepareSettings(
        atlas=resolve_atlas(config.data.atlas), voxel_size=tuple(meta.voxel_size),  # type: ignore[arg-type]
        normalization=dict(meta.normalization), registration=config.data.registration,
    )
    work = config.data.work_dir or Path(config.data.output_dir or ".") / "work"
    prepared = prepare_training_image(pair.t1w, pair.dseg, settings=settings, work_dir=work,
                                      prepare_fn=prepare_image)
    n_steps = steps or loaded.model.diffusion_config.sampling_steps
    if loaded.model.model_config.spatial_dims == 3:
        probs, crop_affine = segment_prepared(
            loaded, PreparedImage(prepared.image, prepared.distance, prepared.affine, None),  # type: ignore[arg-type]
            steps=n_steps, seed=seed, device=device,
        )
        return probabilities_to_grid(probs, crop_affine, tuple(ref_shape), ref_affine).astype(np.int16)
    indices = predict_indices(
        loaded.model, prepared.image, prepared.distance, patch_size=meta.patch_size,
        steps=n_steps, seed=seed, device=device, slice_axis=config.training.slice_axis,
    )
    return resample_to_reference(indices, prepared.affine, tuple(ref_shape), ref_affine, order=0)


def summarise(fold_scores: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over folds of each method's fold scores (Table I style)."""
    rows = []
    for method, group in fold_scores.groupby("method", sort=False):
        row: dict[str, Any] = {"method": method, "n_folds": len(group)}
        for score in ("dice", "nsd"):
            values = group[score].to_numpy(dtype=float)
            row[f"{score}_mean"] = float(np.nanmean(values)) if len(values) else math.nan
            row[f"{score}_std"] = float(np.nanstd(values, ddof=1)) if len(values) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=["method", "n_folds", "dice_mean", "dice_std", "nsd_mean", "nsd_std"])


def _write(table: pd.DataFrame, path: Path) -> Path:
    from bids_cadiff.evaluation.report import write_tsv

    return write_tsv(table, path)


def run_crossval(
    base: Mapping[str, Any],
    *,
    bids_dir: Path,
    labels_dir: Path,
    output_dir: Path,
    variants: Sequence[Variant] = (),
    base_name: str = "CA-Diff",
    folds: int = 3,
    seed: int = 0,
    nsd_tolerance_mm: float = 1.0,
    multiatlas: bool = True,
    steps: int | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """Cross-validate the base recipe and its variants (see the module docstring).

    Args:
        base: the base recipe (as read from TOML; ``data`` paths are set here).
        bids_dir, labels_dir: the labelled dataset. output_dir: where everything goes.
        variants: ablations, each merged over ``base``.
        base_name: the base recipe's row name.
        folds: k. seed: fold split seed.
        nsd_tolerance_mm: NSD tolerance.
        multiatlas: also run the multi-atlas baseline.
        steps: DDIM steps at test time (default: the model's).
        device: inference device.

    Returns:
        the tables written: ``scores``, ``fold_scores``, ``table1``, ``table2``.
    """
    from bids_cadiff.app.multiatlas import multiatlas_segment
    from bids_cadiff.evaluation.report import ImageScores, scores_table
    from bids_cadiff.evaluation.metrics import class_average
    from bids_cadiff.imaging.preprocess import resample_to_reference
    from bids_cadiff.inference.predict import resolve_device
    from bids_cadiff.training.ddp import DistributedContext

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    work_dir = output_dir / "work"
    paths = {"data": {"bids_dir": str(bids_dir), "labels_dir": str(labels_dir),
                      "output_dir": str(output_dir), "work_dir": str(work_dir)}}
    base_config = TrainConfig.from_dict(merge_recipes(base, paths))
    data = base_config.data
    table, merge = resolve_labels(data.labels, labels_dir)
    pairs = find_training_pairs(bids_dir, labels_dir, participant_labels=data.participant_labels,
                                labels_desc=data.labels_desc)
    split = make_folds([p.subject for p in pairs], folds, seed)
    _write(pd.DataFrame([{"participant_id": f"sub-{s}", "fold": k} for k, f in enumerate(split)
                         for s in f]), output_dir / "folds.tsv")
    torch_device = resolve_device(device)
    ctx = DistributedContext(device=torch_device)
    methods = [Variant(base_name, {})] + list(variants)
    names = [m.name for m in methods]
    if len(set(names)) != len(names) or MULTI_ATLAS in names:
        raise UsageError(f"method names must be unique and not {MULTI_ATLAS!r}: {names}")
    abbreviations = table.abbreviations
    score_frames, fold_rows, configs = [], [], {}

    def record(method: str, fold: int, images: list[ImageScores]) -> None:
        if not images:
            return
        frame = scores_table(images, abbreviations)
        frame.insert(0, "fold", fold)
        frame.insert(0, "method", method)
        score_frames.append(frame)
        averages = [class_average(im.scores) for im in images]
        fold_rows.append({
            "method": method, "fold": fold, "n_images": len(images),
            "dice": float(np.nanmean([a.dice for a in averages])),
            "nsd": float(np.nanmean([a.nsd for a in averages])),
        })

    for k, test_subjects in enumerate(split):
        train_subjects = sorted(s for f in split if f is not test_subjects for s in f)
        test_pairs = [p for p in pairs if p.subject in test_subjects]
        train_pairs = [p for p in pairs if p.subject in train_subjects]
        logger.info("fold %d/%d: train on %s, test on %s", k + 1, folds, ", ".join(train_subjects),
                    ", ".join(test_subjects))
        for method in methods:
            fold_dir = output_dir / _safe(method.name) / f"fold-{k}"
            recipe = merge_recipes(base, method.recipe, paths, {"data": {
                "output_dir": str(fold_dir), "participant_labels": train_subjects,
                "val_participants": [], "val_fraction": 0.0,
            }})
            config = TrainConfig.from_dict(recipe)
            configs[method.name] = config
            model_path = fold_dir / "model.pt"
            if model_path.is_file() and _finished(model_path, config):
                logger.info("%s fold %d: trained model found, not retraining", method.name, k)
            else:
                run_training(config, resume="auto", progress=progress, distributed=ctx)
            images = []
            for pair in test_pairs:
                ref, ref_affine, spacing = _reference(pair.dseg, table, merge)
                pred = _predict(model_path, pair, config, ref.shape, ref_affine, steps=steps,
                                seed=seed, device=torch_device)
                scores = _score(pred, ref, spacing, table, nsd_tolerance_mm)
                images.append(ImageScores(_entities(pair), scores))
                logger.info("%s fold %d %s: Dice %.4f", method.name, k, pair.name,
                            class_average(scores).dice)
            record(method.name, k, images)
        if multiatlas:
            images = []
            for pair in test_pairs:
                ref, ref_affine, spacing = _reference(pair.dseg, table, merge)
                try:
                    channels, affine = multiatlas_segment(
                        pair.t1w, [(p.t1w, p.dseg) for p in train_pairs], table=table,
                        merge=merge, registration=data.registration,
                        cache_dir=work_dir / "registration",
                    )
                except InputError as exc:
                    logger.error("multi-atlas failed for %s: %s", pair.name, exc)
                    continue
                if channels.shape != ref.shape or not np.allclose(affine, ref_affine, atol=1e-3):
                    channels = resample_to_reference(channels, affine, ref.shape, ref_affine, order=0)
                images.append(ImageScores(_entities(pair), _score(channels, ref, spacing, table,
                                                                  nsd_tolerance_mm)))
            record(MULTI_ATLAS, k, images)

    scores = pd.concat(score_frames, ignore_index=True) if score_frames else pd.DataFrame()
    fold_scores = pd.DataFrame(fold_rows, columns=["method", "fold", "n_images", "dice", "nsd"])
    summary = summarise(fold_scores)
    table1 = summary[summary["method"].isin([base_name, MULTI_ATLAS])].reset_index(drop=True)
    switch_rows = []
    for _, row in summary.iterrows():
        cfg = configs.get(row["method"])
        switches = {key: (getattr(getattr(cfg, part), key) if cfg is not None else None)
                    for part, key in SWITCHES}
        switch_rows.append({"method": row["method"], **switches,
                            **{c: row[c] for c in summary.columns if c != "method"}})
    table2 = pd.DataFrame(switch_rows)
    _write(scores, output_dir / "scores.tsv")
    _write(fold_scores, output_dir / "fold_scores.tsv")
    _write(table1, output_dir / "table1.tsv")
    _write(table2, output_dir / "table2.tsv")
    logger.info("cross-validation tables written to %s", output_dir)
    return {"scores": scores, "fold_scores": fold_scores, "table1": table1, "table2": table2}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _entities(pair: TrainingPair) -> dict[str, str]:
    keys = {"subject": "sub", "session": "ses", "acquisition": "acq", "reconstruction": "rec",
            "run": "run"}
    return {keys[k]: v for k, v in pair.entities.items() if k in keys}


def _finished(model_path: Path, config: TrainConfig) -> bool:
    """Whether ``model.pt`` is a finished run of this recipe (same settings, all iterations,
    and its 1 mm refiner when the recipe has a ``[refiner]`` table)."""
    from bids_cadiff.errors import CheckpointError
    from bids_cadiff.inference.checkpoint import read_checkpoint

    try:
        payload = read_checkpoint(model_path)
    except CheckpointError:
        return False
    training = payload.get("training", {})
    return (training.get("recipe") == config.to_dict()
            and int(training.get("iteration", -1)) >= config.training.iterations
            and (config.refiner is None or "refiner" in payload))
