"""A full disk: a clear error, the image's outputs removed, the run's others unaffected.

OUTPUT_DIR is a small tmpfs (needs the right to mount one: root in a container or CI; the test
is skipped, saying why, elsewhere)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bids_cadiff.cli.run import main


@pytest.fixture
def small_disk(tmp_path):
    """A 96 KiB tmpfs: room for the dataset-level files, not for an image's outputs."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
    yield mount
    # lazily: a writer that failed may still hold its (deleted) file open until the traceback
    # that references it is collected
    subprocess.run(["umount", "--lazy", str(mount)], capture_output=True, timeout=30)


@pytest.mark.slow
def test_full_disk_fails_the_image_cleanly(phantom_app_inputs, small_disk, tmp_path, caplog):
    out = small_disk / "out"
    code = main([
        str(phantom_app_inputs["bids"]), str(out), "participant", "--participant-label", "01",
        "--model", str(phantom_app_inputs["model"]), "--atlas", str(phantom_app_inputs["atlas"]),
        "-w", str(tmp_path / "work"), "--skip-bids-validation", "--steps", "2",
    ])
    assert code == 1  # the image failed; the run went to its end
    assert "no space left on the device" in caplog.text and "rerun" in caplog.text
    assert "Traceback" not in caplog.text
    assert (out / "dataset_description.json").is_file()  # written before the disk filled
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert not [p for p in left if p.startswith("sub-01/")], left  # nothing of the image
    assert not [p for p in left if Path(p).name.startswith(".tmp")], left


def test_output_folder_that_cannot_be_written_is_a_usage_error(phantom_app_inputs, small_disk,
                                                               tmp_path, capsys):
    (small_disk / "filler").write_bytes(b"\0" * 96 * 1024)  # the disk is full from the start
    code = main([
        str(phantom_app_inputs["bids"]), str(small_disk / "out"), "participant",
        "--participant-label", "01", "--model", str(phantom_app_inputs["model"]),
        "--atlas", str(phantom_app_inputs["atlas"]), "-w", str(tmp_path / "work"),
        "--skip-bids-validation",
    ])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "cannot write to the output folder" in err and "free space" in err
