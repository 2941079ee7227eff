"""Container, CI and HPC files, checked without a container engine or a scheduler.

What is checked: the Dockerfile installs through scripts/install.sh (the one install path, also
used by make and .ci/run) and ends in ``ENTRYPOINT ["bids_cadiff"]``; every cache points under
/tmp; the OCI labels match pyproject.toml; Singularity.def builds from the image CI pushes; the
CircleCI config builds, tests read-only and deploys on tags; the SLURM scripts parse and pick
the Nth participant. Building and running the image is CircleCI's job (.circleci/config.yml).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
SINGULARITY = REPO / "Singularity.def"
CIRCLECI = REPO / ".circleci" / "config.yml"
SLURM = REPO / "scripts" / "slurm"
IMAGE_NAME = "bidscadiff/bids_cadiff"

#: Variables that must point under /tmp in the image (Dockerfile ENV, Singularity %environment).
CACHE_VARS = (
    "HOME", "TMPDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR", "TORCH_HOME",
    "NILEARN_DATA", "NUMBA_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR",
    "CUDA_CACHE_PATH", "DENO_DIR", "HF_HOME",
)
OCI_LABELS = ("version", "source", "title", "description", "licenses", "revision")


# --------------------------------------------------------------------------- Dockerfile parsing


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; comments dropped, backslash continuations joined.

    >>> dockerfile_instructions("FROM a\\n# c\\nRUN x \\\\\\n  && y\\n")
    [('FROM', 'a'), ('RUN', 'x && y')]
    """
    out: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1].rstrip() + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    return out


def key_values(args: str) -> dict[str, str]:
    """``ENV``/``LABEL``/``ARG`` arguments (``K=V`` pairs, shell-quoted) as a dict."""
    pairs = {}
    for token in shlex.split(args):
        key, sep, value = token.partition("=")
        pairs[key] = value if sep else ""
    return pairs


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def _all(instructions: list[tuple[str, str]], keyword: str) -> dict[str, str]:
    merged: dict[str, str] = {}
    for kw, args in instructions:
        if kw == keyword:
            merged.update(key_values(args))
    return merged


def test_dockerfile_base_is_debian_python311(instructions: list[tuple[str, str]]) -> None:
    froms = [args for kw, args in instructions if kw == "FROM"]
    assert len(froms) == 1, froms
    # Debian (apt has mricron-data) and the dev/CI machines' Python.
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim-bookworm", froms[0]), froms[0]


def test_dockerfile_installs_through_install_sh(instructions: list[tuple[str, str]]) -> None:
    copies = [args for kw, args in instructions if kw == "COPY"]
    assert any("scripts/install.sh" in c.split() for c in copies), copies
    runs = [args for kw, args in instructions if kw == "RUN"]
    system = [r for r in runs if "scripts/install.sh --system-only" in r]
    python = [r for r in runs if "scripts/install.sh --python-only" in r]
    assert system and python, runs
    # The system part is run before any Python part, as `make install` does.
    assert runs.index(system[0]) < runs.index(python[0])
    # No pip install or apt-get install besides install.sh: one install path.
    for run in runs:
        assert "pip install" not in run and "apt-get install" not in run, run


def test_make_and_ci_use_the_same_install_script() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "scripts/install.sh --system-only" in makefile
    assert "scripts/install.sh --python-only" in makefile
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_dockerfile_copy_sources_exist(instructions: list[tuple[str, str]]) -> None:
    for kw, args in instructions:
        if kw != "COPY" or args.startswith("--from"):
            continue
        *sources, _dest = args.split()
        for src in sources:
            if any(ch in src for ch in "*?["):
                continue  # optional wildcard (README*)
            assert (REPO / src).exists(), f"COPY {src}: missing from the repository"


def test_dockerfile_entrypoint_is_the_console_script(
    instructions: list[tuple[str, str]],
) -> None:
    entrypoints = [args for kw, args in instructions if kw == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    assert json.loads(entrypoints[0]) == ["bids_cadiff"]
    assert instructions[-1][0] == "ENTRYPOINT"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "bids_cadiff" in scripts
    # any user id: no USER switch to a named account that may not exist on a host
    assert not [args for kw, args in instructions if kw == "USER"]


def test_dockerfile_caches_under_tmp(instructions: list[tuple[str, str]]) -> None:
    env = _all(instructions, "ENV")
    for var in CACHE_VARS:
        assert var in env, f"ENV {var} missing"
        assert env[var] == "/tmp" or env[var].startswith("/tmp/"), f"{var}={env[var]}"
    # anything else that looks like a path to write to also stays under /tmp
    for var, value in env.items():
        if re.search(r"(HOME|DIR|PATH|DATA|FOLDER)$", var) and value.startswith("/"):
            assert value == "/tmp" or value.startswith("/tmp/"), f"{var}={value}"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env.get("HF_HUB_OFFLINE") == "1"


def test_dockerfile_oci_labels_match_pyproject(instructions: list[tuple[str, str]]) -> None:
    labels = _all(instructions, "LABEL")
    for key in OCI_LABELS:
        assert f"org.opencontainers.image.{key}" in labels, key
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    oci = {k.removeprefix("org.opencontainers.image."): v for k, v in labels.items()}
    assert oci["title"] == project["name"]
    assert oci["description"] == project["description"]
    assert oci["licenses"] == project["license"]["text"]
    assert oci["source"] == project["urls"]["Source"]
    assert oci["version"] == "${VERSION}"
    args = _all(instructions, "ARG")
    assert args["VERSION"] == "unknown"


def test_dockerfile_records_the_container_for_provenance(
    instructions: list[tuple[str, str]],
) -> None:
    env = _all(instructions, "ENV")
    args = _all(instructions, "ARG")
    # bids_cadiff.bidsio.derivatives.container_info reads CADIFF_CONTAINER_TAG
    assert env["CADIFF_CONTAINER_TAG"] == "${CONTAINER_TAG}"
    assert args["CONTAINER_TAG"] == "${IMAGE_NAME}:${VERSION}"
    assert args["IMAGE_NAME"] == IMAGE_NAME
    derivatives = REPO / "bids_cadiff" / "bidsio" / "derivatives.py"
    if derivatives.exists():
        assert "CADIFF_CONTAINER_TAG" in derivatives.read_text()


def test_dockerfile_per_commit_args_come_after_the_last_run(
    instructions: list[tuple[str, str]],
) -> None:
    """A changing ARG invalidates every later RUN: VERSION/VCS_REF must not rebuild torch."""
    last_run = max(i for i, (kw, _) in enumerate(instructions) if kw == "RUN")
    for i, (kw, args) in enumerate(instructions):
        if kw == "ARG" and key_values(args).keys() & {"VERSION", "VCS_REF", "BUILD_DATE"}:
            assert i > last_run, args


def _dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace("**/", ""))
               for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore() -> None:
    patterns = _dockerignore_patterns()
    for path in (".venv/bin/python", "demo/bids", "work/x", ".git/HEAD",
                 "bids_cadiff/__pycache__/x.pyc", "bids_cadiff/models/__pycache__/y.pyc"):
        assert _ignored(path, patterns), path
    for path in ("bids_cadiff/data/cadiff-default.pt", "bids_cadiff/__init__.py", "scripts/install.sh",
                 "pyproject.toml", "constraints.txt", "tests/test_containers.py",
                 "Dockerfile", ".circleci/config.yml", "scripts/slurm/cadiff_array.sbatch"):
        assert not _ignored(path, patterns), path


# --------------------------------------------------------------------------- Singularity.def


def _def_sections(text: str) -> tuple[dict[str, str], dict[str, str]]:
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        if line.startswith("%"):
            current = line[1:].split()[0]
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
        elif ":" in line and not line.startswith("#"):
            key, _, value = line.partition(":")
            header[key.strip()] = value.strip()
    return header, {k: "\n".join(v) for k, v in sections.items()}


def test_singularity_def_builds_from_the_pushed_image() -> None:
    header, sections = _def_sections(SINGULARITY.read_text())
    assert header["Bootstrap"] == "docker"
    image, _, tag = header["From"].partition(":")
    assert image == IMAGE_NAME
    assert tag == "latest" or re.fullmatch(r"\d+\.\d+\.\d+\S*", tag), tag
    assert 'exec bids_cadiff "$@"' in sections["runscript"]
    assert "bids_cadiff --version" in sections.get("test", "")
    assert "apptainer run --nv --cleanenv" in sections["help"]
    assert "-B /data:/data:ro" in sections["help"] and "-B /out:/out" in sections["help"]
    assert "org.opencontainers.image.source" in sections["labels"]
    # the Docker image it starts from is the one built by install.sh
    assert "scripts/install.sh" in SINGULARITY.read_text()


def test_singularity_environment_caches_under_tmp() -> None:
    _, sections = _def_sections(SINGULARITY.read_text())
    exported = dict(
        m.groups() for m in re.finditer(r"^\s*export\s+(\w+)=(\S+)", sections["environment"], re.M)
    )
    # HOME is Apptainer's to set; every other cache is restated
    for var in set(CACHE_VARS) - {"HOME"}:
        assert var in exported, var
        assert exported[var] == "/tmp" or exported[var].startswith("/tmp/"), var


# --------------------------------------------------------------------------- CircleCI


@pytest.fixture(scope="module")
def circleci() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(CIRCLECI.read_text())


def _commands(job: dict) -> str:
    out = []
    for step in job["steps"]:
        if isinstance(step, dict) and "run" in step:
            run = step["run"]
            out.append(run if isinstance(run, str) else run["command"])
    return "\n".join(out)


def test_circleci_jobs(circleci: dict) -> None:
    assert circleci["version"] == 2.1
    jobs = circleci["jobs"]
    assert {"build", "test", "deploy"} <= jobs.keys()
    executor = circleci["executors"][jobs["build"]["executor"]]
    build = _commands(jobs["build"])
    assert executor["machine"].get("docker_layer_caching") or "--cache-from" in build
    assert "docker build" in build and "--build-arg VERSION=" in build
    assert "bids_cadiff/__init__.py" in build  # VERSION read from the package


def _docker_runs(job: dict) -> list[str]:
    """Every ``docker run`` command line of a job, continuations joined, whitespace normalised."""
    lines = _commands(job).replace("\\\n", " ").splitlines()
    return [" ".join(ln.split()) for ln in lines if ln.strip().startswith("docker run")]


def test_circleci_test_job_runs_read_only(circleci: dict) -> None:
    runs = _docker_runs(circleci["jobs"]["test"])
    assert runs and all("--read-only --tmpfs /tmp" in r for r in runs), runs
    assert any("-m pytest" in r for r in runs)
    assert any(r.endswith("--version") for r in runs)
    assert any(" /data /out participant" in r for r in runs)
    assert any(" /data /out group" in r for r in runs)
    # the input dataset is mounted read-only wherever the app runs on it
    assert all("/data:ro" in r for r in runs if " /data /out " in r)


def test_circleci_deploy(circleci: dict) -> None:
    deploy = _commands(circleci["jobs"]["deploy"])
    assert "$DOCKER_USER" in deploy and "$DOCKER_PASS" in deploy
    for tag in ("unstable", "latest", "CIRCLE_TAG"):
        assert tag in deploy
    workflow = next(iter(circleci["workflows"].values()))
    jobs = {name: spec for entry in workflow["jobs"] for name, spec in entry.items()}
    # a tag runs deploy only if every job it requires also runs on tags
    for name in ("build", "test", "deploy"):
        assert "only" in jobs[name]["filters"]["tags"], name
    assert re.fullmatch(jobs["deploy"]["filters"]["tags"]["only"].strip("/"), "v0.1.0")
    assert jobs["deploy"]["filters"]["branches"]["only"] == "main"
    assert jobs["deploy"]["context"]
    assert jobs["deploy"]["requires"] == ["test"]


# --------------------------------------------------------------------------- SLURM


SBATCH = sorted(SLURM.glob("*.sbatch"))


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_sbatch_scripts_parse(script: Path) -> None:
    assert {"cadiff_array.sbatch", "cadiff_group.sbatch"} <= {p.name for p in SBATCH}
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert "#SBATCH" in script.read_text()


def _sbatch_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(BIDS_DIR=str(tmp_path / "ds"), OUTPUT_DIR=str(tmp_path / "out"),
               CADIFF_SIF=str(tmp_path / "x.sif"), CADIFF_DRY_RUN="1",
               CADIFF_SCRATCH=str(tmp_path / "scratch"))
    env.update(extra)
    return env


def _run_array(tmp_path: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SLURM / "cadiff_array.sbatch"), *args], env=_sbatch_env(tmp_path, **extra),
        capture_output=True, text=True, timeout=30, check=False,
    )


def test_array_lists_participants_from_tsv_or_folders(tmp_path: Path) -> None:
    for sub in ("10", "02", "01"):
        (tmp_path / "ds" / f"sub-{sub}").mkdir(parents=True)
    assert _run_array(tmp_path, "--list").stdout.split() == ["01", "02", "10"]
    assert _run_array(tmp_path, "--count").stdout.strip() == "3"
    (tmp_path / "ds" / "participants.tsv").write_text(
        "age\tparticipant_id\n30\tsub-10\r\n20\tsub-01\r\n"
    )
    assert _run_array(tmp_path, "--list").stdout.split() == ["10", "01"]


def test_array_task_runs_nth_participant(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "participants.tsv").write_text("participant_id\nsub-a\nsub-b\n")
    gpu = _run_array(tmp_path, SLURM_ARRAY_TASK_ID="2", CUDA_VISIBLE_DEVICES="0",
                     CADIFF_ARGS="--seed 3 -v")
    assert gpu.returncode == 0, gpu.stderr
    cmd = shlex.split(gpu.stdout)
    assert cmd[:3] == ["apptainer", "run", "--nv"]
    assert "--cleanenv" in cmd
    assert cmd[cmd.index("--participant_label") + 1] == "b"
    assert f"{tmp_path / 'ds'}:/data:ro" in cmd
    assert f"{tmp_path / 'scratch' / 'cadiff_sub-b'}:/tmp" in cmd
    assert cmd[-3:] == ["--seed", "3", "-v"]
    assert not (tmp_path / "scratch" / "cadiff_sub-b").exists()  # cleaned up on exit

    cpu = _run_array(tmp_path, SLURM_ARRAY_TASK_ID="1", CUDA_VISIBLE_DEVICES="NoDevFiles")
    assert cpu.returncode == 0, cpu.stderr
    assert "--nv" not in shlex.split(cpu.stdout)
    assert shlex.split(cpu.stdout)[shlex.split(cpu.stdout).index("--participant_label") + 1] == "a"

    out_of_range = _run_array(tmp_path, SLURM_ARRAY_TASK_ID="3")
    assert out_of_range.returncode == 2
    assert "--array=1-2" in out_of_range.stderr


def test_array_default_scratch_is_per_job(tmp_path: Path) -> None:
    (tmp_path / "ds" / "sub-01").mkdir(parents=True)
    env = _sbatch_env(tmp_path, SLURM_ARRAY_TASK_ID="1", SLURM_TMPDIR=str(tmp_path / "local"))
    del env["CADIFF_SCRATCH"]
    proc = subprocess.run(["bash", str(SLURM / "cadiff_array.sbatch")], env=env,
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"{tmp_path / 'local' / 'cadiff_sub-01'}:/tmp" in shlex.split(proc.stdout)


def test_group_script_dry_run(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "out").mkdir()
    proc = subprocess.run(["bash", str(SLURM / "cadiff_group.sbatch")],
                          env=_sbatch_env(tmp_path), capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout)
    assert "--nv" not in cmd
    assert cmd[-5:-2] == ["/data", "/out", "group"]


# --------------------------------------------------------------------------- docs


def test_docs_show_the_commands() -> None:
    hpc = (REPO / "docs" / "hpc.md").read_text()
    assert "sbatch --dependency=afterok:" in hpc and "--array=1-" in hpc
    containers = (REPO / "docs" / "containers.md").read_text()
    commands = [" ".join(ln.split()) for ln in containers.replace("\\\n", " ").splitlines()]
    runs = [c for c in commands if c.startswith("docker run") and " /data /out " in c]
    assert runs and all("-u $(id -u):$(id -g) --read-only --tmpfs /tmp" in c for c in runs)
    assert "apptainer run --nv --cleanenv" in containers


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shell_scripts_pass_shellcheck() -> None:
    scripts = [*SBATCH, REPO / "scripts" / "install.sh"]
    subprocess.run(["shellcheck", "-S", "warning", *map(str, scripts)], check=True)


def _fake_train_env(tmp_path: Path) -> dict[str, str]:
    """A PATH whose ``cadiff-train`` waits for USR1 (then exits 138 as the real one does after
    its checkpoint) and whose ``scontrol`` records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "cadiff-train").write_text(
        "#!/bin/bash\necho \"$@\" > \"$TRAIN_DIR/args\"\ntrap 'exit 138' USR1\n"
        "touch \"$TRAIN_DIR/started\"\nfor _ in $(seq 300); do sleep 0.1; done\nexit 0\n")
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho \"$@\" >> \"$TRAIN_DIR/scontrol\"\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "BIDS_DIR": str(tmp_path / "ds"),
            "LABELS_DIR": str(tmp_path / "labels"), "TRAIN_DIR": str(tmp_path / "run"),
            "SLURM_JOB_ID": "42", "TRAIN_ARGS": "--config recipe.toml"}


def test_train_job_forwards_the_warning_signal_and_requeues(tmp_path: Path) -> None:
    env = _fake_train_env(tmp_path)
    run = tmp_path / "run"
    job = subprocess.Popen(["bash", str(SLURM / "cadiff_train.sbatch")], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not (run / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # what SLURM sends five minutes before the time limit
    out, err = job.communicate(timeout=20)
    assert job.returncode == 0, err
    assert "requeueing job 42" in out
    assert (run / "scontrol").read_text().split() == ["requeue", "42"]
    assert (run / "args").read_text().split()[3:] == [
        "--resume", "auto", "--no-progress", "--config", "recipe.toml"]


def test_train_job_ends_the_chain_when_training_finishes(tmp_path: Path) -> None:
    env = _fake_train_env(tmp_path)
    (tmp_path / "bin" / "cadiff-train").write_text("#!/bin/bash\nexit 0\n")
    done = subprocess.run(["bash", str(SLURM / "cadiff_train.sbatch")], env=env,
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "run" / "scontrol").exists()
    (tmp_path / "bin" / "cadiff-train").write_text("#!/bin/bash\nexit 1\n")
    failed = subprocess.run(["bash", str(SLURM / "cadiff_train.sbatch")], env=env,
                            capture_output=True, text=True, timeout=30, check=False)
    assert failed.returncode == 1 and not (tmp_path / "run" / "scontrol").exists()


def test_train_job_runs_the_container_with_the_gpu(tmp_path: Path) -> None:
    env = _fake_train_env(tmp_path)
    env.update(CADIFF_SIF=str(tmp_path / "x.sif"), APPTAINER="apptainer", CADIFF_DRY_RUN="1",
               CUDA_VISIBLE_DEVICES="0", TRAIN_ARGS="--config recipe_*.toml")
    (tmp_path / "recipe_1.toml").touch()  # a file the pattern would match: it stays as given
    done = subprocess.run(["bash", str(SLURM / "cadiff_train.sbatch")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    cmd = shlex.split(done.stdout)
    assert cmd[:3] == ["apptainer", "exec", "--nv"] and str(tmp_path / "x.sif") in cmd
    assert cmd[cmd.index("cadiff-train") + 4:] == [
        "--resume", "auto", "--no-progress", "--config", "recipe_*.toml"]
