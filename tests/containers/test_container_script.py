"""scripts/test_container.sh: builds the Dockerfile and runs the image read-only as uid 1000.

The real build and run (minutes: a cold build here took about 10 min, see docs/containers.md)
is ``make container-test``, which .ci/run calls where podman can run. From pytest it runs only
with CADIFF_CONTAINER_TEST=1, so that ``make test`` does not build the image a second time; it
is skipped with the script's own reason (exit status 77) where the machine cannot build or run
containers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "test_container.sh"
SKIP = 77


def _skip_reason(output: str) -> str:
    lines = [ln for ln in output.splitlines() if "SKIP:" in ln]
    return lines[-1].split("SKIP:", 1)[1].strip() if lines else output.strip()[-300:]


def test_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert os.access(SCRIPT, os.X_OK)
    assert "container-test:" in (REPO / "Makefile").read_text()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_script_passes_shellcheck() -> None:
    subprocess.run(["shellcheck", "-S", "warning", str(SCRIPT)], check=True)


def test_script_skips_with_a_reason_without_an_engine(tmp_path: Path) -> None:
    env = {**os.environ, "CADIFF_CONTAINER_ENGINE": "no-such-engine-here", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == SKIP, proc.stdout + proc.stderr
    assert "SKIP:" in proc.stderr.splitlines()[-1]
    assert "no-such-engine-here is not installed" in _skip_reason(proc.stderr)
    assert not list(tmp_path.iterdir())  # its scratch folder is removed


def test_script_rejects_unknown_arguments() -> None:
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--variant", "tpu"], capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "--variant" in proc.stderr


@pytest.mark.slow
def test_container_builds_and_runs_read_only() -> None:
    if os.environ.get("CADIFF_CONTAINER_TEST") != "1":
        pytest.skip("the container build runs as `make container-test` (in .ci/run where podman "
                    "can run); CADIFF_CONTAINER_TEST=1 runs it here")
    proc = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, timeout=3600, check=False
    )
    output = proc.stdout + proc.stderr
    if proc.returncode == SKIP:
        pytest.skip(_skip_reason(proc.stderr))
    assert proc.returncode == 0, output[-6000:]
    assert "PASSED:" in proc.stdout
    # the measurements (build time, image size, run times): shown with pytest -rP
    print("\n".join(ln for ln in proc.stdout.splitlines() if ln.startswith("test_container.sh:")))
