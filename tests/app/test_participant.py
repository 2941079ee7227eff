"""The participant level end to end on phantom heads, with a tiny model and a phantom atlas."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_cadiff.cli.run import main
from bids_cadiff.labels import SYNTHSEG32, LabelTable

TABLE = LabelTable(SYNTHSEG32.entries[:4])


@pytest.fixture(scope="module")
def dataset(phantom_app_inputs) -> tuple[Path, Path]:
    return phantom_app_inputs["bids"], phantom_app_inputs["atlas"]


@pytest.fixture(scope="module")
def tiny_model(phantom_app_inputs) -> Path:
    return phantom_app_inputs["model"]


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
        assert sidecar["LabelPrior"] is None  # the tiny model carries none
        assert sidecar["Refinement"]["Settings"]["iterations"] == 5  # --refine auto: em here
        assert sidecar["Refinement"]["Kind"] == "em"
        assert "refinement" in sidecar["StageSeconds"]
        assert sidecar["Registration"]["Value"] > 0.25
        assert (out / rel.replace("_dseg.nii.gz", "_volumes.tsv")).is_file()
    assert (out / "sub-01" / "figures" / "sub-01_desc-cadiff_dseg.png").stat().st_size > 1000
    for kind in ("contours", "uncertainty", "registration"):
        assert (out / "sub-01" / "figures" / f"sub-01_desc-cadiff_{kind}.png").is_file()

    # uncertainty map on the T1w's grid, QC table and QC entry, failure records, reports
    unc = nib.load(out / "sub-01/anat/sub-01_label-uncertainty_desc-cadiff_probseg.nii.gz")
    seg1 = nib.load(out / "sub-01/anat/sub-01_desc-cadiff_dseg.nii.gz")
    assert unc.shape == seg1.shape
    np.testing.assert_allclose(unc.affine, seg1.affine)
    u = np.asarray(unc.dataobj, dtype=np.float32)
    assert 0 <= u.min() and u.max() <= 1 and u[np.asarray(seg1.dataobj) == 0].mean() < u.max()
    unc_sidecar = json.loads(
        (out / "sub-01/anat/sub-01_label-uncertainty_desc-cadiff_probseg.json").read_text())
    assert unc_sidecar["Samples"] == 1 and "probability that the label is wrong" in (
        unc_sidecar["Description"])
    assert not (out / "sub-01/anat/sub-01_desc-cadiff_probseg.nii.gz").exists()
    qc_rows = (out / "sub-01/anat/sub-01_desc-cadiff_qc.tsv").read_text().splitlines()
    assert qc_rows[0].split("\t")[:6] == [
        "index", "name", "abbreviation", "volume_mm3", "volume_soft_mm3", "volume_sd_mm3"]
    assert len(qc_rows) == 1 + len(TABLE.entries) - 1
    side1 = json.loads((out / "sub-01/anat/sub-01_desc-cadiff_dseg.json").read_text())
    assert side1["QC"]["Status"] in ("pass", "fail")
    assert [c["Check"] for c in side1["QC"]["Checks"]] == [
        "orientation", "coverage", "resolution", "missing"]  # no reference: 4 labels
    assert side1["Uncertainty"]["Samples"] == 1 and 0 <= side1["Uncertainty"]["BrainMean"] <= 1
    records = sorted(p.name for p in (out / "logs").glob("*_error.json"))
    assert records == ["sub-03_desc-cadiff_error.json", "sub-04_desc-cadiff_error.json"]
    assert "NaN" in json.loads((out / "logs" / records[1]).read_text())["Error"]
    for sub in ("01", "02", "03", "04"):
        assert (out / f"sub-{sub}.html").is_file()
    assert "NaN" in (out / "sub-04.html").read_text()
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

    # --refine none: the plain argmax of the same probabilities, recorded as such
    assert _run(dataset, tiny_model, out, "--participant-label", "01", "--overwrite",
                "--refine", "none") == 0
    plain_sidecar = json.loads(first.with_name(first.name.replace(".nii.gz", ".json")).read_text())
    assert plain_sidecar["Refinement"] is None and "to_native_grid" in plain_sidecar["StageSeconds"]
    caplog.clear()
    assert _run(dataset, tiny_model, out, "--participant-label", "01") == 0
    assert "made with --refine none" in caplog.text  # kept, but said so
    assert _run(dataset, tiny_model, out, "--participant-label", "01", "--overwrite") == 0

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
    assert table[0].split("\t")[-2:] == ["TotalBrain", "qc"]
    assert all(row.split("\t")[-1].startswith(("pass", "fail (")) for row in table[1:])
    assert len(table) == 3
    assert (out / "group" / "desc-cadiff_report.html").is_file()


@pytest.mark.slow
def test_samples_give_disagreement_uncertainty_spread_and_probabilities(dataset, tiny_model,
                                                                        tmp_path):
    """--samples 3: the uncertainty is the fraction of samples whose labels differ from the
    final labels (zero where all agree); the soft volumes are the sums of the probabilities
    written by --save-probabilities."""
    import torch

    from bids_cadiff.app.participant import segment_t1w
    from bids_cadiff.inference.checkpoint import load_checkpoint
    from bids_cadiff.inference.refine import RefineSettings
    from bids_cadiff.registration.atlas import resolve_atlas

    out = tmp_path / "out"
    assert _run(dataset, tiny_model, out, "--participant-label", "01", "--samples", "3",
                "--save-probabilities", "--no-reports") == 0
    anat = out / "sub-01" / "anat"
    labels = np.asarray(nib.load(anat / "sub-01_desc-cadiff_dseg.nii.gz").dataobj)
    unc = np.asarray(nib.load(
        anat / "sub-01_label-uncertainty_desc-cadiff_probseg.nii.gz").dataobj, dtype=np.float64)
    probs = nib.load(anat / "sub-01_desc-cadiff_probseg.nii.gz")
    assert probs.shape == (*labels.shape, len(TABLE.entries))
    assert not (out / "sub-01.html").exists()  # --no-reports

    # the same samples, one at a time through the Python API
    t1 = nib.load(dataset[0] / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    loaded = load_checkpoint(tiny_model)
    common = dict(atlas=resolve_atlas(dataset[1]), steps=2, device=torch.device("cpu"),
                  cache_dir=out.parent / "work" / "registration", refine=RefineSettings())
    singles = [segment_t1w(t1, loaded, seed=k, **common).labels for k in range(3)]
    disagree = np.mean([s != labels for s in singles], axis=0)
    np.testing.assert_allclose(unc, disagree, atol=1 / 255 / 2)
    assert (unc[np.all([s == labels for s in singles], axis=0)] == 0).all()
    assert len(np.unique(disagree)) > 1  # the samples do disagree somewhere

    qc = {}
    rows = (anat / "sub-01_desc-cadiff_qc.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    for line in rows[1:]:
        row = dict(zip(header, line.split("\t")))
        qc[int(row["index"])] = row
    voxel = float(np.prod(t1.header.get_zooms()[:3]))
    p = np.asarray(probs.dataobj, dtype=np.float64)
    for channel, entry in enumerate(TABLE.entries[1:], start=1):
        soft = float(qc[entry.value]["volume_soft_mm3"])
        assert soft == pytest.approx(p[..., channel].sum() * voxel, rel=0.02, abs=5 * voxel)
        sample_volumes = [float((s == entry.value).sum()) * voxel for s in singles]
        assert float(qc[entry.value]["volume_sd_mm3"]) == pytest.approx(
            np.std(sample_volumes, ddof=1), rel=1e-4, abs=1e-3)
    side = json.loads((anat / "sub-01_desc-cadiff_dseg.json").read_text())
    assert side["Uncertainty"]["Samples"] == 3 and "fraction of 3" in side["Uncertainty"]["Measure"]


def test_model_that_is_not_a_checkpoint_is_a_usage_error(dataset, tmp_path, capsys):
    fake = tmp_path / "model.pt"
    fake.write_text("not a model")
    assert _run(dataset, fake, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("bids_cadiff: error:") and "model.pt" in last


@pytest.mark.slow
def test_app_runs_with_a_checkpoint_from_cadiff_train(phantom_app_inputs, tmp_path):
    """cadiff-train on a labelled BIDS dataset of phantom heads, then the app with ``--model``."""
    from bids_cadiff.cli.train import main as train_main
    from tests.registration.conftest import make_phantom
    from tests.training.synthetic import TINY_ARGS

    bids, labels = tmp_path / "bids", tmp_path / "labels"
    bids.mkdir()
    labels.mkdir()
    (bids / "dataset_description.json").write_text(
        json.dumps({"Name": "phantoms", "BIDSVersion": "1.10.0"}))
    (labels / "dataset_description.json").write_text(json.dumps(
        {"Name": "phantom labels", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
         "GeneratedBy": [{"Name": "test"}]}))
    for sub, shift in (("01", (2, -3, 1)), ("02", (-3, 2, 0))):
        head, brain, aff = make_phantom(skull=True, shift_mm=shift, intensity_scale=9)
        values = np.where(brain, 2, 0).astype(np.int16)  # "white matter"...
        values[brain & (head < 25 * 9)] = 4  # ...and "lateral ventricles"
        for root, name, data in ((bids, "T1w", head), (labels, "desc-manual_dseg", values)):
            (root / f"sub-{sub}" / "anat").mkdir(parents=True)
            nib.save(nib.Nifti1Image(data, aff), root / f"sub-{sub}/anat/sub-{sub}_{name}.nii.gz")
    atlas = phantom_app_inputs["atlas"]
    model_dir = tmp_path / "model"
    # SyN registration in training: the checkpoint records it and the app does the same
    # (TINY_ARGS' --registration none would be refused by the app)
    assert train_main([str(bids), str(labels), str(model_dir), "--atlas", str(atlas),
                       "--iterations", "2", "--val-every", "0", *TINY_ARGS,
                       "--labels", "synthseg32", "--registration", "syn"]) == 0
    from bids_cadiff.inference.checkpoint import load_checkpoint

    inputs = dict(load_checkpoint(model_dir / "model.pt").metadata.inputs)
    assert inputs == {"registration": "syn", "slice_axis": 2}
    out = tmp_path / "out"
    assert main([str(bids), str(out), "participant", "--model", str(model_dir / "model.pt"),
                 "--atlas", str(atlas), "-w", str(tmp_path / "work"), "--skip-bids-validation",
                 "--participant-label", "01"]) == 0
    seg = nib.load(out / "sub-01" / "anat" / "sub-01_desc-cadiff_dseg.nii.gz")
    t1 = nib.load(bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    assert seg.shape == t1.shape
    sidecar = json.loads((out / "sub-01/anat/sub-01_desc-cadiff_dseg.json").read_text())
    assert sidecar["Model"]["SHA256"] and sidecar["SamplingSteps"] == 5
    assert sidecar["Registration"]["Transform"] == "SyN"


def test_images_are_registered_as_the_checkpoint_says(phantom_app_inputs, monkeypatch):
    """inputs.registration of the checkpoint drives the app's registration; a model trained on
    identity fields ('none') cannot be reproduced by the app and is refused by name."""
    import bids_cadiff.app.participant as participant
    from bids_cadiff.errors import UsageError
    from bids_cadiff.registration.atlas import resolve_atlas
    from tests.registration.conftest import make_phantom

    seen = []

    class Stop(Exception):
        pass

    def fake_register(grid, atlas, **kwargs):
        seen.append(kwargs["type_of_transform"])
        raise Stop

    monkeypatch.setattr(participant, "register_atlas", fake_register)
    head, _, aff = make_phantom(skull=True)
    t1 = nib.Nifti1Image(head, aff)
    atlas = resolve_atlas(phantom_app_inputs["atlas"])
    common = dict(atlas=atlas, voxel_size=(4.0, 4.0, 4.0),
                  normalization={"method": "percentile"}, cache_dir=None)
    for mode, transform in (("syn", "SyN"), ("affine", "Affine")):
        with pytest.raises(Stop):
            participant.prepare_image(t1, registration=mode, **common)
        assert seen[-1] == transform
    with pytest.raises(UsageError, match="registration 'none'"):
        participant.prepare_image(t1, registration="none", **common)

    # prepare_for_model takes the mode (and grid) from the checkpoint's metadata
    from bids_cadiff.inference.checkpoint import ModelMetadata
    from bids_cadiff.labels import SYNTHSEG32

    def metadata(mode: str) -> ModelMetadata:
        return ModelMetadata(name="t", labels=SYNTHSEG32,
                             normalization={"method": "percentile"}, voxel_size=(4.0, 4.0, 4.0),
                             patch_size=(8, 8, 8), inputs={"registration": mode})

    with pytest.raises(Stop):
        participant.prepare_for_model(t1, metadata("affine"), atlas=atlas, cache_dir=None)
    assert seen[-1] == "Affine"
    with pytest.raises(UsageError, match="registration 'none'"):
        participant.prepare_for_model(t1, metadata("none"), atlas=atlas, cache_dir=None)


def test_slices_are_taken_along_the_checkpoints_axis(phantom_app_inputs, monkeypatch):
    import dataclasses

    import torch

    import bids_cadiff.app.participant as participant
    from bids_cadiff.inference.checkpoint import load_checkpoint

    loaded = load_checkpoint(phantom_app_inputs["model"])
    loaded = dataclasses.replace(
        loaded, metadata=dataclasses.replace(loaded.metadata,
                                             inputs={"registration": "syn", "slice_axis": 1}))
    seen = {}

    def fake_predict(model, image, distance, **kwargs):
        seen.update(kwargs)
        return torch.zeros(4, *image.shape)

    monkeypatch.setattr(participant, "predict_volume", fake_predict)
    distance = np.zeros((3, 10, 12, 14), np.float32)
    distance[:, 3:7, 3:9, 4:10] = 0.5
    prepared = participant.PreparedImage(np.zeros((10, 12, 14), np.float32), distance,
                                         np.eye(4), None)  # type: ignore[arg-type]
    participant.segment_prepared(loaded, prepared, steps=1, seed=0, device=torch.device("cpu"))
    assert seen["slice_axis"] == 1


@pytest.mark.slow
def test_a_model_with_a_refiner_uses_it_by_default(dataset, tiny_model, tmp_path):
    """``--refine auto`` takes the model's 1 mm refiner (then EM) and says so in the sidecar (that an
    untrained refiner keeps the coarse labels is tests/inference/test_refiner.py's: this
    untrained tiny model's probabilities are too flat for the comparison); asking a model
    without one for ``--refine refiner`` stops before any image."""
    import torch

    from bids_cadiff.inference.checkpoint import store_calibration, store_refiner
    from bids_cadiff.models.refiner import Refiner, RefinerConfig

    torch.manual_seed(0)
    calibrated = tmp_path / "tiny-calibrated.pt"
    store_calibration(tiny_model, calibrated, {"temperature": 1.7})
    refined_model = tmp_path / "tiny-refiner.pt"
    store_refiner(calibrated, refined_model,
                  Refiner(RefinerConfig(num_classes=4, channels=(4, 8, 8), squeeze=2, voxel_size=2.0)),
                  {"subjects": ["phantom"]})
    out = tmp_path / "out"
    assert _run(dataset, refined_model, out, "--participant-label", "01", "--no-reports") == 0
    anat = out / "sub-01" / "anat"
    sidecar = json.loads((anat / "sub-01_desc-cadiff_dseg.json").read_text())
    assert sidecar["Refinement"]["Kind"] == "refiner+em"
    assert sidecar["Refinement"]["Refiner"] == {"VoxelSizeMM": 2.0, "Channels": [4, 8, 8]}
    assert sidecar["Refinement"]["Settings"]["iterations"] == 5
    assert "refinement" in sidecar["StageSeconds"]
    # the model's temperature (1.7) was fitted without the refiner: not applied to its output
    assert sidecar["Uncertainty"]["Temperature"] == 1.0
    refined = nib.load(anat / "sub-01_desc-cadiff_dseg.nii.gz")
    t1 = nib.load(dataset[0] / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    assert refined.shape == t1.shape and np.allclose(refined.affine, t1.affine, atol=1e-5)
    assert set(np.unique(np.asarray(refined.dataobj)).tolist()) <= set(TABLE.values)

    alone = tmp_path / "alone"
    assert _run(dataset, refined_model, alone, "--participant-label", "01", "--no-reports",
                "--refine", "refiner") == 0
    sidecar = json.loads((alone / "sub-01/anat/sub-01_desc-cadiff_dseg.json").read_text())
    assert sidecar["Refinement"]["Kind"] == "refiner" and "Settings" not in sidecar["Refinement"]

    assert _run(dataset, tiny_model, tmp_path / "none", "--refine", "refiner") != 0
    assert not (tmp_path / "none" / "sub-01").exists()
