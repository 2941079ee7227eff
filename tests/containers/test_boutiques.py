"""The Boutiques descriptor (boutiques/bids_cadiff.json), for workflow engines (CBRAIN, ...).

``bosh validate`` accepts it, ``bosh exec simulate`` turns invocations into command lines that
the app's own parser accepts, and its inputs are exactly the options of
:func:`bids_cadiff.cli.parser.build_parser`: an option added to the parser without the
descriptor (or the reverse) fails here.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bids_cadiff import __version__
from bids_cadiff.cli.parser import build_parser, parse_args

pytest.importorskip("boutiques", reason="boutiques is a test extra: pip install boutiques")

REPO = Path(__file__).resolve().parents[2]
DESCRIPTOR = REPO / "boutiques" / "bids_cadiff.json"
IMAGE_NAME = "bidscadiff/bids_cadiff"
#: parser actions that are not inputs of a run
NOT_INPUTS = (argparse._HelpAction, argparse._VersionAction)


def _bosh() -> list[str]:
    beside = Path(sys.executable).parent / "bosh"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("bosh")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from boutiques.bosh import bosh; sys.exit(bosh())"]


def bosh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_bosh(), *args], capture_output=True, text=True, timeout=120, check=False
    )


def simulated_command(*args: str) -> list[str]:
    """The command line ``bosh exec simulate`` prints, as argv."""
    proc = bosh("exec", "simulate", str(DESCRIPTOR), *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Generated Command"))
    return shlex.split(" ".join(line.strip() for line in lines[start + 1:] if line.strip()))


@pytest.fixture(scope="module")
def descriptor() -> dict:
    return json.loads(DESCRIPTOR.read_text())


@pytest.fixture(scope="module")
def inputs(descriptor: dict) -> dict[str, dict]:
    return {inp["id"]: inp for inp in descriptor["inputs"]}


def _actions() -> list[argparse.Action]:
    return [a for a in build_parser()._actions if not isinstance(a, NOT_INPUTS)]


def _action_for(flag: str) -> argparse.Action:
    matches = [a for a in _actions() if flag in a.option_strings]
    assert len(matches) == 1, f"{flag}: {len(matches)} parser options"
    return matches[0]


# --------------------------------------------------------------------------- bosh


def test_bosh_validate() -> None:
    proc = bosh("validate", str(DESCRIPTOR))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK" in proc.stdout


def test_descriptor_version_and_image(descriptor: dict) -> None:
    assert descriptor["name"] == "bids_cadiff"
    assert descriptor["tool-version"] == __version__
    image = descriptor["container-image"]
    assert image["type"] == "docker"
    assert image["image"] == f"{IMAGE_NAME}:{__version__}"
    # the image's ENTRYPOINT is bids_cadiff; bosh runs the command line through a shell
    assert descriptor["command-line"].split()[0] == "bids_cadiff"


def test_simulate_random_complete_invocation() -> None:
    """A random invocation with every optional input: each flag appears once."""
    argv = simulated_command("-c")
    assert argv[0] == "bids_cadiff"
    flags = [a for a in argv if a.startswith("-")]
    assert len(flags) == len(set(flags)), flags
    expected = {a.option_strings[0] for a in _actions() if a.option_strings}
    assert {_action_for(f).option_strings[0] for f in flags} == expected


def test_simulated_command_is_accepted_by_the_parser(tmp_path: Path, inputs: dict) -> None:
    bids = tmp_path / "ds"
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
    filters = tmp_path / "filters.json"
    filters.write_text('{"t1w": {"acquisition": "mprage"}}')
    model = tmp_path / "model.pt"
    model.write_bytes(b"x")
    invocation = {
        "bids_dir": str(bids),
        "output_dir": str(tmp_path / "out"),
        "analysis_level": "participant",
        "participant_label": ["01", "sub-02"],
        "session_label": ["pre"],
        "bids_filter_file": str(filters),
        "skip_bids_validation": True,
        "work_dir": str(tmp_path / "work"),
        "nprocs": 4,
        "omp_nthreads": 2,
        "mem": "8G",
        "device": "cpu",
        "model": str(model),
        "atlas": str(model),
        "steps": 3,
        "seed": 7,
        "refine": "none",
        "samples": 2,
        "save_probabilities": True,
        "reproducible": True,
        "no_reports": True,
        "skip_orientation_check": True,
        "overwrite": True,
        "verbose": True,
    }
    # every input of the descriptor is exercised
    assert invocation.keys() == inputs.keys()
    inv = tmp_path / "invocation.json"
    inv.write_text(json.dumps(invocation))
    argv = simulated_command("-i", str(inv))
    assert argv[0] == "bids_cadiff"

    opts = build_parser().parse_args(argv[1:])
    for key, value in invocation.items():
        inp = inputs[key]
        if "command-line-flag" not in inp:
            continue
        action = _action_for(inp["command-line-flag"])
        got = getattr(opts, action.dest)
        convert = action.type or str
        if inp["type"] == "Flag":
            assert got not in (None, False, 0), key
        elif inp.get("list"):
            assert got == [convert(v) for v in value], key
        else:
            assert got == convert(str(value)), key
    assert opts.bids_dir == bids and opts.analysis_level == "participant"
    # and the checks across options accept it too
    config = parse_args(argv[1:])
    assert list(config.participant_labels) == ["01", "02"]


# --------------------------------------------------------------------------- parser == descriptor


def test_positionals_match_the_parser(descriptor: dict, inputs: dict) -> None:
    positionals = [a for a in _actions() if not a.option_strings]
    keys = re.findall(r"\[[A-Z_]+\]", descriptor["command-line"])
    # the command line starts with the positionals, in the parser's order, under their dest
    assert [a.dest for a in positionals] == ["bids_dir", "output_dir", "analysis_level"]
    for i, action in enumerate(positionals):
        inp = inputs[action.dest]
        assert keys[i] == inp["value-key"], (keys[i], inp["value-key"])
        assert "command-line-flag" not in inp and inp["optional"] is False
        if action.choices:
            assert inp["value-choices"] == list(action.choices)


def test_every_descriptor_input_is_in_the_command_line(descriptor: dict) -> None:
    keys = re.findall(r"\[[A-Z_]+\]", descriptor["command-line"])
    assert sorted(keys) == sorted(inp["value-key"] for inp in descriptor["inputs"])
    assert len(keys) == len(set(keys))


def test_options_are_exactly_the_parsers(inputs: dict) -> None:
    """One descriptor input per parser option, and no input the parser does not know."""
    flagged = {i["command-line-flag"]: i for i in inputs.values() if "command-line-flag" in i}
    covered: dict[str, str] = {}
    for flag in flagged:
        action = _action_for(flag)  # the parser has this option
        assert action.dest not in covered, f"{flag} and {covered[action.dest]}: one option"
        covered[action.dest] = flag
    options = {a.dest: a.option_strings for a in _actions() if a.option_strings}
    missing = {dest: strings for dest, strings in options.items() if dest not in covered}
    assert not missing, f"parser options without a Boutiques input: {missing}"


def test_option_types_match_the_parser(inputs: dict, tmp_path: Path) -> None:
    for inp in inputs.values():
        flag = inp.get("command-line-flag")
        if flag is None:
            continue
        action = _action_for(flag)
        where = f"{inp['id']} ({flag})"
        if isinstance(action, (argparse._StoreTrueAction, argparse._CountAction)):
            assert inp["type"] == "Flag", where
            continue
        assert inp["type"] != "Flag", where
        assert bool(inp.get("list")) == (action.nargs in ("+", "*")), where
        assert inp.get("value-choices") == (list(action.choices) if action.choices else None), where
        if "default-value" in inp:
            assert inp["default-value"] == action.default, where
        assert inp.get("optional") is True and not action.required, where
        if inp["type"] == "Number":
            assert inp.get("integer") is True, where
            low = inp["minimum"]
            assert action.type(str(low)) == low, where
            with pytest.raises(argparse.ArgumentTypeError):
                action.type(str(low - 1))
            if "maximum" in inp:
                assert action.type(str(inp["maximum"])) == inp["maximum"], where
                with pytest.raises(argparse.ArgumentTypeError):
                    action.type(str(inp["maximum"] + 1))
        elif inp["type"] == "File":
            # the parser checks that the file exists
            with pytest.raises(argparse.ArgumentTypeError):
                action.type(str(tmp_path / "missing"))
