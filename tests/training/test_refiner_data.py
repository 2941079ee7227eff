"""Training data of the 1 mm refiner: simulated coarse probabilities, volumes, patches."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bids_cadiff.labels import SYNTHSEG32
from bids_cadiff.training.refiner_data import (
    CoarseSimulation,
    RefinerPatches,
    load_label_map_volume,
    load_real_volume,
    simulate_coarse,
    synthesize_patch,
)

C = SYNTHSEG32.num_classes


def _head(shape: tuple[int, int, int] = (40, 44, 36)) -> np.ndarray:
    """FreeSurfer values: a head (skull value 165 around), white matter, left and right
    thalamus, lateral ventricles, extra-cerebral CSF."""
    v = np.zeros(shape, np.int32)
    v[4:-4, 4:-4, 4:-4] = 165
    v[8:-8, 8:-8, 8:-8] = 24
    v[10:-10, 10:-10, 10:-10] = 2
    mid = shape[0] // 2
    v[mid:-10, 10:-10, 10:-10] = 41
    v[12:mid - 2, 16:24, 14:20] = 10
    v[mid + 2:-12, 16:24, 14:20] = 49
    v[14:mid - 2, 26:30, 14:20] = 4
    return v


def _save(path: Path, data: np.ndarray, zoom: float = 1.0) -> Path:
    affine = np.diag([-zoom, zoom, zoom, 1.0])  # LAS: not RAS, to exercise the reorientation
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_simulated_probabilities_sum_to_one_and_mostly_keep_the_labels() -> None:
    index = SYNTHSEG32.value_to_index(_head(), merge=None).astype(np.int16)
    rng = np.random.default_rng(0)
    probs = simulate_coarse(index, C, rng, CoarseSimulation())
    assert probs.shape == (C, *index.shape) and probs.dtype == np.float32
    assert np.allclose(probs.sum(0), 1, atol=1e-5)
    agree = (probs.argmax(0) == index).mean()
    assert 0.6 < agree < 1.0  # degraded, but still the same anatomy


def test_without_degradation_the_simulation_is_partial_volume_on_the_coarse_grid() -> None:
    index = np.zeros((8, 8, 8), np.int16)
    index[:4] = 3
    sim = CoarseSimulation(deformation=0, blur=(0, 0), temperature=(1, 1), class_bias=0)
    probs = simulate_coarse(index, C, np.random.default_rng(0), sim)
    assert np.array_equal(probs.argmax(0), index)


def test_patch_sizes_must_divide_by_the_factor() -> None:
    with pytest.raises(ValueError, match="divisible"):
        simulate_coarse(np.zeros((5, 6, 6), np.int16), C, np.random.default_rng(0), CoarseSimulation())


def test_real_volume_is_normalised_over_its_brain(tmp_path: Path) -> None:
    values = _head()
    image = np.where(values == 2, 110.0, np.where(values > 0, 60.0, 5.0)).astype(np.float32)
    vol = load_real_volume(_save(tmp_path / "t1.nii.gz", image), _save(tmp_path / "aseg.nii.gz", values),
                           SYNTHSEG32, margin=2)
    assert vol.real and vol.image is not None and vol.stripped is not None
    assert vol.image.max() == 1.0 and vol.stripped.max() == 1.0
    # skull and extra-cerebral CSF (not a structure in aseg's convention) are gone when stripped
    assert vol.stripped[vol.index == 0].max() <= 1.0
    assert (vol.stripped == 0).sum() > (vol.image == 0).sum()
    assert set(np.unique(vol.index)) >= {0, SYNTHSEG32.value_to_index(np.array([10]))[0]}


def test_images_on_another_grid_are_refused_with_the_fix(tmp_path: Path) -> None:
    values = _head()
    t1 = _save(tmp_path / "t1.nii.gz", values.astype(np.float32), zoom=2.0)
    with pytest.raises(ValueError, match="resample it to 1 mm"):
        load_real_volume(t1, _save(tmp_path / "aseg.nii.gz", values, zoom=2.0), SYNTHSEG32)


def test_label_map_targets_drop_extracerebral_csf(tmp_path: Path) -> None:
    vol = load_label_map_volume(_save(tmp_path / "map.nii.gz", _head()), SYNTHSEG32, margin=2)
    assert not vol.real and vol.values is not None
    csf = SYNTHSEG32.value_to_index(np.array([24]))[0]
    assert not (vol.index == csf).any() and (vol.values == 24).any()
    assert 24 not in vol.brain_counts and 2 in vol.brain_counts


def test_synthesised_patch_is_normalised_like_the_whole_volume() -> None:
    values = _head()
    brain = values[np.isin(values, [2, 41, 10, 49, 4])]
    present, counts = np.unique(brain, return_counts=True)
    rng = np.random.default_rng(3)
    out = synthesize_patch(values[:20], dict(zip(present.tolist(), counts.tolist())), rng, skull=True)
    assert out.shape == (20, 44, 36) and out.min() >= 0 and out.max() <= 1
    stripped = synthesize_patch(values, dict(zip(present.tolist(), counts.tolist())),
                                np.random.default_rng(3), skull=False)
    assert np.median(stripped[values == 165]) < 0.05  # no skull


def test_patches_are_a_pure_function_of_seed_and_index(tmp_path: Path) -> None:
    values = _head()
    image = np.where(values > 0, 80.0, 0.0).astype(np.float32)
    real = load_real_volume(_save(tmp_path / "t1.nii.gz", image), _save(tmp_path / "a.nii.gz", values), SYNTHSEG32)
    maps = [load_label_map_volume(_save(tmp_path / "m.nii.gz", values), SYNTHSEG32)]
    ds = RefinerPatches([real], maps, num_classes=C, patch=16, length=10, sim=CoarseSimulation(), seed=4)
    a, b = ds[3], ds[3]
    assert a["input"].shape == (1 + C, 16, 16, 16) and a["target"].shape == (1, 16, 16, 16)
    assert torch.equal(a["input"], b["input"]) and torch.equal(a["target"], b["target"])
    assert not torch.equal(ds[4]["input"], a["input"])
    assert torch.allclose(a["input"][1:].sum(0), torch.ones(16, 16, 16), atol=1e-4)
    assert (a["target"] > 0).any()
