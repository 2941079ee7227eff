#!/usr/bin/env python
"""Build a one-subject BIDS dataset for the demo from a T1w that is available offline.

Uses ``../shared/data/raw_t1/chris_t1.nii.gz`` (a raw scanner T1w with skull) when the project's
shared data sits beside the repository, else Debian's Colin27 (``mricron-data``), else the MNI152
template in nilearn's wheel.

    python scripts/make_demo_dataset.py OUT_DIR [--t1w PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = (
    REPO.parent / "shared" / "data" / "raw_t1" / "chris_t1.nii.gz",
    Path("/usr/share/mricron/templates/ch2.nii.gz"),
)

log = logging.getLogger("make_demo_dataset")


def find_t1w() -> Path:
    for path in CANDIDATES:
        if path.is_file():
            return path
    try:
        from nilearn import datasets

        tmp = Path(__import__("tempfile").mkdtemp()) / "mni152.nii.gz"
        datasets.load_mni152_template(resolution=1).to_filename(tmp)
        return tmp
    except ImportError:
        sys.exit(
            "make_demo_dataset: no T1w found offline: install mricron-data "
            "(apt-get install mricron-data) or pass --t1w PATH"
        )


def build(out: Path, t1w: Path) -> None:
    anat = out / "sub-demo" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    dst = anat / "sub-demo_T1w.nii.gz"
    if not dst.exists():
        if t1w.name.endswith(".nii.gz"):
            shutil.copyfile(t1w, dst)
        else:
            import nibabel as nib

            nib.save(nib.load(t1w), dst)
    (out / "dataset_description.json").write_text(
        json.dumps(
            {
                "Name": "bids_cadiff demo",
                "BIDSVersion": "1.10.0",
                "DatasetType": "raw",
                "License": "see the source of the T1w",
                "GeneratedBy": [{"Name": "bids_cadiff make_demo_dataset", "Description": str(t1w)}],
            },
            indent=2,
        )
        + "\n"
    )
    (out / "participants.tsv").write_text("participant_id\nsub-demo\n")
    (out / "README").write_text(f"Demo dataset for bids_cadiff, one T1w copied from {t1w}.\n")
    (anat / "sub-demo_T1w.json").write_text(json.dumps({"Source": t1w.name}) + "\n")
    log.info("demo BIDS dataset in %s (T1w from %s)", out, t1w)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--t1w", type=Path, help="use this T1w instead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t1w = args.t1w or find_t1w()
    if not t1w.is_file():
        parser.error(f"--t1w {t1w}: file not found")
    build(args.out_dir, t1w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
