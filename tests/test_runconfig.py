"""RunConfig: validation and TOML round trip (tests/test_runconfig.py: bids_cadiff/config.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from bids_cadiff.config import RunConfig, dumps_toml, load_toml


def _full() -> RunConfig:
    return RunConfig(
        bids_dir=Path("/data/ds"), output_dir=Path("/data/ds/derivatives/cadiff"),
        analysis_level="participant", participant_labels=("01", "02"), session_labels=("a",),
        bids_filters={"t1w": {"acquisition": "mp rage \"x\"", "run": [1, 2]}},
        work_dir=Path("/scratch/w"), nprocs=4, omp_nthreads=2, skip_bids_validation=True,
        model=Path("/m/model.pt"), atlas=None, device="cuda", steps=7, seed=123,
        overwrite=True, verbosity=1,
    )


def test_toml_round_trip(tmp_path):
    cfg = _full()
    assert RunConfig.from_dict(tomllib.loads(cfg.to_toml())["execution"]) == cfg
    path = cfg.write_toml(tmp_path / "logs" / "config.toml")
    assert load_toml(path) == cfg
    assert "atlas" not in cfg.to_dict()


def test_frozen_and_to_dict_is_a_copy():
    cfg = _full()
    with pytest.raises(AttributeError):
        cfg.steps = 3  # type: ignore[misc]
    data = cfg.to_dict()
    data["bids_filters"]["t1w"]["run"].append(3)
    assert cfg.bids_filters == {"t1w": {"acquisition": "mp rage \"x\"", "run": [1, 2]}}


@pytest.mark.parametrize("kw", [{"analysis_level": "subject"}, {"device": "tpu"},
                                {"steps": 0}, {"nprocs": 0}, {"omp_nthreads": -1},
                                {"refine": "crf"}])
def test_invalid_values(kw):
    base = dict(bids_dir=Path("/a"), output_dir=Path("/b"), analysis_level="group")
    base.update(kw)
    with pytest.raises(ValueError):
        RunConfig(**base)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown"):
        RunConfig.from_dict({"bids_dir": "/a", "output_dir": "/b", "analysis_level": "group",
                             "colour": "red"})


def test_dumps_toml_types():
    text = dumps_toml({"x": 1.5, "b": False, "s": "a\\b\n", "k.y": 2, "t": {"i": {"j": 1}}})
    assert tomllib.loads(text) == {"x": 1.5, "b": False, "s": "a\\b\n", "k.y": 2,
                                   "t": {"i": {"j": 1}}}
