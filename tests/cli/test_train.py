"""cadiff-train: parser, recipes, and end-to-end runs on a generated labelled BIDS dataset."""

from __future__ import annotations

import os
import signal
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from bids_cadiff.app.train import TrainConfig, load_recipe, merge_recipes
from bids_cadiff.cli.train import build_parser, main, overrides_from_args
from bids_cadiff.errors import UsageError
from bids_cadiff.inference.checkpoint import load_checkpoint
from tests.training.synthetic import TINY_ARGS, make_labelled_dataset

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, Path, Path]:
    return make_labelled_dataset(tmp_path)


def test_parser_keeps_only_given_options(tmp_path: Path):
    args = build_parser().parse_args(
        [str(tmp_path), str(tmp_path), str(tmp_path / "o"), "--mode", "dual", "--no-taca",
         "--patch-size", "32", "--no-consistency"]
    )
    over = overrides_from_args(args)
    assert over["model"] == {"mode": "dual", "taca": False}
    assert over["diffusion"] == {"consistency_loss": False}
    assert over["training"] == {"patch_size": [32]}
    assert "lr" not in vars(args) and "labels" not in vars(args)


def test_parser_training_timestep_options(tmp_path: Path):
    args = build_parser().parse_args(
        [str(tmp_path), str(tmp_path), str(tmp_path / "o"), "--t-m-max-fraction", "0.5",
         "--t-d-zero-fraction", "1", "--batch-dice"]
    )
    over = overrides_from_args(args)
    assert over["diffusion"] == {"t_m_max_fraction": 0.5, "t_d_zero_fraction": 1.0, "batch_dice": True}
    config = TrainConfig.from_dict(merge_recipes(load_recipe(CONFIGS / "cadiff_3d.toml"), over))
    assert config.diffusion.t_m_max_fraction == 0.5 and config.diffusion.batch_dice


@pytest.mark.parametrize("value,seconds", [
    ("90", 90.0), ("90s", 90.0), ("45m", 2700.0), ("7.5h", 27000.0), ("02:30:00", 9000.0),
    ("1:30", 90.0), ("2h30m", 9000.0), ("1h0m30s", 3630.0), ("1-00:00:00", 86400.0),
])
def test_time_limit_durations(tmp_path: Path, value, seconds):
    args = build_parser().parse_args([str(tmp_path), str(tmp_path), str(tmp_path / "o"),
                                      "--time-limit", value])
    assert overrides_from_args(args)["training"] == {"time_limit": seconds}


@pytest.mark.parametrize("argv,message", [
    (["--time-limit", "soon"], "not a duration"),
    (["--time-limit", "0"], "--time-limit must be > 0"),
    (["--time-limit", "2h2h"], "not a duration"),
    (["--time-limit", "2x30m"], "not a duration"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
    (["--mode", "joint"], "invalid choice"),
    (["--t-m-max-fraction", "1.5"], "--t-m-max-fraction must be in [0, 1]"),
])
def test_parser_rejects_bad_values(tmp_path: Path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([str(tmp_path), str(tmp_path), str(tmp_path / "o"), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_recipes_in_configs_are_valid():
    files = sorted(CONFIGS.rglob("*.toml"))
    assert len(files) >= 6
    base = load_recipe(CONFIGS / "cadiff_3d.toml")
    for path in files:
        config = TrainConfig.from_dict(merge_recipes(base, load_recipe(path)))
        assert config.training.patch_size
    paper = TrainConfig.from_dict(base)
    assert paper.training.patch_size == (96, 96, 96) and paper.training.lr == 1e-4
    assert paper.training.iterations == 200_000 and paper.model.taca_kernel_sizes == (7, 11, 15)
    two_d = TrainConfig.from_dict(load_recipe(CONFIGS / "cadiff_2d.toml"))
    assert two_d.training.patch_size == (160, 160) and two_d.training.batch_size == 70


def test_train_resume_and_load(dataset, tmp_path: Path):
    bids, labels, atlas = dataset
    common = [str(bids), str(labels), "--atlas", str(atlas), *TINY_ARGS, "--checkpoint-every", "2",
              "--val-every", "2", "--val-participants", "03"]
    assert main([*common[:2], str(tmp_path / "a"), *common[2:], "--iterations", "4"]) == 0
    assert main([*common[:2], str(tmp_path / "b"), *common[2:], "--iterations", "2"]) == 0
    assert main([*common[:2], str(tmp_path / "b"), *common[2:], "--iterations", "4",
                 "--resume", "auto"]) == 0
    a = load_checkpoint(tmp_path / "a/model.pt")
    b = load_checkpoint(tmp_path / "b/model.pt")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    meta = b.metadata
    assert meta.training["iteration"] == 4 and meta.voxel_size == (4.0, 4.0, 4.0)
    assert meta.labels.values == [0, 2, 3, 4, 41, 42, 43, 77]
    assert meta.training["val_images"] == ["sub-03_T1w"]
    saved = tomllib.loads((tmp_path / "b/train_config.toml").read_text())
    again = TrainConfig.from_dict(saved)
    assert again.model.channels == (8, 16) and again.data.registration == "none"
    assert "\n4\tmean\t" in (tmp_path / "b/val_log.tsv").read_text()


def test_time_limit_counts_the_preparation(dataset, tmp_path: Path, monkeypatch):
    """--time-limit is the run's, as a SLURM job's wall time is: preparing the data (hours of
    registration on a fresh work dir) is inside it, not added on top."""
    import bids_cadiff.app.train as app_train
    import bids_cadiff.training.loop as loop

    prepare_items, train = app_train.prepare_items, loop.train
    prepared_at: list[float] = []
    clock_starts: list[float | None] = []

    def slow_preparation(*args, **kwargs):
        prepared_at.append(time.perf_counter())
        time.sleep(1.5)  # longer than the limit below
        return prepare_items(*args, **kwargs)

    def watched_train(*args, **kwargs):
        clock_starts.append(kwargs.get("clock_start"))
        return train(*args, **kwargs)

    monkeypatch.setattr(app_train, "prepare_items", slow_preparation)
    monkeypatch.setattr(loop, "train", watched_train)
    bids, labels, atlas = dataset
    assert main([str(bids), str(labels), str(tmp_path / "o"), "--atlas", str(atlas), *TINY_ARGS,
                 "--iterations", "4", "--time-limit", "1s"]) == 0
    # the limit counts from before the preparation, so it was spent before the loop began:
    # one iteration, then the checkpoint
    assert clock_starts[0] is not None and clock_starts[0] <= prepared_at[0]
    assert load_checkpoint(tmp_path / "o/model.pt").metadata.training["iteration"] == 1
    assert (tmp_path / "o/checkpoints/iter-0000001.pt").is_file()


def test_config_file_with_cli_override_and_2d(dataset, tmp_path: Path):
    bids, labels, atlas = dataset
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[model]\nspatial_dims = 2\nmode = "dual"\n[training]\niterations = 50\n'
                      'batch_size = 3\n')
    out = tmp_path / "out"
    assert main([str(bids), str(labels), str(out), "--config", str(recipe), "--atlas", str(atlas),
                 *TINY_ARGS, "--iterations", "2", "--val-every", "2"]) == 0
    loaded = load_checkpoint(out / "model.pt")
    assert loaded.model.model_config.spatial_dims == 2 and loaded.model.model_config.mode == "dual"
    assert loaded.metadata.patch_size == (16, 16)
    assert loaded.metadata.training["iteration"] == 2
    assert loaded.metadata.training["recipe"]["training"]["batch_size"] == 2


def test_train_with_label_prior(dataset, tmp_path: Path):
    bids, labels, atlas = dataset
    out = tmp_path / "prior"
    assert main([str(bids), str(labels), str(out), "--atlas", str(atlas), *TINY_ARGS,
                 "--iterations", "2", "--val-every", "2", "--label-prior-bins", "6"]) == 0
    model = load_checkpoint(out / "model.pt").model
    assert model.model_config.label_prior_bins == 6
    probs = model.label_prior.exp()
    assert probs.shape == (8, 6, 6, 6)
    torch.testing.assert_close(probs.sum(0), torch.ones(6, 6, 6), atol=1e-2, rtol=0)
    assert (probs[1:].amax(0) > 0.5).any()  # the brain's classes are in it


def _label_maps(labels: Path, folder: Path) -> Path:
    """Two label maps without images (copies of the dataset's label maps)."""
    folder.mkdir()
    for sub in ("01", "02"):
        src = labels / f"sub-{sub}/anat/sub-{sub}_desc-manual_dseg.nii.gz"
        (folder / f"map_{sub}.nii.gz").write_bytes(src.read_bytes())
    (folder / "labels_table.txt").write_text("not a map\n")
    return folder


def test_mixed_sampling_with_label_maps_resumes_exactly(dataset, tmp_path: Path):
    bids, labels, atlas = dataset
    maps = _label_maps(labels, tmp_path / "maps")
    common = [str(bids), str(labels), "--atlas", str(atlas), *TINY_ARGS, "--checkpoint-every", "2",
              "--val-every", "2", "--val-participants", "03", "--sampling", "mixed",
              "--synth-label-maps", str(maps), "--field-jitter", "1", "-w", str(tmp_path / "w")]
    assert main([*common[:2], str(tmp_path / "a"), *common[2:], "--iterations", "4"]) == 0
    assert main([*common[:2], str(tmp_path / "b"), *common[2:], "--iterations", "2"]) == 0
    assert main([*common[:2], str(tmp_path / "b"), *common[2:], "--iterations", "4",
                 "--resume", "auto"]) == 0
    a, b = load_checkpoint(tmp_path / "a/model.pt"), load_checkpoint(tmp_path / "b/model.pt")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    training = b.metadata.training
    assert training["train_images"] == ["sub-01_T1w", "sub-02_T1w", "map-map_01", "map-map_02"]
    assert training["recipe"]["sampling"]["mode"] == "mixed"
    assert training["recipe"]["sampling"]["field_jitter"] == 1.0
    saved = TrainConfig.from_dict(tomllib.loads((tmp_path / "b/train_config.toml").read_text()))
    assert saved.sampling.mode == "mixed" and saved.data.synth_label_maps == maps
    # another sampling setting is another run: resuming it is refused, naming the difference
    assert main([*common[:2], str(tmp_path / "b"), *common[2:], "--iterations", "6",
                 "--field-jitter", "2", "--resume", "auto"]) == 1


def test_the_default_model_recipe():
    config = TrainConfig.from_dict(load_recipe(CONFIGS / "default_model.toml"))
    assert config.sampling.mode == "mixed" and config.sampling.field_jitter > 0
    assert config.data.voxel_size == (2.0, 2.0, 2.0) and config.model.label_prior_bins == 48
    assert config.data.split_midline_maps == ("fb_*", "old_*")
    assert config.training.patch_size == (48, 48, 48)
    # no refiner in the default model (its cost, docs/training.md); the recipe's commented
    # example of one is a valid [refiner] table for the 2 mm grid
    assert config.refiner is None
    text = (CONFIGS / "default_model.toml").read_text()
    example = "\n".join(line[4:] for line in text.split("#   [refiner]")[1].splitlines()
                        if line.startswith("#   "))
    example = "[refiner]\n" + example
    refiner = TrainConfig.from_dict(tomllib.loads(example)).refiner
    assert refiner is not None and refiner.training.iterations == 3000
    assert refiner.config(33).voxel_size == 1.0 and refiner.config(33).channels == (8, 16, 32)
    with pytest.raises(UsageError, match=r"\[sampling\]"):
        TrainConfig.from_dict({"sampling": {"nonsense": 1}})


def test_the_gpu_recipe_runs_at_a_tiny_size_on_the_cpu(dataset, tmp_path: Path, monkeypatch):
    import bids_cadiff.training.loop as loop

    gpu = TrainConfig.from_dict(load_recipe(CONFIGS / "default_model_gpu.toml"))
    assert gpu.training.patch_size == (96, 96, 96) and gpu.data.voxel_size == (1.0, 1.0, 1.0)
    assert gpu.training.batch_size == 2 and gpu.training.lr == 1e-4 and gpu.training.amp
    assert gpu.sampling.on_device and gpu.sampling.mode == "mixed"
    default = TrainConfig.from_dict(load_recipe(CONFIGS / "default_model.toml"))
    assert gpu.diffusion == default.diffusion  # only scale and device differ
    assert gpu.data.labels == default.data.labels and gpu.model.label_prior_bins == 48
    bids, labels, atlas = dataset
    maps = _label_maps(labels, tmp_path / "maps")
    out = tmp_path / "out"
    argv = [str(bids), str(labels), str(out), "--config", str(CONFIGS / "default_model_gpu.toml"),
            "--atlas", str(atlas), *TINY_ARGS, "--synth-label-maps", str(maps),
            "-w", str(tmp_path / "w"), "--iterations", "3", "--val-participants", "03"]
    step_generator = loop._step_generator

    def terminated(seed, rank, iteration, device):  # SLURM pre-empts the job during step 2
        if iteration == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return step_generator(seed, rank, iteration, device)

    monkeypatch.setattr(loop, "_step_generator", terminated)
    assert main(argv) == 128 + signal.SIGTERM  # not a finished model: 143
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == [
        "iter-0000002.pt", "iter-0000002_state.pt"]  # the iteration it was in, checkpointed
    monkeypatch.setattr(loop, "_step_generator", step_generator)
    assert main([*argv, "--resume", "auto"]) == 0
    trained = load_checkpoint(out / "model.pt").metadata.training
    assert trained["iteration"] == 3 and trained["recipe"]["sampling"]["on_device"]
    assert "map-map_01" in trained["train_images"]


def test_usage_errors_are_one_line(dataset, tmp_path: Path, capsys):
    bids, labels, atlas = dataset
    assert main([str(bids), str(labels), str(bids), *TINY_ARGS]) == 2
    assert "OUTPUT_DIR is the same folder as BIDS_DIR" in capsys.readouterr().err
    assert main([str(bids), str(labels), str(tmp_path / "o"), "--atlas", str(atlas), *TINY_ARGS,
                 "--labels", "nonsense"]) == 2
    assert "neither 'synthseg32', 'dseg'" in capsys.readouterr().err
    no_table = tmp_path / "labels_without_tsv"
    no_table.mkdir()
    assert main([str(bids), str(no_table), str(tmp_path / "o"), "--atlas", str(atlas),
                 *TINY_ARGS]) == 2
    assert "dseg.tsv" in capsys.readouterr().err


SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "fstd"


def _real_dataset(root: Path, subjects=("01", "02")) -> tuple[Path, Path]:
    """BIDS + labels from FreeSurfer's T1.mgz/aseg.mgz of real subjects (converted to NIfTI)."""
    import json

    import nibabel as nib

    bids, labels = root / "bids", root / "labels"
    for folder, kind in ((bids, "raw"), (labels, "derivative")):
        folder.mkdir(parents=True)
        (folder / "dataset_description.json").write_text(json.dumps(
            {"Name": "fstd", "BIDSVersion": "1.10.0", "DatasetType": kind}))
    for sub in subjects:
        for src, dst in (("T1.mgz", bids / f"sub-{sub}/anat/sub-{sub}_T1w.nii.gz"),
                         ("aseg.mgz", labels / f"sub-{sub}/anat/sub-{sub}_desc-aseg_dseg.nii.gz")):
            img = nib.load(str(SHARED / f"sub-{sub}" / src))
            dst.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine), str(dst))
    return bids, labels


@pytest.mark.slow
def test_train_on_real_images_with_ants_registration(tmp_path: Path):
    """Colin27 registered with ANTs (affine, 2 mm grid: at 4 mm the NCC check rejects it) to real T1w, FreeSurfer aseg merged to synthseg32."""
    if not (SHARED / "sub-02" / "aseg.mgz").is_file():
        pytest.skip(f"shared data missing: {SHARED} (see /work/shared/data/README.md)")
    from bids_cadiff.registration.atlas import COLIN27_DIR

    if not (COLIN27_DIR / "ch2.nii.gz").is_file():
        pytest.skip("Colin27 atlas missing (apt-get install mricron-data)")
    bids, labels = _real_dataset(tmp_path)
    args = ["--registration", "affine", "--voxel-size", "2", "--labels", "synthseg32",
            "--channels", "8", "16", "--time-embed-dim", "16", "--timesteps", "50",
            "--sampling-steps", "2", "--patch-size", "16", "--batch-size", "2",
            "--iterations", "2", "--val-every", "0", "--no-progress"]
    assert main([str(bids), str(labels), str(tmp_path / "o"), *args]) == 0
    loaded = load_checkpoint(tmp_path / "o/model.pt")
    assert loaded.metadata.labels.num_classes == 33 and loaded.metadata.atlas["name"] == "Colin27"
    assert any((tmp_path / "o/work/registration").iterdir())
    prepared = list((tmp_path / "o/work/prepared").glob("*.npz"))
    assert len(prepared) == 2
    with np.load(prepared[0]) as arrays:
        assert arrays["distance"].max() > 0.9 and arrays["image"].shape == (128, 128, 128)


def test_a_refiner_stage_trains_after_ca_diff_and_lands_in_the_checkpoint(
    dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    bids, labels, atlas = dataset
    maps = _label_maps(labels, tmp_path / "maps")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[refiner]\niterations = 3\npatch = 8\nchannels = [4, 8, 8]\nsqueeze = 2\n"
                      "voxel_size = 4.0\ncheckpoint_every = 2\nwarmup = 1\n")
    out = tmp_path / "o"
    args = [str(bids), str(labels), str(out), "--config", str(recipe), "--atlas", str(atlas),
            *TINY_ARGS, "--iterations", "2", "--val-participants", "03", "--sampling", "mixed",
            "--synth-label-maps", str(maps), "-w", str(tmp_path / "w")]
    # SLURM's pre-emption signal in the refiner stage: exit 128 + SIGUSR1 (the sbatch script
    # requeues on it) with the refiner's state saved, and CA-Diff's model already final
    from bids_cadiff.training.refiner_data import RefinerPatches

    patch_item = RefinerPatches.__getitem__

    def signalling(self, index: int):  # noqa: ANN001, ANN202
        if index == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return patch_item(self, index)

    monkeypatch.setattr(RefinerPatches, "__getitem__", signalling)
    assert main(args) == 128 + signal.SIGUSR1
    assert load_checkpoint(out / "model.pt").refiner is None
    assert torch.load(out / "refiner" / "refiner_state.pt", weights_only=True)["iteration"] == 2
    monkeypatch.setattr(RefinerPatches, "__getitem__", patch_item)
    assert main([*args, "--resume", "auto"]) == 0
    loaded = load_checkpoint(out / "model.pt")
    assert loaded.refiner is not None and loaded.refiner.config.channels == (4, 8, 8)
    assert loaded.refiner.config.num_classes == loaded.metadata.labels.num_classes
    assert loaded.metadata.training["recipe"]["refiner"]["iterations"] == 3
    from bids_cadiff.inference.checkpoint import read_checkpoint

    about = read_checkpoint(out / "model.pt")["refiner"]
    # the validation subject is not among the refiner's training data
    assert about["subjects"] == ["sub-01_T1w.nii.gz", "sub-02_T1w.nii.gz", "map_01.nii.gz",
                                 "map_02.nii.gz"]
    assert about["iteration"] == 3 and about["simulation"]["factor"] == 1
    # resuming the finished run trains nothing again and keeps the refiner
    before = (out / "refiner" / "refiner.pt").stat().st_mtime_ns
    assert main([*args, "--resume", "auto"]) == 0
    assert (out / "refiner" / "refiner.pt").stat().st_mtime_ns == before
    assert load_checkpoint(out / "model.pt").refiner is not None
    # a refiner made with other settings is not attached to this run's model
    recipe.write_text(recipe.read_text().replace("iterations = 3", "iterations = 4"))
    assert main([*args, "--resume", "auto"]) == 2


def test_unknown_refiner_keys_are_a_usage_error():
    with pytest.raises(UsageError, match="unknown \\[refiner\\] keys \\['depth'\\]"):
        TrainConfig.from_dict({"refiner": {"depth": 3}})
    with pytest.raises(UsageError, match="invalid \\[refiner\\]"):
        TrainConfig.from_dict({"refiner": {"patch": 10}})
