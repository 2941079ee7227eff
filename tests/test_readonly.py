"""The app writes only where it is told: OUTPUT_DIR, the work dir and $TMPDIR.

The container runs with a read-only root filesystem (``docker run --read-only --tmpfs /tmp``)
and every cache variable pointed under /tmp (Dockerfile ``ENV``). Here, without a container
engine, :func:`run_readonly` runs the app as a subprocess with HOME and every cache variable
pointed into a directory that must stay unchanged, and a fresh empty current directory that must
stay empty. We run as root in CI, where ``chmod`` does not stop a write, so the check is a
snapshot (paths, sizes, mtimes) taken before and after the run, not a permission error.

A participant-level end-to-end test calls :func:`run_readonly` with a real tiny run.
"""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import pytest

import bids_cadiff

#: Variables the container points under /tmp (Dockerfile ENV), here into the read-only dir.
CACHE_VARS: tuple[str, ...] = (
    "HOME",
    "XDG_CACHE_HOME",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
    "XDG_STATE_HOME",
    "MPLCONFIGDIR",
    "TORCH_HOME",
    "TORCHINDUCTOR_CACHE_DIR",
    "TRITON_CACHE_DIR",
    "CUDA_CACHE_PATH",
    "NILEARN_DATA",
    "NUMBA_CACHE_DIR",
    "DENO_DIR",
    "HF_HOME",
)

#: Set as in the container: no bytecode written next to the installed package.
FIXED_ENV: Mapping[str, str] = {
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    "MPLBACKEND": "Agg",
    "HF_HUB_OFFLINE": "1",
}

PACKAGE_DIR = Path(bids_cadiff.__file__).resolve().parent

Snapshot = dict[str, tuple[int, int]]


def snapshot(root: Path) -> Snapshot:
    """Every path under ``root`` (itself included) mapped to (size, mtime_ns); links not followed."""
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            path = Path(dirpath) / name
            st = path.lstat()
            size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
            out[str(path.relative_to(root))] = (size, st.st_mtime_ns)
    return out


def _diff(before: Snapshot, after: Snapshot) -> list[str]:
    changes = [f"+ {p}" for p in sorted(after.keys() - before.keys())]
    changes += [f"- {p}" for p in sorted(before.keys() - after.keys())]
    changes += [f"~ {p}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    return changes


def run_readonly(
    args: Sequence[str],
    writable_dirs: Sequence[Path],
    *,
    root: Path | None = None,
    unchanged_dirs: Sequence[Path] = (),
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``args`` with every cache and HOME in a read-only dir; fail if it wrote outside.

    Layout under ``root`` (e.g. pytest's ``tmp_path``; by default a temporary directory removed
    afterwards):
    ``readonly/`` holds HOME and the cache variables of :data:`CACHE_VARS` (mode 0o555),
    ``cwd/`` is the current directory (mode 0o555, must stay empty), ``tmp/`` is $TMPDIR.
    Besides ``readonly/`` and ``cwd/``, the installed package directory must stay unchanged
    (no weights converted, no caches next to the model, no bytecode).

    Args:
        args: the command line, e.g. ``[sys.executable, "-m", "bids_cadiff.cli.run", ...]``.
        writable_dirs: where the run may write (OUTPUT_DIR, the work dir); they are neither
            snapshotted nor checked, and must not lie inside ``root/readonly`` or ``root/cwd``.
        root: a directory for the layout above (its ``readonly``, ``cwd``, ``tmp`` must not exist).
        unchanged_dirs: more directories that must stay unchanged, e.g. the input BIDS dataset.
        timeout: seconds before the run is killed (``subprocess.TimeoutExpired``).

    Returns:
        The finished process (text output captured); its return code is the caller's to check.

    Raises:
        AssertionError: the run changed anything in ``readonly/``, ``cwd/``, the package or
            ``unchanged_dirs``.
    """
    if root is None:
        with tempfile.TemporaryDirectory(prefix="cadiff-readonly-") as tmp_root:
            return run_readonly(
                args, writable_dirs, root=Path(tmp_root), unchanged_dirs=unchanged_dirs,
                timeout=timeout,
            )
    readonly, cwd, tmp = root / "readonly", root / "cwd", root / "tmp"
    for d in (readonly, cwd, tmp):
        d.mkdir(parents=True)
    for w in writable_dirs:
        w = Path(w).resolve()
        if w.is_relative_to(readonly.resolve()) or w.is_relative_to(cwd.resolve()):
            raise ValueError(f"writable dir {w} lies inside a directory that must stay unchanged")

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"}
    env.update(FIXED_ENV)
    env["TMPDIR"] = str(tmp)
    # matplotlib (imported by MONAI and antspyx) builds its font cache in MPLCONFIGDIR and, when
    # that is not writable, in a temporary dir of its own; running as root here, "not writable"
    # cannot be made, so MPLCONFIGDIR goes under TMPDIR as in the container (Dockerfile ENV).
    env["MPLCONFIGDIR"] = str(tmp / "matplotlib")
    for var in CACHE_VARS:
        if var == "MPLCONFIGDIR":
            continue
        path = readonly if var == "HOME" else readonly / ".cache" / var.lower()
        path.mkdir(parents=True, exist_ok=True)
        env[var] = str(path)
    # Read-only for anyone but root; leaf directories first, then their parents.
    for dirpath, _, _ in sorted(os.walk(readonly), key=lambda t: -len(t[0])):
        os.chmod(dirpath, 0o555)
    os.chmod(cwd, 0o555)

    watched = {"readonly": readonly, "cwd": cwd, "package": PACKAGE_DIR}
    watched.update({str(d): Path(d) for d in unchanged_dirs})
    before = {name: snapshot(path) for name, path in watched.items()}
    try:
        proc = subprocess.run(
            list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL, check=False,
        )
    finally:
        for dirpath, _, _ in os.walk(readonly):
            os.chmod(dirpath, 0o755)  # so that pytest can clean tmp_path up
        os.chmod(cwd, 0o755)
    changes = [
        f"{name}: {change}"
        for name, path in watched.items()
        for change in _diff(before[name], snapshot(path))
    ]
    assert not changes, (
        f"{list(args)} wrote outside its output, work and temporary dirs "
        f"(point the writer at TMPDIR or the work dir):\n" + "\n".join(changes)
        + f"\nstderr:\n{proc.stderr[-2000:]}"
    )
    return proc


def _require_module(name: str) -> None:
    try:
        found = importlib.util.find_spec(name) is not None
    except ImportError:
        found = False
    if not found:
        pytest.skip(f"{name} is not written yet; this test runs once it exists")


def test_snapshot_sees_new_and_touched_files(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("x")
    before = snapshot(tmp_path)
    (tmp_path / "b").mkdir()
    (tmp_path / "a").write_text("xy")
    assert _diff(before, snapshot(tmp_path)) == ["+ b", "~ .", "~ a"]


def test_run_readonly_catches_a_write_to_home(tmp_path: Path) -> None:
    code = "import os, pathlib; pathlib.Path(os.environ['HOME'], 'stray').write_text('x')"
    with pytest.raises(AssertionError, match=r"readonly: \+ stray"):
        run_readonly([sys.executable, "-c", code], [], root=tmp_path)


def test_run_readonly_catches_a_write_to_cwd(tmp_path: Path) -> None:
    code = "open('stray.txt', 'w').write('x')"
    with pytest.raises(AssertionError, match=r"cwd: \+ stray.txt"):
        run_readonly([sys.executable, "-c", code], [], root=tmp_path)


def test_run_readonly_default_root_is_removed() -> None:
    proc = run_readonly([sys.executable, "-c", "import os; print(os.environ['TMPDIR'])"], [])
    assert proc.returncode == 0, proc.stderr
    assert not Path(proc.stdout.strip()).exists()


def test_run_readonly_allows_tmpdir_and_writable_dirs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    code = (
        "import pathlib, sys, tempfile\n"
        "tempfile.NamedTemporaryFile(delete=False).write(b'x')\n"
        "pathlib.Path(sys.argv[1], 'result').write_text('x')\n"
    )
    proc = run_readonly([sys.executable, "-c", code, str(out)], [out], root=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert (out / "result").is_file()
    assert list((tmp_path / "run" / "tmp").iterdir())


def test_version_writes_nothing(tmp_path: Path) -> None:
    _require_module("bids_cadiff.cli.run")
    proc = run_readonly(
        [sys.executable, "-m", "bids_cadiff.cli.run", "--version"], [], root=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert bids_cadiff.__version__ in proc.stdout + proc.stderr


@pytest.mark.slow
def test_participant_level_writes_only_output_and_work(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    _require_module("bids_cadiff.app.participant")
    _require_module("bids_cadiff.cli.run")
    inputs = request.getfixturevalue("phantom_app_inputs")
    bids_dir = inputs["bids"]
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    proc = run_readonly(
        [sys.executable, "-m", "bids_cadiff.cli.run", str(bids_dir), str(out), "participant",
         "-w", str(work), "--participant-label", "01", "02", "--model", str(inputs["model"]),
         "--atlas", str(inputs["atlas"]), "--skip-bids-validation"],
        [out, work],
        root=tmp_path / "run",
        unchanged_dirs=[bids_dir, inputs["model"].parent, inputs["atlas"].parent],
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "dataset_description.json").is_file()
