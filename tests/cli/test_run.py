"""main(): dispatch, exit codes, validation step."""

from __future__ import annotations

import sys
import types

import pytest

from bids_cadiff.cli import run as run_mod
from bids_cadiff.cli.run import main


def _fake_participant(monkeypatch, behaviour):
    module = types.ModuleType("bids_cadiff.app.participant")
    calls = []

    def run_participant(config):
        calls.append(config)
        return behaviour(config)

    module.run_participant = run_participant
    monkeypatch.setitem(sys.modules, "bids_cadiff.app.participant", module)
    return calls


@pytest.fixture
def argv(bids_skeleton, tmp_path):
    ds = bids_skeleton({"01": [{}]})
    return [str(ds), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work"),
            "--nprocs", "1", "--skip-bids-validation"]


def test_dispatch_participant_returns_its_code(monkeypatch, argv, tmp_path):
    calls = _fake_participant(monkeypatch, lambda c: 0)
    assert main(argv) == 0
    assert calls[0].analysis_level == "participant" and calls[0].omp_nthreads == 1
    assert list((tmp_path / "out" / "logs").glob("config-*.toml"))
    _fake_participant(monkeypatch, lambda c: 1)
    assert main(argv) == 1


def test_keyboard_interrupt_is_130(monkeypatch, argv):
    def interrupt(config):
        raise KeyboardInterrupt

    _fake_participant(monkeypatch, interrupt)
    assert main(argv) == 130


def test_unexpected_error_is_1_with_traceback_in_log(monkeypatch, argv, capsys):
    def boom(config):
        raise RuntimeError("boom")

    _fake_participant(monkeypatch, boom)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: boom" in err


def test_validation_runs_unless_skipped(monkeypatch, argv):
    seen = []
    monkeypatch.setattr("bids_cadiff.bidsio.query.validate_dataset",
                        lambda d, **kw: seen.append((d, kw)))
    _fake_participant(monkeypatch, lambda c: 0)
    assert main(argv) == 0 and seen == []
    validated = [a for a in argv if a != "--skip-bids-validation"]
    assert main(validated) == 0
    assert len(seen) == 1 and seen[0][1]["participant_labels"] == ()
    assert main([*validated, "--participant-label", "01"]) == 0
    assert seen[1][1]["participant_labels"] == ("01",)  # only the selection is validated


def test_invalid_dataset_is_usage_error(monkeypatch, argv, capsys, validator_exe):
    # A T1w with a bad name makes the real validator fail.
    from pathlib import Path

    bad = Path(argv[0]) / "sub-01" / "anat" / "sub-01_T1x.nii.gz"
    bad.write_bytes(b"")
    _fake_participant(monkeypatch, lambda c: 0)
    code = main([a for a in argv if a != "--skip-bids-validation"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--skip-bids-validation" in err.splitlines()[-1] and argv[0] in err
    assert "Traceback" not in err


def test_missing_validator_warns_and_goes_on(monkeypatch, argv, caplog):
    monkeypatch.setattr("bids_cadiff.bidsio.query.find_validator", lambda: None)
    _fake_participant(monkeypatch, lambda c: 0)
    assert main([a for a in argv if a != "--skip-bids-validation"]) == 0
    assert any("bids-validator-deno not found" in r.getMessage() for r in caplog.records)


def test_group_dispatch(monkeypatch, argv):
    seen = []
    monkeypatch.setattr("bids_cadiff.app.group.run_group", lambda c: seen.append(c) or 0)
    group_argv = argv[:2] + ["group"] + argv[3:]
    assert main(group_argv) == 0 and seen[0].analysis_level == "group"


def test_setup_logging_idempotent():
    import logging

    run_mod.setup_logging(0)
    run_mod.setup_logging(1)
    handlers = [h for h in logging.getLogger().handlers
                if getattr(h, "_bids_cadiff", False)]
    assert len(handlers) == 1
    assert logging.getLogger("bids_cadiff").level == logging.DEBUG
