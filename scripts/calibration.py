#!/usr/bin/env python
"""Calibration of the app's uncertainty on the cross-validation folds, and the QC thresholds.

    python scripts/calibration.py run --model M --subjects sub-01,...,sub-07 --out work/calibration/fold1
    python scripts/calibration.py registration --subjects sub-01,...,sub-07 \\
        --out artifacts/calibration/registration.tsv
    python scripts/calibration.py summarise --registrations artifacts/calibration/registration.tsv \\
        --fold work/calibration/fold1 sub-01,sub-02 --fold work/calibration/fold2 sub-03,sub-04 \\
        --fold work/calibration/fold3 sub-05,sub-06,sub-07 --out-dir artifacts/calibration
    python scripts/calibration.py store --summary artifacts/calibration/summary.json \\
        --fold fold1 --model bids_cadiff/data/cadiff-default.pt

``run``: every subject's ``T1.mgz`` (with skull, as users give it) through the app's own
pipeline with one sample (:func:`bids_cadiff.app.participant.segment_t1w`'s stages, seed 0,
``--refine em``) and one fold model. Per subject it keeps, for the voxels within 2 voxels of
the predicted or the reference brain, the final probabilities (uint8, as
``--save-probabilities`` writes them) and the reference labels (aseg mapped to the 32
structures), plus the registration's NCC, in ``OUT/<subject>.npz``.

``store``: writes the temperature chosen for a fold (below) into that fold's model
(:func:`bids_cadiff.inference.checkpoint.store_calibration`). For a model trained on every
subject with the folds' recipe (``--fold out-of-fold``), the temperature is the one chosen the
same way on every subject's out-of-fold run (made by the fold model that did not train on it):
the folds' test sets must be disjoint and together hold every subject. Unlike a fold's choice,
it is made on runs by models that had not seen those subjects, and no subject is left to test
it on; the per-fold figures are the evidence that the rule works.

``summarise``: for each fold, its *test* subjects give the reported figures and its *training*
subjects (every other subject scored by the same fold model) every choice:

* voxel calibration: expected calibration error (15 equal-width confidence bins over the
  voxels labelled brain by the app or the reference), and a reliability diagram;
* a temperature (probabilities ∝ p^(1/T)), fitted by minimising the negative log-likelihood
  on the fold's training subjects, kept only if it lowers their ECE;
* ranking: Spearman correlation between the QC table's per-structure ``uncertainty`` and
  1 − Dice, over all test subjects and structures;
* QC thresholds, from the training subjects: the registration NCC halfway between the worst
  training registration and the best training registration moved by 8 mm (``registration``
  computes both, for the heads and the skull-stripped brains), and the largest mean brain
  uncertainty plus 3 SD; on the test subjects, how many good and how many shifted
  registrations the threshold flags.

Writes ``OUT_DIR/calibration.tsv`` (per fold and test subject), ``OUT_DIR/summary.json`` and
``docs/images/reliability.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FSTD = REPO.parent / "shared" / "data" / "fstd"
log = logging.getLogger("calibration")
BINS = 15
#: Voxels kept around the predicted or reference brain (covers each structure's shell).
MARGIN = 2
#: The deliberate misregistration the registration check must catch (mm of translation).
SHIFT_MM = 8.0


def run(args: argparse.Namespace) -> int:
    import nibabel as nib
    import torch
    from scipy import ndimage

    from bids_cadiff.app.participant import (
        corrected_intensity,
        load_model,
        posterior_on_t1w_grid,
        prepare_for_model,
        segment_prepared,
    )
    from bids_cadiff.inference.refine import RefineSettings
    from bids_cadiff.io.nifti import load_t1w
    from bids_cadiff.labels import aseg_to_table_values
    from bids_cadiff.registration.atlas import resolve_atlas

    loaded = load_model(args.model)
    meta = loaded.metadata
    table = meta.labels
    atlas = resolve_atlas(None)
    args.out.mkdir(parents=True, exist_ok=True)
    for subject in [s for s in args.subjects.split(",") if s]:
        dst = args.out / f"{subject}.npz"
        if dst.is_file():
            log.info("%s: done", dst)
            continue
        path = FSTD / subject / "T1.mgz"
        t1 = load_t1w(path)
        aseg = nib.load(FSTD / subject / "aseg.mgz")
        truth = table.value_to_index(
            aseg_to_table_values(np.asarray(aseg.dataobj), aseg.affine, table)
        ).astype(np.int16)
        prepared = prepare_for_model(t1, meta, atlas=atlas,
                                     cache_dir=args.work / "registration", image_path=path)
        probs, crop_affine = segment_prepared(
            loaded, prepared, steps=loaded.model.diffusion_config.sampling_steps, seed=0,
            device=torch.device("cpu"),
        )
        refine = RefineSettings()
        post = posterior_on_t1w_grid(t1, probs, crop_affine, refine,
                                     corrected_intensity(t1, prepared), keep_probabilities=True)
        if truth.shape != post.labels.shape:
            raise SystemExit(f"{subject}: aseg grid {truth.shape} is not the T1.mgz grid")
        region = ndimage.binary_dilation((post.labels > 0) | (truth > 0), iterations=MARGIN)
        where = np.flatnonzero(region)
        assert post.probabilities is not None
        np.savez_compressed(
            dst, index=where.astype(np.int64), shape=np.array(truth.shape),
            probabilities=post.probabilities.reshape(-1, table.num_classes)[where],
            truth=truth.ravel()[where], zooms=np.array(t1.header.get_zooms()[:3]),
            registration_ncc=prepared.registration.quality,
            brain_only=prepared.registration.brain_only,
            model_sha256=meta.sha256,
        )
        log.info("%s: kept %d voxels", dst, where.size)
    return 0


def registration(args: argparse.Namespace) -> int:
    """NCC of each subject's registration as the app computes it, and of the same
    registration off by a translation of ``SHIFT_MM`` (the axis where it costs the least NCC, as a
    deliberately misregistered image), for its head (T1.mgz) and brain (brainmask.mgz)."""
    import nibabel as nib
    import pandas as pd

    from bids_cadiff.app.participant import prepare_image
    from bids_cadiff.io.nifti import load_t1w
    from bids_cadiff.registration.ants import registration_ncc
    from bids_cadiff.registration.atlas import resolve_atlas

    atlas = resolve_atlas(None)
    rows = []
    for subject in [s for s in args.subjects.split(",") if s]:
        for fname in ("T1.mgz", "brainmask.mgz"):
            path = FSTD / subject / fname
            if not path.is_file():
                continue
            prepared = prepare_image(
                load_t1w(path), atlas=atlas, voxel_size=(2.0, 2.0, 2.0),
                normalization={"method": "percentile"}, cache_dir=args.work / "registration",
                image_path=path,
            )
            reg = prepared.registration
            grid = nib.Nifti1Image(prepared.corrected, prepared.affine)
            shifted = registration_ncc(grid, atlas, reg, shift_mm=SHIFT_MM)
            rows.append({"subject": subject, "image": fname, "brain_only": reg.brain_only,
                         "ncc": reg.quality, "ncc_check": registration_ncc(grid, atlas, reg),
                         f"ncc_shift{SHIFT_MM:g}mm": shifted})
            log.info("%s %s: NCC %.3f, off by %g mm %.3f", subject, fname, reg.quality,
                     SHIFT_MM, shifted)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out, sep="\t", index=False, float_format="%.4f")
    return 0


# --------------------------------------------------------------------------- summarise


def _tempered(p: np.ndarray, temperature: float) -> np.ndarray:
    """``(n, C)`` probabilities ∝ p^(1/T), exactly as the app tempers its ``(C, n)`` ones
    (:func:`bids_cadiff.inference.posterior.temper`)."""
    from bids_cadiff.inference.posterior import temper

    return temper(p.T, temperature).T


def load_run(path: Path) -> dict:
    """A run of ``run``, its probabilities as float ``p`` ``(n, C)``."""
    with np.load(path) as data:
        out = {k: data[k] for k in data.files}
    out["p"] = out.pop("probabilities").astype(np.float32) / 255.0
    return out


def _bins(conf: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin: count, mean confidence, accuracy."""
    edges = np.linspace(0, 1, BINS + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, BINS - 1)
    count = np.bincount(which, minlength=BINS).astype(np.float64)
    conf_sum = np.bincount(which, weights=conf, minlength=BINS)
    acc_sum = np.bincount(which, weights=correct.astype(np.float64), minlength=BINS)
    return count, conf_sum, acc_sum


def _ece(count: np.ndarray, conf_sum: np.ndarray, acc_sum: np.ndarray) -> float:
    total = count.sum()
    safe = np.maximum(count, 1)
    return float(np.sum(count / total * np.abs(acc_sum / safe - conf_sum / safe)))


def _voxel_stats(item: dict, temperature: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = _tempered(item["p"], temperature)
    labels = p.argmax(axis=1)
    brain = (labels > 0) | (item["truth"] > 0)
    conf = p.max(axis=1)[brain]
    return _bins(conf, labels[brain] == item["truth"][brain])


def _nll(items: list[dict], temperature: float, stride: int = 7) -> float:
    total, n = 0.0, 0
    for item in items:
        p = _tempered(item["p"][::stride], temperature)
        truth = item["truth"][::stride].astype(np.int64)
        total -= float(np.log(np.clip(p[np.arange(len(truth)), truth], 1e-6, None)).sum())
        n += len(truth)
    return total / max(n, 1)


def _fit_temperature(items: list[dict]) -> float:
    grid = np.exp(np.linspace(np.log(0.5), np.log(4.0), 25))
    losses = [_nll(items, float(t)) for t in grid]
    return float(grid[int(np.argmin(losses))])


def app_rows(item: dict, temperature: float, table) -> tuple[list[dict], np.ndarray, float]:  # noqa: ANN001
    """The QC rows the app writes for a run at ``temperature``, its channel labels on the
    full grid, and its mean brain uncertainty."""
    from bids_cadiff.qc.structures import structure_rows

    p = _tempered(item["p"], temperature)
    shape = tuple(int(n) for n in item["shape"])
    labels = np.zeros(int(np.prod(shape)), dtype=np.int16)
    unc = np.zeros(int(np.prod(shape)), dtype=np.float32)
    labels[item["index"]] = p.argmax(axis=1)
    unc[item["index"]] = 1.0 - p.max(axis=1)
    labels, unc = labels.reshape(shape), unc.reshape(shape)
    values = table.index_to_value(labels)
    rows = structure_rows(values, unc, table, float(np.prod(item["zooms"])))
    return rows, labels, float(unc[values > 0].mean())


def _structures(item: dict, temperature: float, table) -> tuple[list[dict], float]:  # noqa: ANN001
    """:func:`app_rows` plus each structure's Dice against the reference."""
    rows, labels, brain_unc = app_rows(item, temperature, table)
    truth = np.zeros(labels.size, dtype=np.int16)
    truth[item["index"]] = item["truth"]
    truth = truth.reshape(labels.shape)
    for idx, row in enumerate(rows, start=1):
        a, b = labels == idx, truth == idx
        denom = a.sum() + b.sum()
        row["dice"] = float(2 * (a & b).sum() / denom) if denom else float("nan")
    return rows, brain_unc


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    ok = np.isfinite(x) & np.isfinite(y)
    return float(spearmanr(x[ok], y[ok]).statistic)


def _reliability_panel(count: np.ndarray, conf_sum: np.ndarray, acc_sum: np.ndarray,
                       ece: float, size: int = 400, pad: int = 40) -> np.ndarray:
    """One reliability diagram drawn with numpy: a bar per confidence bin up to the bin's
    accuracy (blue), the bin's mean confidence on the diagonal (red dots), the diagonal (grey:
    perfect calibration), and along the top a red bar as long as the ECE (full width: 1)."""
    img = np.full((size + 2 * pad, size + 2 * pad, 3), 255, dtype=np.uint8)

    def px(x: float, y: float) -> tuple[int, int]:
        return pad + size - int(round(y * size)), pad + int(round(x * size))

    img[pad : pad + size + 1, pad] = 0
    img[pad + size, pad : pad + size + 1] = 0
    for t in np.linspace(0, 1, 2 * size):
        r, c = px(t, t)
        img[r, c] = (150, 150, 150)
    safe = np.maximum(count, 1)
    width = size // BINS
    for b in range(BINS):
        if count[b] == 0:
            continue
        top, left = px(b / BINS, acc_sum[b] / safe[b])
        img[top : pad + size, left + 2 : left + width - 1] = (60, 110, 200)
        mean = conf_sum[b] / safe[b]
        r, c = px(mean, mean)
        img[max(r - 2, 0) : r + 3, max(c - 2, 0) : c + 3] = (220, 60, 40)
    img[12:20, pad : pad + int(round(min(ece, 1.0) * size))] = (220, 60, 40)
    return img


def _reliability_png(raw: list[np.ndarray], chosen: list[np.ndarray], path: Path) -> None:
    """Reliability diagrams of the test voxels side by side: left the refined probabilities as
    they come (T = 1), right at the temperature chosen on each fold's training subjects."""
    from bids_cadiff.io.atomic import atomic_write
    from bids_cadiff.reports.overlay import png_bytes

    left = _reliability_panel(*raw, _ece(*raw))
    right = _reliability_panel(*chosen, _ece(*chosen))
    gap = np.full((left.shape[0], 20, 3), 255, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, png_bytes(np.concatenate([left, gap, right], axis=1)))


#: ``--fold`` of ``store`` (and of ``build_qc_reference.py build``) for a model trained on every
#: subject: the choices made on all subjects' out-of-fold runs.
OUT_OF_FOLD = "out-of-fold"


def _choices(items: dict[str, dict], regs, table) -> dict:  # noqa: ANN001
    """What is chosen on a set of runs (a fold's training subjects, or every subject's
    out-of-fold run): the temperature (kept only if it lowers their ECE), the registration NCC
    threshold per kind of image, and the largest mean brain uncertainty plus 3 SD."""
    if len(items) < 2:
        raise SystemExit(f"choices need at least 2 subjects' runs, got {sorted(items)}")
    runs = list(items.values())
    raw = [sum(x) for x in zip(*(_voxel_stats(i, 1.0) for i in runs))]
    temperature = _fit_temperature(runs)
    fitted = [sum(x) for x in zip(*(_voxel_stats(i, temperature) for i in runs))]
    keep = _ece(*fitted) < _ece(*raw)
    chosen = temperature if keep else 1.0
    qc = [_structures(i, chosen, table)[1] for i in runs]
    reg_min = {}
    for kind, sub in regs.groupby("brain_only"):
        sub = sub[sub.subject.isin(list(items))]
        # halfway between the worst good registration and the best one off by SHIFT_MM
        reg_min["brain_only" if kind else "with_skull"] = float(
            (sub.ncc.min() + sub[f"ncc_shift{SHIFT_MM:g}mm"].max()) / 2)
    return {"temperature_fitted": temperature, "temperature_kept": keep,
            "train_ece_raw": _ece(*raw), "train_ece_fitted": _ece(*fitted),
            "registration_min": reg_min,
            "uncertainty_max": float(np.max(qc) + 3 * np.std(qc, ddof=1))}


def chosen_for(summary: dict, fold: str) -> dict:
    """The choices for the model of ``fold`` (a fold folder's name), or for a model trained on
    every subject (:data:`OUT_OF_FOLD`)."""
    if fold == OUT_OF_FOLD:
        if "out_of_fold" not in summary:
            raise SystemExit("the summary has no out-of-fold choices: run `scripts/calibration.py "
                             "summarise` again with every fold, so each subject is a test "
                             "subject of one")
        return summary["out_of_fold"]
    for entry in summary["folds"]:
        if Path(entry["dir"]).name == fold:
            return entry
    raise SystemExit(f"no fold {fold!r} in the summary; use one of "
                     f"{[Path(f['dir']).name for f in summary['folds']] + [OUT_OF_FOLD]}")


def summarise(args: argparse.Namespace) -> int:
    from bids_cadiff.app.participant import load_model
    from bids_cadiff.qc.flags import load_reference  # noqa: F401 - the rule below is its doc

    import pandas as pd

    table = load_model(None).metadata.labels
    regs = pd.read_csv(args.registrations, sep="\t")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    folds = []
    rows_out = []
    pooled = {"raw": [np.zeros(BINS)] * 3, "chosen": [np.zeros(BINS)] * 3}
    rank_u, rank_e = [], []
    out_of_fold: dict[str, dict] = {}  # each subject's run by the fold that tested it
    every: set[str] = set()
    for fold_dir, tests in args.fold:
        test = [s for s in tests.split(",") if s]
        twice = sorted(set(test) & set(out_of_fold))
        if twice:
            raise SystemExit(f"{fold_dir}: {twice} already a test subject of an earlier fold; "
                             "the folds' test sets must be disjoint")
        items = {p.stem: load_run(p) for p in sorted(Path(fold_dir).glob("sub-*.npz"))}
        train = [s for s in items if s not in test]
        missing = [s for s in test if s not in items]
        if missing:
            raise SystemExit(f"{fold_dir}: no run for test subject(s) {missing}")
        fold = {"dir": str(fold_dir), "test": test, "train": train,
                **_choices({s: items[s] for s in train}, regs, table)}
        chosen_t = fold["temperature_fitted"] if fold["temperature_kept"] else 1.0
        ncc = {s: float(items[s]["registration_ncc"]) for s in items}
        reg_min, unc_max = fold["registration_min"], fold["uncertainty_max"]
        for s in test:
            raw = _voxel_stats(items[s], 1.0)
            chosen = _voxel_stats(items[s], chosen_t)
            pooled["raw"] = [a + b for a, b in zip(pooled["raw"], raw)]
            pooled["chosen"] = [a + b for a, b in zip(pooled["chosen"], chosen)]
            srows, brain_unc = _structures(items[s], chosen_t, table)
            for r in srows:
                if r["uncertainty"] is not None and np.isfinite(r["dice"]):
                    rank_u.append(r["uncertainty"])
                    rank_e.append(1.0 - r["dice"])
            rows_out.append({
                "fold": Path(fold_dir).name, "subject": s, "ece_raw": _ece(*raw),
                "ece_chosen": _ece(*chosen), "temperature": chosen_t,
                "mean_dice": float(np.nanmean([r["dice"] for r in srows])),
                "brain_uncertainty": brain_unc, "registration_ncc": ncc[s],
                "flag_registration": ncc[s] < reg_min["with_skull"],
                "flag_uncertainty": brain_unc > unc_max,
            })
        folds.append(fold)
        out_of_fold.update({s: items[s] for s in test})
        every.update(items)
    untested = sorted(every - set(out_of_fold))
    if untested:
        log.info("no out-of-fold choices: %s are in no fold's test subjects (give every fold so "
                 "each subject is tested once)", untested)
    frame = pd.DataFrame(rows_out)
    frame.to_csv(args.out_dir / "calibration.tsv", sep="\t", index=False, float_format="%.4f")
    test_regs = regs[regs.subject.isin([r["subject"] for r in rows_out])]
    summary = {
        "registration_check": {
            "shift_mm": SHIFT_MM,
            "good_flagged": int(sum(
                (row.ncc < f["registration_min"]["brain_only" if row.brain_only else "with_skull"])
                for f in folds for row in test_regs[test_regs.subject.isin(f["test"])].itertuples())),
            "shifted_caught": int(sum(
                (getattr(row, f"ncc_shift{SHIFT_MM:g}mm")
                 < f["registration_min"]["brain_only" if row.brain_only else "with_skull"])
                for f in folds for row in test_regs[test_regs.subject.isin(f["test"])].itertuples())),
            "test_images": int(len(test_regs)),
        },
        "ece_raw": _ece(*pooled["raw"]),
        "ece_chosen": _ece(*pooled["chosen"]),
        "spearman_uncertainty_vs_1_minus_dice": _spearman(np.array(rank_u), np.array(rank_e)),
        "structures_ranked": len(rank_u),
        "folds": folds,
        # for a model trained on every subject: the same choices made on each subject's
        # out-of-fold run (the fold model that did not train on it)
        **({} if untested else {"out_of_fold": {
            "dir": OUT_OF_FOLD, "test": [], "train": sorted(out_of_fold),
            **_choices(out_of_fold, regs, table)}}),
        "bins": {k: [v.tolist() for v in pooled[k]] for k in pooled},
    }
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    _reliability_png(pooled["raw"], pooled["chosen"], args.figure)
    print(frame.to_string(index=False))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("bins",)}, indent=2))
    return 0


def store(args: argparse.Namespace) -> int:
    """Write the temperature chosen for a fold's model (on its training subjects), or for a
    model trained on every subject (on the out-of-fold runs), into that model."""
    from bids_cadiff.inference.checkpoint import store_calibration

    summary = json.loads(args.summary.read_text())
    fold = chosen_for(summary, args.fold)
    if not fold["temperature_kept"]:
        log.info("%s: no temperature was kept (it did not lower the ECE of the runs it was "
                 "fitted on)", args.fold)
        return 0
    calibration = {
        "temperature": round(float(fold["temperature_fitted"]), 4),
        "chosen_on": "negative log-likelihood of the final (refined) probabilities on "
        + (f"every subject's out-of-fold run (the fold model that did not train on it): "
           if args.fold == OUT_OF_FOLD else "the fold's training subjects ")
        + f"{', '.join(fold['train'])} (T1.mgz), 25 temperatures from 0.5 to 4; their ECE "
        f"{fold['train_ece_raw']:.3f} -> {fold['train_ece_fitted']:.3f} (scripts/calibration.py)",
    }
    sha = store_calibration(args.model, args.model, calibration)
    log.info("%s: temperature %.4f stored, new content hash %s", args.model,
             calibration["temperature"], sha)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", type=Path, default=None)
    r.add_argument("--subjects", required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--work", type=Path, default=REPO / "work" / "evaluate")
    s = sub.add_parser("summarise")
    s.add_argument("--fold", nargs=2, action="append", metavar=("DIR", "TEST_SUBJECTS"),
                   required=True)
    s.add_argument("--out-dir", type=Path, required=True)
    s.add_argument("--registrations", type=Path, required=True,
                   help="the table of 'calibration.py registration'")
    s.add_argument("--figure", type=Path, default=REPO / "docs" / "images" / "reliability.png")
    g = sub.add_parser("registration")
    g.add_argument("--subjects", required=True)
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--work", type=Path, default=REPO / "work" / "evaluate")
    t = sub.add_parser("store")
    t.add_argument("--summary", type=Path, required=True)
    t.add_argument("--fold", default="fold1", help="the fold whose model --model is, or "
                   f"{OUT_OF_FOLD!r} for a model trained on every subject")
    t.add_argument("--model", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in ("run", "registration") and not FSTD.is_dir():
        sys.exit(f"calibration: {FSTD} is missing (the project's shared data)")
    return {"run": run, "registration": registration, "summarise": summarise,
            "store": store}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
