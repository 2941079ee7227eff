#!/usr/bin/env python
"""Lay out ../shared/data as `cadiff-train` inputs: a BIDS dataset, its labels, label maps.

    python scripts/shared_data_to_bids.py OUT [--shared ../shared/data]

Writes (idempotent; finished files are kept):

* ``OUT/bids/sub-0N/anat/sub-0N_T1w.nii.gz``: each fstd subject's ``T1.mgz`` (skull on);
* ``OUT/labels/sub-0N/anat/sub-0N_desc-aseg_dseg.nii.gz`` (its ``aseg.mgz``) and
  ``sub-0N_desc-brain_mask.nii.gz`` (its ``brainmask.mgz`` > 0), with ``dataset_description.json``;
* ``OUT/label_maps/``: links to the SynthSeg label maps (``training_seg_*`` and the extra
  ``fb_*``/``old_*``, whose hemispheres both carry left codes: the recipe's
  ``split_midline_maps`` names them).

This only converts files; training is ``cadiff-train OUT/bids OUT/labels MODEL_DIR --config
configs/default_model.toml --synth-label-maps OUT/label_maps`` (see ``make default-model``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_cadiff.io.atomic import atomic_path

log = logging.getLogger("shared_data_to_bids")
REPO = Path(__file__).resolve().parents[1]


def _write(img: nib.Nifti1Image, dest: Path) -> None:
    if dest.is_file():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        nib.save(img, tmp)


def _nifti(path: Path, data: np.ndarray | None = None) -> nib.Nifti1Image:
    img = nib.load(path)
    array = np.asanyarray(img.dataobj) if data is None else data
    return nib.Nifti1Image(array, img.affine)


def _description(folder: Path, name: str, derivative: bool) -> None:
    desc = {"Name": name, "BIDSVersion": "1.9.0",
            "DatasetType": "derivative" if derivative else "raw"}
    if derivative:
        desc["GeneratedBy"] = [{"Name": "FreeSurfer", "Version": "6.0"}]
    path = folder / "dataset_description.json"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(desc, indent=2) + "\n")


def convert(shared: Path, out: Path) -> None:
    subjects = sorted(p for p in (shared / "fstd").glob("sub-*") if (p / "aseg.mgz").is_file()
                      and (p / "T1.mgz").is_file())
    if not subjects:
        raise SystemExit(f"no fstd subject with T1.mgz and aseg.mgz in {shared / 'fstd'}")
    _description(out / "bids", "fstd (FreeSurfer-Training-Data)", derivative=False)
    _description(out / "labels", "fstd aseg", derivative=True)
    for sub in subjects:
        anat = f"{sub.name}/anat/{sub.name}"
        _write(_nifti(sub / "T1.mgz"), out / "bids" / f"{anat}_T1w.nii.gz")
        aseg = nib.load(sub / "aseg.mgz")
        _write(_nifti(sub / "aseg.mgz", np.asanyarray(aseg.dataobj).astype(np.int16)),
               out / "labels" / f"{anat}_desc-aseg_dseg.nii.gz")
        mask = np.asanyarray(nib.load(sub / "brainmask.mgz").dataobj) > 0
        _write(_nifti(sub / "brainmask.mgz", mask.astype(np.uint8)),
               out / "labels" / f"{anat}_desc-brain_mask.nii.gz")
        log.info("%s converted", sub.name)
    maps = out / "label_maps"
    maps.mkdir(parents=True, exist_ok=True)
    for folder in ("synthseg_label_maps", "synthseg_label_maps_extra"):
        for src in sorted((shared / folder).glob("*.nii.gz")):
            link = maps / src.name
            if not link.exists():
                link.symlink_to(src.resolve())
    log.info("%d subjects, %d label maps in %s", len(subjects),
             len(list(maps.glob("*.nii.gz"))), out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    convert(args.shared, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
