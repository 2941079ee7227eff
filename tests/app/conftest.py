"""Inputs for the participant runs that kill, race and rerun jobs (issue #15): as cheap as a
real run gets. Skull-stripped 4 mm phantoms (one affine-only registration stage, ~1 s), a tiny
untrained model trained "with affine registration", 2 sampling steps."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

#: Participants of :func:`fast_app_inputs`; odd ones hold image A, even ones image B (so that
#: jobs race on the same registration cache entries).
FAST_SUBJECTS = tuple(f"{i:02d}" for i in range(1, 9))


@pytest.fixture(scope="session")
def fast_app_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"bids": dir, "atlas": atlas T1w, "model": checkpoint}``; participants
    :data:`FAST_SUBJECTS`, one skull-stripped T1w each (``sub-XX/anat/sub-XX_T1w.nii.gz``)."""
    from tests.conftest import save_phantom_atlas, save_tiny_model
    from tests.registration.conftest import make_phantom

    model_path = save_tiny_model(tmp_path_factory.mktemp("fast_model") / "tiny-affine.pt",
                                 inputs={"registration": "affine"})
    atlas_dir = save_phantom_atlas(tmp_path_factory.mktemp("fast_atlas"))

    root = tmp_path_factory.mktemp("fast_bids")
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "phantoms", "BIDSVersion": "1.10.0"}))
    images = [make_phantom(skull=False, shift_mm=(-2, 3, 0), scale=0.95),
              make_phantom(skull=False, shift_mm=(3, -2, 1), scale=1.05, intensity_scale=20)]
    for i, sub in enumerate(FAST_SUBJECTS):
        img, _, aff = images[i % 2]
        path = root / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz"
        path.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(img, aff), path)
    return {"bids": root, "atlas": atlas_dir / "phantom.nii.gz", "model": model_path}


def participant_command(inputs: dict[str, Path], out: Path, work: Path, subject: str,
                        *extra: str) -> list[str]:
    """``bids_cadiff BIDS OUT participant`` for one participant, fastest settings, one thread,
    ``--reproducible`` (bit-identical labels from run to run), no orientation check (its
    own tests run it)."""
    return [
        sys.executable, "-m", "bids_cadiff.cli.run", str(inputs["bids"]), str(out),
        "participant", "--participant-label", subject, "--model", str(inputs["model"]),
        "--atlas", str(inputs["atlas"]), "-w", str(work), "--skip-bids-validation",
        "--steps", "2", "--nprocs", "1", "--omp-nthreads", "1", "--no-reports",
        "--reproducible", "--skip-orientation-check", *extra,
    ]


def run_participant(inputs: dict[str, Path], out: Path, work: Path, subject: str,
                    *extra: str, env: dict[str, str] | None = None,
                    timeout: float = 600) -> subprocess.CompletedProcess:
    """Run :func:`participant_command` to its end (or its death)."""
    return subprocess.run(
        participant_command(inputs, out, work, subject, *extra),
        env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )


def assert_complete(path: Path) -> None:
    """The file parses to its end: no truncated NIfTI, JSON, TSV or PNG."""
    name = path.name
    if name.endswith(".nii.gz"):
        img = nib.load(path)
        assert np.asarray(img.dataobj).shape == img.shape  # reads (and CRC-checks) it all
    elif name.endswith(".json"):
        json.loads(path.read_text())
    elif name.endswith(".tsv"):
        lines = path.read_text().splitlines()
        assert lines and len({len(ln.split("\t")) for ln in lines}) == 1, path
    elif name.endswith(".png"):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[-12:] == struct.pack(">I", 0) + b"IEND" + (
            b"\xaeB`\x82"), path
