"""The argparse parser alone, then parse_args' cross-checks and main()'s usage errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bids_cadiff import __version__
from bids_cadiff.cli.parser import build_parser, parse_args
from bids_cadiff.cli.run import main


@pytest.fixture
def dataset(bids_skeleton) -> Path:
    return bids_skeleton({"01": [{}], "02": {"1": [{}]}})


def _parse(dataset: Path, tmp_path: Path, *extra: str):
    return build_parser().parse_args([str(dataset), str(tmp_path / "out"), "participant", *extra])


def test_positionals_and_defaults(dataset, tmp_path):
    opts = _parse(dataset, tmp_path)
    assert opts.bids_dir == dataset
    assert opts.output_dir == tmp_path / "out"
    assert opts.analysis_level == "participant"
    assert opts.participant_labels == [] and opts.session_labels == []
    assert opts.bids_filters is None and opts.work_dir is None
    assert (opts.steps, opts.seed, opts.device, opts.verbosity) == (5, 0, "auto", 0)
    assert opts.refine == "auto"  # the model's refiner when it has one, else em
    assert not opts.overwrite and not opts.skip_bids_validation


@pytest.mark.parametrize("flag", ["--participant-label", "--participant_label"])
def test_participant_label_both_spellings_and_prefix(dataset, tmp_path, flag):
    opts = _parse(dataset, tmp_path, flag, "sub-01", "02", flag, "03")
    assert opts.participant_labels == ["01", "02", "03"]


@pytest.mark.parametrize("flag", ["--session-label", "--session_label"])
def test_session_label(dataset, tmp_path, flag):
    assert _parse(dataset, tmp_path, flag, "ses-1", "2").session_labels == ["1", "2"]


@pytest.mark.parametrize("flag", ["--skip-bids-validation", "--skip_bids_validation"])
def test_skip_validation(dataset, tmp_path, flag):
    assert _parse(dataset, tmp_path, flag).skip_bids_validation


def test_every_other_option(dataset, tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"x")
    atlas = tmp_path / "atlas.nii.gz"
    atlas.write_bytes(b"x")
    filt = tmp_path / "filters.json"
    filt.write_text(json.dumps({"t1w": {"acquisition": "mprage", "run": [1, 2]}}))
    opts = _parse(
        dataset, tmp_path,
        "-w", str(tmp_path / "work"), "--nprocs", "4", "--omp-nthreads", "2",
        "--model", str(model), "--atlas", str(atlas), "--device", "cpu", "--steps", "3",
        "--seed", "42", "--overwrite", "-vv", "--bids-filter-file", str(filt),
        "--refine", "none",
    )
    assert opts.refine == "none"
    assert opts.work_dir == tmp_path / "work"
    assert (opts.nprocs, opts.omp_nthreads) == (4, 2)
    assert opts.model == model and opts.atlas == atlas
    assert (opts.device, opts.steps, opts.seed) == ("cpu", 3, 42)
    assert opts.overwrite and opts.verbosity == 2
    assert opts.bids_filters == {"t1w": {"acquisition": "mprage", "run": [1, 2]}}
    assert _parse(dataset, tmp_path, "--work-dir", "w", "--omp_nthreads", "1").omp_nthreads == 1


def test_uncertainty_report_and_resource_options(dataset, tmp_path):
    opts = _parse(dataset, tmp_path, "--samples", "4", "--save-probabilities", "--no-reports",
                  "--reproducible", "--mem", "16G")
    assert (opts.samples, opts.save_probabilities, opts.no_reports) == (4, True, True)
    assert opts.reproducible and opts.mem_gb == 16.0
    defaults = _parse(dataset, tmp_path)
    assert (defaults.samples, defaults.save_probabilities, defaults.no_reports) == (1, False, False)
    assert not defaults.reproducible and defaults.mem_gb is None
    assert _parse(dataset, tmp_path, "--mem-mb", "8000").mem_gb == 8.0  # fMRIPrep: MB
    cfg = parse_args([str(dataset), str(tmp_path / "out"), "participant", "--samples", "2",
                      "--mem", "6.5GB", "--reproducible", "--no-reports", "-w", str(tmp_path / "w")])
    assert (cfg.samples, cfg.mem_gb, cfg.reproducible, cfg.reports) == (2, 6.5, True, False)


def test_mem_limits_the_images_run_at_once(dataset, tmp_path, caplog):
    import logging

    import torch

    from bids_cadiff.app.participant import parallel_images

    caplog.set_level(logging.INFO)
    base = [str(dataset), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
            "--nprocs", "8", "--omp-nthreads", "1"]
    cpu = torch.device("cpu")
    assert parallel_images(parse_args(base), cpu) == 8
    assert parallel_images(parse_args([*base, "--mem", "7G"]), cpu) == 2
    assert "2 image(s) at once instead of 8" in caplog.text
    assert parallel_images(parse_args([*base, "--mem", "100G"]), cpu) == 8
    assert parallel_images(parse_args([*base, "--mem", "100G"]), torch.device("cuda")) == 1


def test_parse_args_builds_config(dataset, tmp_path):
    cfg = parse_args([str(dataset), str(tmp_path / "out"), "group", "--participant-label",
                      "01", "sub-01", "--nprocs", "2", "-w", str(tmp_path / "w")])
    assert cfg.participant_labels == ("01",)  # duplicates dropped
    assert cfg.analysis_level == "group" and cfg.nprocs == 2 and cfg.omp_nthreads == 2
    assert cfg.work_dir == tmp_path / "w"


def test_output_inside_derivatives_allowed(dataset):
    cfg = parse_args([str(dataset), str(dataset / "derivatives" / "cadiff"), "participant"])
    assert cfg.output_dir == dataset / "derivatives" / "cadiff"


def _usage_error(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    # Log lines (INFO, to stderr) may come first; the error itself is one final line.
    errors = [ln for ln in err.splitlines() if ln.startswith("bids_cadiff: error: ")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    assert "Traceback" not in err
    return errors[0]


def test_unknown_refinement(dataset, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(dataset, tmp_path, "--refine", "crf")
    assert exc.value.code == 2 and "--refine" in capsys.readouterr().err


def test_unknown_option(dataset, tmp_path, capsys):
    err = _usage_error([str(dataset), str(tmp_path / "o"), "participant", "--partcipant-label",
                        "01"], capsys)
    assert "unrecognized arguments" in err


def test_abbreviated_option_rejected(dataset, tmp_path, capsys):
    _usage_error([str(dataset), str(tmp_path / "o"), "participant", "--over"], capsys)


def test_unknown_analysis_level(dataset, tmp_path, capsys):
    assert "invalid choice" in _usage_error([str(dataset), str(tmp_path / "o"), "subject"], capsys)


def test_not_a_bids_dataset(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    err = _usage_error([str(tmp_path / "raw"), str(tmp_path / "o"), "participant"], capsys)
    assert "dataset_description.json" in err


def test_missing_bids_dir(tmp_path, capsys):
    err = _usage_error([str(tmp_path / "nope"), str(tmp_path / "o"), "participant"], capsys)
    assert "does not exist" in err


@pytest.mark.parametrize("label", ["../x", "a/b", "sub-../x", "sub-01_x", ""])
def test_label_that_is_a_path_or_invalid(dataset, tmp_path, capsys, label):
    err = _usage_error([str(dataset), str(tmp_path / "o"), "participant", "--participant-label",
                        label], capsys)
    assert "label" in err


def test_session_label_path(dataset, tmp_path, capsys):
    _usage_error([str(dataset), str(tmp_path / "o"), "participant", "--session-label", "../1"],
                 capsys)


def test_output_equals_input(dataset, capsys):
    err = _usage_error([str(dataset), str(dataset), "participant"], capsys)
    assert "derivatives" in err  # suggests a fix


def test_output_is_a_file(dataset, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert "existing file" in _usage_error([str(dataset), str(tmp_path / "file"), "group"], capsys)


def test_output_inside_input_outside_derivatives(dataset, capsys):
    _usage_error([str(dataset), str(dataset / "sub-01" / "out"), "participant"], capsys)


def test_output_contains_input(dataset, capsys):
    _usage_error([str(dataset), str(dataset.parent), "participant"], capsys)


def test_missing_model(dataset, tmp_path, capsys):
    err = _usage_error([str(dataset), str(tmp_path / "o"), "participant", "--model",
                        str(tmp_path / "missing.pt")], capsys)
    assert "missing.pt" in err and "does not exist" in err


@pytest.mark.parametrize("extra", [["--steps", "0"], ["--nprocs", "-1"], ["--seed", "x"],
                                   ["--omp-nthreads", "0"], ["--device", "tpu"],
                                   ["--nprocs", "1", "--omp-nthreads", "2"],
                                   ["--samples", "0"], ["--mem", "lots"], ["--mem", "2G"],
                                   ["--mem", "0"]])
def test_bad_numbers(dataset, tmp_path, capsys, extra):
    _usage_error([str(dataset), str(tmp_path / "o"), "participant", *extra], capsys)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"t1w": 3}',
                                     '{"t1w": {"acquisition": {"a": 1}}}'])
def test_bad_filter_file(dataset, tmp_path, capsys, content):
    filt = tmp_path / "f.json"
    filt.write_text(content)
    err = _usage_error([str(dataset), str(tmp_path / "o"), "participant", "--bids-filter-file",
                        str(filt)], capsys)
    assert str(filt) in err


def test_missing_filter_file(dataset, tmp_path, capsys):
    _usage_error([str(dataset), str(tmp_path / "o"), "participant", "--bids-filter-file",
                  str(tmp_path / "none.json")], capsys)


@pytest.fixture
def fake_participant(monkeypatch):
    """Stand-in for bids_cadiff.app.participant (written elsewhere) that only queries."""
    import types

    from bids_cadiff.bidsio.query import find_t1w

    module = types.ModuleType("bids_cadiff.app.participant")

    def run_participant(config):
        find_t1w(config.bids_dir, participant_labels=config.participant_labels,
                 session_labels=config.session_labels, bids_filters=config.bids_filters)
        return 0

    module.run_participant = run_participant
    monkeypatch.setitem(sys.modules, "bids_cadiff.app.participant", module)
    return module


def test_unknown_participant_label_is_usage_error(dataset, tmp_path, capsys, fake_participant):
    err = _usage_error([str(dataset), str(tmp_path / "o"), "participant", "--participant-label",
                        "99", "--skip-bids-validation"], capsys)
    assert "99" in err and "01, 02" in err


def test_version(capsys):
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_console_subprocess_usage_error(tmp_path):
    """The real process: exit code 2, one line, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "bids_cadiff.cli.run", str(tmp_path), str(tmp_path / "o"),
         "participant"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "dataset_description.json" in proc.stderr
