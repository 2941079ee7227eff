#!/usr/bin/env python
"""Build the QC reference the app ships (bids_cadiff/data/qc_reference.json).

    python scripts/build_qc_reference.py maps --out work/qc/maps.tsv
    python scripts/build_qc_reference.py build --maps work/qc/maps.tsv \\
        --calibration artifacts/calibration/summary.json --fold fold1 \\
        --runs work/calibration/fold1 --out bids_cadiff/data/qc_reference.json

``maps``: the structures' volume fractions (of total brain volume, CSF and ventricles left
out) and the fraction of each outside its largest connected piece, on the 59 SynthSeg
training label maps of the shared data (``synthseg_label_maps``, and
``synthseg_label_maps_extra`` split at the mid-sagittal plane). No fstd subject, hence no
cross-validation test subject, is used.

``build``: the reference (:class:`bids_cadiff.qc.flags.QCReference`):

* volume: for each structure, ``exp(mean ± 4 SD)`` of the log volume fraction over the maps,
  widened to hold the shipped model's own volume fractions on its training subjects within 10 %
  (``--runs``: its calibration runs). CSF is not checked: the SynthSeg maps label all
  extra-cerebral CSF, aseg only a little;
* missing: the structures the shipped model labels on all its training subjects (a structure
  it never produces there cannot be checked, and is named in ``ChosenOn``);
* pieces: the largest fraction outside the largest piece over the maps, plus 0.15 (the app's
  labels are computed at 1 mm from 2 mm probabilities and carry more small islands);
* registration and uncertainty: the thresholds that ``scripts/calibration.py summarise``
  chose on the training subjects of the shipped model's fold (``--fold``): the NCC halfway
  between the worst training registration and the best one moved by 8 mm (per kind of image:
  with skull, brain only), and the training images' largest mean brain uncertainty plus 3 SD
  (at the temperature chosen there). For a model trained on every subject (``--fold
  out-of-fold``), the same rules on every subject's registrations and on every subject's
  out-of-fold run (the fold model that did not train on it); ``--runs`` then holds the shipped
  model's own runs on all the subjects (its training subjects), for the volume and missing
  checks.

Last, it applies the reference to the calibration runs of ``--runs`` and prints every flag
per subject, training and test subjects apart.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
log = logging.getLogger("build_qc_reference")
#: Width of the volume range, in standard deviations of the log volume fraction.
VOLUME_SD = 4.0
#: Added to the maps' largest fraction outside the largest piece.
PIECES_MARGIN = 0.15
#: Margin around the shipped model's own volume fractions on its training subjects.
TRAINED_MARGIN = 0.10
#: Not checked for volume (see the module docstring).
UNCHECKED_VOLUME = ("CSF",)


def maps(args: argparse.Namespace) -> int:
    import nibabel as nib
    import pandas as pd

    from bids_cadiff.labels import SYNTHSEG32, aseg_to_table_values, split_left_codes_at_midline
    from bids_cadiff.qc.structures import structure_rows

    paths = sorted((SHARED / "synthseg_label_maps").glob("*.nii.gz"))
    extra = sorted((SHARED / "synthseg_label_maps_extra").glob("*.nii.gz"))
    if not paths or not extra:
        sys.exit(f"build_qc_reference: SynthSeg label maps missing under {SHARED}")
    rows = []
    for path in paths + extra:
        img = nib.load(path)
        values = np.asarray(img.dataobj).astype(np.int32)
        if path in extra:
            values = split_left_codes_at_midline(values, img.affine)
        labels = aseg_to_table_values(values, img.affine, SYNTHSEG32)
        zooms = np.abs(nib.affines.voxel_sizes(img.affine))
        for row in structure_rows(labels, np.zeros(labels.shape, np.float32), SYNTHSEG32,
                                  float(np.prod(zooms))):
            rows.append({"map": path.name.split(".")[0], "structure": row["abbreviation"],
                         "volume_fraction": row["volume_fraction"],
                         "outside_largest_piece": row["outside_largest_piece"]})
        log.info("%s done", path.name)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out, sep="\t", index=False, float_format="%.6g")
    return 0


def build(args: argparse.Namespace) -> int:
    import pandas as pd
    from calibration import OUT_OF_FOLD, chosen_for  # scripts/ is on the path

    from bids_cadiff.labels import SYNTHSEG32
    from bids_cadiff.qc.flags import QCReference

    frame = pd.read_csv(args.maps, sep="\t")
    summary = json.loads(args.calibration.read_text())
    fold = chosen_for(summary, args.fold)
    out_of_fold = args.fold == OUT_OF_FOLD
    made = set()
    for path in args.runs.glob("sub-*.npz"):
        with np.load(path) as run:
            made.add(str(run["model_sha256"]))
    if len(made) != 1:
        raise SystemExit(f"{args.runs}: the runs must be one model's (the shipped one), found "
                         f"{len(made)} model hashes")
    structures = [e.abbreviation for e in SYNTHSEG32.entries[1:]]
    volume, pieces = {}, {}
    for abbrev in structures:
        sub = frame[frame.structure == abbrev]
        if sub.empty or (sub.volume_fraction <= 0).any():
            raise SystemExit(f"{abbrev}: absent from some SynthSeg map")
        pieces[abbrev] = round(float(sub.outside_largest_piece.max()) + PIECES_MARGIN, 4)
        if abbrev in UNCHECKED_VOLUME:
            continue
        logs = np.log(sub.volume_fraction.to_numpy())
        lo, hi = logs.mean() - VOLUME_SD * logs.std(ddof=1), logs.mean() + VOLUME_SD * logs.std(ddof=1)
        volume[abbrev] = (round(float(np.exp(lo)), 7), round(float(np.exp(hi)), 7))
    n_maps = frame["map"].nunique()
    train = ", ".join(fold["train"])
    temperature = fold["temperature_fitted"] if fold["temperature_kept"] else 1.0
    # the shipped model's own labels on its fold's training subjects
    trained = [app_rows(args.runs / f"{s}.npz", temperature)[0] for s in fold["train"]]
    expected = [a for a in structures
                if all(r["volume_mm3"] > 0 for rows in trained for r in rows
                       if r["abbreviation"] == a)]
    for rows in trained:
        for r in rows:
            bounds = volume.get(r["abbreviation"])
            if bounds is None or r["volume_fraction"] is None or r["volume_mm3"] <= 0:
                continue
            volume[r["abbreviation"]] = (
                min(bounds[0], round(r["volume_fraction"] / (1 + TRAINED_MARGIN), 7)),
                max(bounds[1], round(r["volume_fraction"] * (1 + TRAINED_MARGIN), 7)))
    reference = QCReference(
        registration_min={k: round(v, 4) for k, v in fold["registration_min"].items()},
        uncertainty_max=round(fold["uncertainty_max"], 4),
        volume_fraction=volume,
        pieces_max=pieces,
        structures=expected,
        table=structures,
        chosen_on={
            "missing": "every structure the shipped model labels on all its "
            + ("" if out_of_fold else "fold's ")
            + f"training subjects ({train}); left out: "
            f"{', '.join(sorted(set(structures) - set(expected))) or 'none'}",
            "registration": "halfway between the lowest NCC of a registration and the "
            "highest NCC of a registration moved by 8 mm, over the "
            + ("subjects " if out_of_fold else "training subjects ")
            + f"{train} (T1.mgz for images with skull, brainmask.mgz for brain-only ones; "
            "scripts/calibration.py registration)",
            "uncertainty": "maximum mean brain uncertainty plus 3 SD over "
            + (f"every subject's out-of-fold run ({train}; each by the cross-validation fold "
               "model that did not train on it)" if out_of_fold
               else f"the same subjects ({train})"),
            "volume": f"exp(mean +/- {VOLUME_SD:g} SD) of the log volume fraction over {n_maps} "
            "SynthSeg training label maps (no cross-validation subject), widened to hold the "
            f"shipped model's own volume fractions on its training subjects ({train}) within "
            f"{TRAINED_MARGIN:.0%}; CSF not checked",
            "pieces": f"largest fraction outside the largest piece over the same {n_maps} maps, "
            f"plus {PIECES_MARGIN:g}",
        },
    )
    args.out.write_text(json.dumps(reference.to_json(), indent=1) + "\n")
    log.info("wrote %s", args.out)
    check(reference, args.runs, fold["train"], temperature)
    return 0


def app_rows(path: Path, temperature: float) -> tuple[list[dict], float, float, bool]:
    """The QC rows the app computes for one calibration run (``scripts/calibration.py run``),
    at ``temperature``; also its mean brain uncertainty, registration NCC and kind."""
    from calibration import app_rows as rows_of, load_run  # scripts/ is on the path

    from bids_cadiff.labels import SYNTHSEG32

    item = load_run(path)
    rows, _, brain_unc = rows_of(item, temperature, SYNTHSEG32)
    return rows, brain_unc, float(item["registration_ncc"]), bool(item["brain_only"])


def check(reference, runs: Path, train: list[str], temperature: float) -> None:  # noqa: ANN001
    """Print the flags the reference raises on the shipped model's calibration runs."""
    from bids_cadiff.qc.flags import qc_flags

    for path in sorted(runs.glob("sub-*.npz")):
        rows, brain_unc, ncc, brain_only = app_rows(path, temperature)
        qc = qc_flags(rows, registration_ncc=ncc, brain_only=brain_only,
                      brain_uncertainty=brain_unc, reference=reference)
        role = "training" if path.stem in train else "test"
        print(f"{path.stem} ({role}): {qc['Status']}", "; ".join(
            f"{f['Check']} {f['Structure'] or ''} {f['Value']} ({f['Threshold']})"
            for f in qc["Flags"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("maps")
    m.add_argument("--out", type=Path, required=True)
    b = sub.add_parser("build")
    b.add_argument("--maps", type=Path, required=True)
    b.add_argument("--calibration", type=Path, required=True)
    b.add_argument("--fold", default="fold1", help="the shipped model's fold, or 'out-of-fold' "
                   "for a model trained on every subject (thresholds chosen on every subject's "
                   "out-of-fold run; --runs then holds that model's own runs)")
    b.add_argument("--runs", type=Path, required=True,
                   help="the shipped model's calibration runs (scripts/calibration.py run)")
    b.add_argument("--out", type=Path, default=REPO / "bids_cadiff" / "data" / "qc_reference.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return maps(args) if args.command == "maps" else build(args)


if __name__ == "__main__":
    sys.exit(main())
