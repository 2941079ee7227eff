"""The participant level end to end on phantom heads, with a tiny model and a phantom atlas."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bids_cadiff.cli.run import main
from bids_cadiff.inference.checkpoint import ModelMetadata, save_checkpoint
from bids_cadiff.labels import SYNTHSEG32, LabelTable
from bids_cadiff.models.config import DiffusionConfig, ModelConfig
from bids_cadiff.models.diffusion import CADiff
from tests.registration.conftest import make_phantom

TABLE = LabelTable(SYNTHSEG32.entries[:4])


def _write_t1w(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = CADiff(
        ModelConfig(spatial_dims=3, num_classes=4, channels=(4, 8), time_embed_dim=16),
        DiffusionConfig(sampling_steps=2),
    )
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(
        path, model,
        ModelMetadata(name="tiny", labels=TABLE, normalization={"method": "percentile"},
                      voxel_size=(4.0, 4.0, 4.0), patch_size=(24, 24, 24)),
    )
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bids")
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "phantoms", "BIDSVersion": "1.10.0"})
    )
    atlas_dir = tmp_path_factory.mktemp("atlas")
    data, brain, affine = make_phantom(skull=True)
    nib.save(nib.Nifti1Image(data, affine), atlas_dir / "phantom.nii.gz")
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), atlas_dir / "phantom_brain.nii.gz")
    head, _, aff = make_phantom(skull=True, shift_mm=(3, -4, 2), scale=1.05, intensity_scale=37)
    _write_t1w(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz", head, aff)
    stripped, _, aff = make_phantom(skull=False, shift_mm=(-2, 3, 0), scale=0.95)
    # an anisotropic, LPS-ordered grid: outputs must come back on exactly this grid
    flip = np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff
    _write_t1w(root / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_T1w.nii.gz",
               stripped[::-1, ::-1, :].copy(), flip)
    bad = root / "sub-03" / "anat" / "sub-03_T1w.nii.gz"
    bad.parent.mkdir(parents=True)
    good_bytes = gzip.compress(nib.Nifti1Image(head, aff).to_bytes())
    bad.write_bytes(good_bytes[: len(good_bytes) // 3])  # truncated
    _write_t1w(root / "sub-04" / "anat" / "sub-04_T1w.nii.gz",
               np.full(head.shape, np.nan, np.float32), aff)
    return root, atlas_dir / "phantom.nii.gz"


def _run(dataset, tiny_model, out: Path, *extra: str) -> int:
    bids, atlas = dataset
    return main([
        str(bids), str(out), "participant", "--model", str(tiny_model), "--atlas", str(atlas),
        "-w", str(out.parent / "work"), "--skip-bids-validation", "--steps", "2", *extra,
    ])


@pytest.mark.slow
def test_participant_outputs_resume_and_failures(dataset, tiny_model, tmp_path, caplog):
    out = tmp_path / "out"
    assert _run(dataset, tiny_model, out) == 1  # sub-03 and sub-04 fail, the others finish
    text = caplog.text
    assert "sub-03_T1w.nii.gz" in text and "truncated" in text
    assert "sub-04_T1w.nii.gz" in text and "NaN" in text

    for rel, src in [
        ("sub-01/anat/sub-01_desc-cadiff_dseg.nii.gz", "sub-01/anat/sub-01_T1w.nii.gz"),
        ("sub-02/ses-1/anat/sub-02_ses-1_desc-cadiff_dseg.nii.gz",
         "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz"),
    ]:
        seg, t1 = nib.load(out / rel), nib.load(dataset[0] / src)
        assert seg.shape == t1.shape
        np.testing.assert_allclose(seg.affine, t1.affine, atol=1e-5)
        values = set(np.unique(np.asarray(seg.dataobj)).tolist())
        assert values <= set(TABLE.values)
        sidecar = json.loads((out / rel.replace(".nii.gz", ".json")).read_text())
        assert sidecar["Sources"] == [f"bids:raw:{src}"]
        assert sidecar["Model"]["Name"] == "tiny" and len(sidecar["Model"]["SHA256"]) == 64
        assert sidecar["SamplingSteps"] == 2 and sidecar["RandomSeed"] == 0
        assert sidecar["Registration"]["Value"] > 0.25
        assert (out / rel.replace("_dseg.nii.gz", "_volumes.tsv")).is_file()
    assert (out / "sub-01" / "figures" / "sub-01_desc-cadiff_dseg.png").stat().st_size > 1000
    assert not (out / "sub-03" / "anat").exists() or not list((out / "sub-03").rglob("*dseg*"))
    assert (out / "dataset_description.json").is_file() and (out / "desc-cadiff_dseg.tsv").is_file()
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp")]

    # resume: finished images are skipped; --overwrite recomputes, same seed → same labels
    first = out / "sub-01/anat/sub-01_desc-cadiff_dseg.nii.gz"
    before = (first.stat().st_mtime_ns, np.asarray(nib.load(first).dataobj).copy())
    caplog.clear()
    assert _run(dataset, tiny_model, out, "--participant-label", "01") == 0
    assert "already done" in caplog.text
    assert first.stat().st_mtime_ns == before[0]
    assert _run(dataset, tiny_model, out, "--participant-label", "01", "--overwrite") == 0
    assert first.stat().st_mtime_ns != before[0]
    np.testing.assert_array_equal(np.asarray(nib.load(first).dataobj), before[1])

    # a half-finished output (no sidecar) is not taken as finished
    sidecar = first.with_name(first.name.replace(".nii.gz", ".json"))
    sidecar.unlink()
    caplog.clear()
    assert _run(dataset, tiny_model, out, "--participant-label", "01") == 0
    assert "already done" not in caplog.text and sidecar.is_file()

    # group level over what participant wrote
    assert main([str(dataset[0]), str(out), "group"]) == 0
    table = (out / "group" / "desc-cadiff_volumes.tsv").read_text().splitlines()
    assert table[0].split("\t")[:2] == ["participant_id", "session_id"]
    assert len(table) == 3


def test_model_that_is_not_a_checkpoint_is_a_usage_error(dataset, tmp_path, capsys):
    fake = tmp_path / "model.pt"
    fake.write_text("not a model")
    assert _run(dataset, fake, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("bids_cadiff: error:") and "model.pt" in last
