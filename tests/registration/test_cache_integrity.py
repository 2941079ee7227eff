"""The registration cache trusts only complete, intact entries (issue #15, killed runs).

An entry is a folder published by one atomic rename, with ``registration.json`` holding the
sha256 of every transform and a checksum of itself. A truncated or bit-flipped transform, a
damaged or missing ``registration.json``, or an entry of an older version is detected: a
warning, the entry removed, the registration recomputed (never a crash, never a wrong
transform used).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_cadiff.registration import ants as ants_mod
from bids_cadiff.registration.ants import RegistrationParams, register_atlas
from bids_cadiff.registration.atlas import AtlasSpec
from tests.registration.conftest import make_phantom


def _subject() -> nib.Nifti1Image:
    data, _, affine = make_phantom(skull=False, shift_mm=(4.0, -6.0, 3.0))
    return nib.Nifti1Image(data, affine)


@pytest.fixture(scope="module")
def clean_cache(phantom_atlas: AtlasSpec, tmp_path_factory: pytest.TempPathFactory):
    """A cache holding one intact affine entry of :func:`_subject`, and its registration."""
    folder = tmp_path_factory.mktemp("clean_cache")
    reg = register_atlas(_subject(), phantom_atlas, cache_dir=folder, type_of_transform="Affine")
    return folder, reg


def _copy_cache(clean_cache, to: Path):
    """A private copy of the clean cache in ``to``; returns the entry folder and the original
    registration."""
    folder, reg = clean_cache
    entry = reg.forward_transforms[0].parent
    shutil.copytree(entry, to / entry.name)
    return to / entry.name, reg


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts ANTs runs (``_run_ants`` calls)."""
    calls: list[int] = []
    real = ants_mod._run_ants

    def run(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ants_mod, "_run_ants", run)
    return calls


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))


def _flip_quality(path: Path) -> None:
    """Valid JSON, another quality value: only the checksum can tell."""
    meta = json.loads(path.read_text())
    meta["quality"] = meta["quality"] + 0.25
    path.write_text(json.dumps(meta))


def _drop_checksums(path: Path) -> None:
    """An entry as bids_cadiff wrote it before the checksums."""
    meta = json.loads(path.read_text())
    del meta["sha256"], meta["checksum"]
    path.write_text(json.dumps(meta))


DAMAGE = {
    "truncated transform": ("0_affine.mat", _truncate),
    "bit-flipped transform": ("0_affine.mat", _flip_bit),
    "missing transform": ("0_affine.mat", Path.unlink),
    "truncated registration.json": ("registration.json", _truncate),
    "registration.json with another quality": ("registration.json", _flip_quality),
    "missing registration.json": ("registration.json", Path.unlink),
    "entry of an older version": ("registration.json", _drop_checksums),
}


@pytest.mark.parametrize("what", list(DAMAGE))
def test_damaged_entry_is_recomputed_with_a_warning(
    phantom_atlas: AtlasSpec, clean_cache, tmp_path: Path, counting: list[int], caplog, what: str
) -> None:
    fixed = _subject()
    entry, first = _copy_cache(clean_cache, tmp_path)
    intact = first.forward_transforms[0].read_bytes()
    name, damage = DAMAGE[what]
    damage(entry / name)

    again = register_atlas(fixed, phantom_atlas, cache_dir=tmp_path, type_of_transform="Affine")
    assert len(counting) == 1, "the damaged entry was trusted"
    assert not again.cached
    assert "cannot be trusted" in caplog.text and "recomputed" in caplog.text
    assert again.forward_transforms == (entry / "0_affine.mat",)  # the same key, republished
    # recomputed: the same registration up to ITK's multi-threaded sums (see --reproducible)
    assert again.quality == pytest.approx(first.quality, abs=0.03)
    assert len(again.forward_transforms[0].read_bytes()) == len(intact)
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]  # nothing else left behind

    caplog.clear()
    third = register_atlas(fixed, phantom_atlas, cache_dir=tmp_path, type_of_transform="Affine")
    assert third.cached and len(counting) == 1 and "cannot be trusted" not in caplog.text


def test_intact_copy_is_trusted(phantom_atlas: AtlasSpec, clean_cache, tmp_path: Path,
                                counting: list[int]) -> None:
    entry, first = _copy_cache(clean_cache, tmp_path)
    again = register_atlas(_subject(), phantom_atlas, cache_dir=tmp_path, type_of_transform="Affine")
    assert again.cached and not counting and again.quality == first.quality


def test_entry_that_is_a_file_is_replaced(phantom_atlas: AtlasSpec, clean_cache, tmp_path: Path,
                                          counting: list[int]) -> None:
    entry = tmp_path / clean_cache[1].forward_transforms[0].parent.name
    entry.write_bytes(b"\0" * 10)  # e.g. a file system repair leaving junk under the name
    again = register_atlas(_subject(), phantom_atlas, cache_dir=tmp_path,
                           type_of_transform="Affine")
    assert len(counting) == 1 and not again.cached and entry.is_dir()


def test_publishing_second_uses_the_first_entry(clean_cache, tmp_path: Path) -> None:
    """Two processes registering the same image: the second to finish keeps the first's
    entry (and says so) instead of failing on the non-empty target."""
    entry, first = _copy_cache(clean_cache, tmp_path)
    late = tmp_path / ".tmp-late"
    late.mkdir()
    (late / "0_affine.mat").write_bytes(b"another process's transform")
    theirs = ants_mod._publish(late, entry, RegistrationParams(type_of_transform="Affine"))
    assert theirs is not None and theirs.cached and theirs.quality == first.quality
    assert theirs.forward_transforms == (entry / "0_affine.mat",)
    assert not late.exists()

    # a broken entry in the way is discarded, and the new one published
    (entry / "registration.json").write_text("{")
    late.mkdir()
    (late / "x").write_text("new")
    assert ants_mod._publish(late, entry, RegistrationParams(type_of_transform="Affine")) is None
    assert (entry / "x").read_text() == "new"


def test_temporaries_of_killed_registrations_are_removed_when_stale(
    phantom_atlas: AtlasSpec, tmp_path: Path
) -> None:
    stale, fresh = tmp_path / ".tmp-killed", tmp_path / ".tmp-running"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "affine_0GenericAffine.mat").write_bytes(b"partial")
    old = time.time() - ants_mod.STALE_TMP_SECONDS - 60
    os.utime(stale, (old, old))
    register_atlas(_subject(), phantom_atlas, cache_dir=tmp_path, type_of_transform="Affine")
    assert not stale.exists() and fresh.exists()  # another process may still be using it


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_truncate, _flip_bit], ids=["truncated", "bit-flipped"])
def test_damaged_syn_warp_is_recomputed(phantom_atlas: AtlasSpec, tmp_path: Path,
                                        counting: list[int], damage) -> None:
    fixed = _subject()
    first = register_atlas(fixed, phantom_atlas, cache_dir=tmp_path)
    warp = first.forward_transforms[0]
    assert warp.name == "1_warp.nii.gz"
    damage(warp)
    again = register_atlas(fixed, phantom_atlas, cache_dir=tmp_path)
    assert not again.cached and len(counting) == 2
    assert np.isfinite(nib.load(again.forward_transforms[0]).get_fdata()).all()
