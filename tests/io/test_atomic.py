"""atomic_write: all or nothing, no temporary files left."""

from __future__ import annotations

import pytest

from bids_cadiff.io.atomic import atomic_open, atomic_path, atomic_write


def test_text_bytes_callable(tmp_path):
    assert atomic_write(tmp_path / "a.txt", "x\ny\n").read_text() == "x\ny\n"
    assert atomic_write(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    atomic_write(tmp_path / "c.txt", lambda p: p.write_text("cb"))
    assert (tmp_path / "c.txt").read_text() == "cb"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.txt"]


def test_creates_parents_and_replaces(tmp_path):
    target = tmp_path / "d" / "e" / "f.json"
    atomic_write(target, "1")
    atomic_write(target, "2")
    assert target.read_text() == "2"


def test_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "x.nii.gz"
    target.write_text("old")

    def fail(path):
        path.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]


def test_temp_keeps_extension(tmp_path):
    with atomic_path(tmp_path / "img.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
        tmp.write_text("z")


def test_atomic_open(tmp_path):
    with atomic_open(tmp_path / "t.tsv", "w", encoding="utf-8") as fh:
        fh.write("a\tb\n")
    assert (tmp_path / "t.tsv").read_text() == "a\tb\n"
    with pytest.raises(ValueError):
        with atomic_open(tmp_path / "t.tsv", "a"):
            pass
