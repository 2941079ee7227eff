import zipfile

import pytest
import torch

from bids_cadiff.errors import CheckpointError
from bids_cadiff.inference.checkpoint import (
    ModelMetadata,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from bids_cadiff.labels import SYNTHSEG32, LabelTable
from bids_cadiff.models.config import DiffusionConfig, ModelConfig
from bids_cadiff.models.diffusion import CADiff

TABLE = LabelTable(SYNTHSEG32.entries[:3])


def _model() -> CADiff:
    torch.manual_seed(0)
    return CADiff(
        ModelConfig(spatial_dims=3, num_classes=3, channels=(4, 8), time_embed_dim=16),
        DiffusionConfig(sampling_steps=3, similarity="dice"),
    )


def _meta() -> ModelMetadata:
    return ModelMetadata(
        name="tiny",
        labels=TABLE,
        normalization={"method": "percentile", "lower": 0.5, "upper": 99.5},
        voxel_size=(2.0, 2.0, 2.0),
        patch_size=(16, 16, 16),
        atlas={"name": "Colin27"},
        training={"iterations": 3, "data": ["a", "b"]},
    )


def test_round_trip_is_exact(tmp_path):
    model = _model()
    path = tmp_path / "m.pt"
    digest = save_checkpoint(path, model, _meta())
    loaded = load_checkpoint(path)
    assert loaded.metadata.sha256 == digest
    assert loaded.model.model_config == model.model_config
    assert loaded.model.diffusion_config == model.diffusion_config
    assert loaded.metadata.labels == TABLE
    assert loaded.metadata.voxel_size == (2.0, 2.0, 2.0)
    assert loaded.metadata.patch_size == (16, 16, 16)
    assert loaded.metadata.training["iterations"] == 3
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert not loaded.model.training
    assert list(tmp_path.iterdir()) == [path]  # no temp file left


def test_half_precision_storage(tmp_path):
    model = _model()
    full, half = tmp_path / "full.pt", tmp_path / "half.pt"
    save_checkpoint(full, model, _meta())
    save_checkpoint(half, model, _meta(), half=True)
    assert half.stat().st_size < 0.7 * full.stat().st_size
    loaded = load_checkpoint(half).model
    for k, v in model.state_dict().items():
        w = loaded.state_dict()[k]
        assert w.dtype == v.dtype
        torch.testing.assert_close(w, v.half().to(v.dtype) if v.is_floating_point() else v)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "x.pt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match=r"x\.pt.*not a bids_cadiff checkpoint"):
        load_checkpoint(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, _model(), _meta())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"m\.pt"):
        load_checkpoint(path)


def test_tampered_weights_fail_hash(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, _model(), _meta())
    payload = torch.load(path, weights_only=True)
    key = next(iter(payload["state_dict"]))
    payload["state_dict"][key] = payload["state_dict"][key] + 1
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="hash mismatch"):
        load_checkpoint(path)


def test_other_torch_file_is_rejected(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(_model().state_dict(), path)
    with pytest.raises(CheckpointError, match="not a bids_cadiff checkpoint"):
        read_checkpoint(path)


def test_pickled_code_is_not_executed(tmp_path):
    path = tmp_path / "evil.pt"

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))

    torch.save({"format": "bids_cadiff-checkpoint", "x": Evil()}, path)
    assert zipfile.is_zipfile(path)
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_checkpoint(path)


def test_mismatched_weights(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, _model(), _meta())
    payload = torch.load(path, weights_only=True)
    payload["model_config"]["channels"] = [4, 16]
    from bids_cadiff.inference.checkpoint import _content_hash

    payload["sha256"] = _content_hash(payload)
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(path)


def test_label_prior_travels_in_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = CADiff(
        ModelConfig(spatial_dims=3, num_classes=3, channels=(4, 8), time_embed_dim=16,
                    label_prior_bins=6),
        DiffusionConfig(sampling_steps=2),
    )
    probs = torch.softmax(torch.randn(3, 6, 6, 6), dim=0)
    model.set_label_prior(probs)
    path = tmp_path / "prior.pt"
    save_checkpoint(path, model, _meta(), half=True)
    loaded = load_checkpoint(path)
    assert loaded.model.model_config.label_prior_bins == 6
    # half precision storage: the log-probabilities to about 3 significant digits
    torch.testing.assert_close(loaded.model.label_prior, torch.log(probs), atol=1e-2, rtol=1e-3)
    image, field = torch.rand(1, 1, 8, 8, 8), torch.rand(1, 3, 8, 8, 8)
    a = model.eval().sample(image, field, generator=torch.Generator().manual_seed(1))
    b = loaded.model.sample(image, field, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, atol=2e-2, rtol=0)


def test_inputs_travel_in_the_checkpoint(tmp_path):
    import dataclasses

    path = tmp_path / "m.pt"
    meta = dataclasses.replace(_meta(), inputs={"registration": "affine", "slice_axis": 1})
    save_checkpoint(path, _model(), meta)
    assert read_checkpoint(path)["inputs"] == {"registration": "affine", "slice_axis": 1}
    assert dict(load_checkpoint(path).metadata.inputs) == {"registration": "affine", "slice_axis": 1}


def test_checkpoint_without_inputs_reads_as_syn_axial(tmp_path):
    # checkpoints written before the key existed (the bundled model among them) were all SyN
    path = tmp_path / "old.pt"
    save_checkpoint(path, _model(), _meta())
    payload = torch.load(path, weights_only=True)
    del payload["inputs"]
    from bids_cadiff.inference.checkpoint import _content_hash

    payload["sha256"] = _content_hash(payload)
    torch.save(payload, path)
    assert dict(load_checkpoint(path).metadata.inputs) == {"registration": "syn", "slice_axis": 2}


@pytest.mark.parametrize("inputs", [{"registration": "rigid"}, {"slice_axis": 3}, {"axis": 0}])
def test_invalid_inputs_are_refused(tmp_path, inputs):
    import dataclasses

    with pytest.raises(ValueError, match="inputs|unknown"):
        save_checkpoint(tmp_path / "m.pt", _model(), dataclasses.replace(_meta(), inputs=inputs))
    # a file holding such a value (written by hand) is a CheckpointError naming the file
    path = tmp_path / "ok.pt"
    save_checkpoint(path, _model(), _meta())
    payload = torch.load(path, weights_only=True)
    payload["inputs"] = {**payload["inputs"], **inputs}
    from bids_cadiff.inference.checkpoint import _content_hash

    payload["sha256"] = _content_hash(payload)
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="ok.pt"):
        load_checkpoint(path)


def test_calibration_is_stored_and_travels_with_a_new_hash(tmp_path):
    import dataclasses

    from bids_cadiff.inference.checkpoint import store_calibration

    path = tmp_path / "m.pt"
    plain = save_checkpoint(path, _model(), _meta())
    assert load_checkpoint(path).metadata.temperature == 1.0
    assert "calibration" not in read_checkpoint(path)  # uncalibrated files keep their hashes
    calibrated = tmp_path / "c.pt"
    digest = store_calibration(path, calibrated, {"temperature": 1.7, "chosen_on": "folds"})
    loaded = load_checkpoint(calibrated)
    assert digest != plain and loaded.metadata.sha256 == digest
    assert loaded.metadata.temperature == 1.7
    assert loaded.metadata.calibration["chosen_on"] == "folds"
    for (k, a), (_, b) in zip(load_checkpoint(path).model.state_dict().items(),
                              loaded.model.state_dict().items()):
        assert torch.equal(a, b), k
    # save_checkpoint keeps it too
    again = tmp_path / "again.pt"
    save_checkpoint(again, loaded.model, dataclasses.replace(_meta(), calibration={"temperature": 2.0}))
    assert load_checkpoint(again).metadata.temperature == 2.0
    with pytest.raises(ValueError, match="temperature"):
        store_calibration(path, tmp_path / "bad.pt", {"temperature": 0})
    with pytest.raises(ValueError, match="temperature"):
        dataclasses.replace(_meta(), calibration={"temperature": -1.0})


def test_a_refiner_travels_in_the_checkpoint_and_in_its_hash(tmp_path):
    from bids_cadiff.inference.checkpoint import store_refiner
    from bids_cadiff.models.refiner import Refiner, RefinerConfig

    path = tmp_path / "m.pt"
    plain = save_checkpoint(path, _model(), _meta())
    assert load_checkpoint(path).refiner is None
    torch.manual_seed(1)
    refiner = Refiner(RefinerConfig(num_classes=3, channels=(4, 8, 8), squeeze=2))
    torch.nn.init.normal_(refiner.head.weight)
    both = tmp_path / "r.pt"
    digest = store_refiner(path, both, refiner, {"subjects": ["sub-01"], "iteration": 5})
    loaded = load_checkpoint(both)
    assert digest != plain and loaded.metadata.sha256 == digest
    assert loaded.refiner is not None and loaded.refiner.config == refiner.config
    for (k, a), (_, b) in zip(refiner.state_dict().items(), loaded.refiner.state_dict().items()):
        assert torch.equal(a, b), k
    assert read_checkpoint(both)["refiner"]["subjects"] == ["sub-01"]
    # the refiner's weights are under the hash: a changed one is refused
    payload = torch.load(both, weights_only=True)
    payload["refiner_state_dict"]["head.bias"] += 1
    torch.save(payload, tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError, match="hash"):
        load_checkpoint(tmp_path / "tampered.pt")
    with pytest.raises(ValueError, match="classes"):
        store_refiner(path, tmp_path / "x.pt", Refiner(RefinerConfig(num_classes=4)), {})
