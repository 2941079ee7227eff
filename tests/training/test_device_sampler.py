"""Patches drawn on the training device (the GPU recipe's sampler), run here on the CPU: the
same contract as the CPU sampler (tests/training/test_sampler.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_cadiff.labels import SYNTHSEG32
from bids_cadiff.training.device_sampler import DevicePatchSampler
from bids_cadiff.training.sampler import SamplingSettings
from bids_cadiff.training.synth import BRAIN_VALUES
from tests.training.test_sampler import (
    PATCH,
    assert_real_patches_are_the_apps_input,
    head,
    item,
    one_voxel_structure,
    where,
)


def plain(**changes) -> SamplingSettings:
    """No augmentation, no spatial transform: the patch as cut."""
    return SamplingSettings(**{"mode": "mixed", "on_device": True, "augment": False,
                               "affine_prob": 0.0, "elastic": False, **changes})


def sampler(items, settings: SamplingSettings, **kw) -> DevicePatchSampler:
    return DevicePatchSampler(items, patch_size=PATCH, batch_size=kw.pop("batch_size", 2),
                              seed=kw.pop("seed", 0), settings=settings, **kw)


def test_real_patches_are_exactly_the_apps_input():
    raw, mask, values, distance = head()
    draw = sampler([item(raw, mask, values, distance)], plain(real_fraction=1.0))
    patches = ((out["image"][b, 0].numpy(), out["distance"][b].numpy(), out["label"][b, 0].numpy())
               for out in (draw.batch(n) for n in range(20)) for b in range(2))
    # the distance field encodes each voxel's position, so this also checks that a patch is an
    # axis-aligned crop in the volume's axis order; grid_sample rounds whole-voxel positions
    # by about 2e-6
    assert_real_patches_are_the_apps_input(patches, raw, mask, values, atol=1e-5)


def test_batch_n_is_a_pure_function_of_seed_rank_and_n():
    raw, mask, values, distance = head()
    items = [item(raw, mask, values, distance)]
    settings = SamplingSettings(mode="mixed", on_device=True, real_fraction=0.5,
                                field_jitter=1.5)
    a, b = sampler(items, settings, seed=3), sampler(items, settings, seed=3)
    for n in (5, 0, 7, 5):  # any order: a resumed run draws what an unbroken run drew
        for key in ("image", "distance", "label"):
            torch.testing.assert_close(a.batch(n)[key], b.batch(n)[key], rtol=0, atol=0)
    assert not torch.equal(a.batch(0)["image"], sampler(items, settings, seed=3,
                                                        rank=1).batch(0)["image"])
    assert [list(x["label"].shape) for x in a.batches(2, 4)] == [[2, 1, *PATCH]] * 2
    out = a.batch(1)
    assert out["image"].shape == (2, 1, *PATCH) and out["image"].dtype == torch.float32
    assert out["distance"].shape == (2, 3, *PATCH) and out["label"].dtype == torch.int64
    assert 0 <= float(out["image"].min()) and float(out["image"].max()) <= 1
    assert 0 <= float(out["distance"].min()) and float(out["distance"].max()) <= 1


def test_synthesised_images_follow_the_labels_and_drop_the_skull_when_asked():
    raw, mask, values, distance = head()
    values = values.copy()
    values[~mask & (raw > 0)] = 258  # scalp: an extra-cerebral value (intensity, no target)
    stand_in = item(raw, mask, values, distance, real=False)
    both, ordered, spread = 0, 0, []
    for skull in (True, False):
        draw = sampler([stand_in], plain(real_fraction=0.0, skull_fraction=float(skull)))
        for n in range(6):
            out = draw.batch(n)
            for b in range(2):
                image, dist = out["image"][b, 0].numpy(), out["distance"][b].numpy()
                box = where(dist)
                if values[box].shape != PATCH:
                    continue
                patch_values = values[box]
                scalp = patch_values == 258
                if not skull:
                    assert np.all(image[~np.isin(patch_values, list(BRAIN_VALUES))] == 0)
                elif scalp.sum() > 20:  # the scalp is drawn too
                    assert (image[scalp] > 0).mean() > 0.5
                wm, lv = image[patch_values == 2], image[patch_values == 4]
                spread += [x.std() for x in (wm, lv) if x.size > 20]
                if wm.size > 20 and lv.size > 20:  # drawn where the labels are: T1w-like
                    both += 1  # contrasts (70 % of draws) put white matter above ventricle
                    ordered += int(np.median(wm) > np.median(lv))
    assert both >= 4 and ordered >= both / 2
    # one Gaussian per value and a smooth bias field: tight within a structure, mostly (a
    # contrast with all means close is stretched by the normalisation; the CPU sampler's
    # median spread on this map is 0.07, this one's 0.06)
    assert np.median(spread) < 0.15


def test_class_balanced_centres_reach_small_structures():
    one, small = one_voxel_structure()
    counts = {}
    for fraction in (0.0, 1.0):
        draw = sampler([one], plain(real_fraction=1.0, balanced_fraction=fraction))
        counts[fraction] = sum(int((draw.batch(n)["label"][b] == small).any())
                               for n in range(30) for b in range(2))
    assert counts[1.0] >= 8 and counts[1.0] > counts[0.0] + 5


def test_field_jitter_moves_the_field_and_nothing_else():
    raw, mask, values, distance = head()
    items = [item(raw, mask, values, distance)]
    still = sampler(items, plain(real_fraction=1.0))
    jittered = sampler(items, plain(real_fraction=1.0, field_jitter=3.0))
    moved = 0
    for n in range(4):
        a, b = still.batch(n), jittered.batch(n)
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
        torch.testing.assert_close(a["label"], b["label"], rtol=0, atol=0)
        interior = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
        moved += int(not torch.allclose(a["distance"][interior], b["distance"][interior],
                                        atol=1e-4))
    assert moved >= 3


def test_spatial_augmentation_moves_image_field_and_labels_together():
    raw, mask, values, distance = head()
    draw = sampler([item(raw, mask, values, distance)],
                   plain(real_fraction=1.0, affine_prob=1.0, rotate=0.3, elastic=True))
    lv = SYNTHSEG32.value_to_index(np.array([4]))[0]
    dark, bright, turned = [], [], 0
    for n in range(6):
        out = draw.batch(n)
        images, labels, dist = out["image"], out["label"], out["distance"]
        dark.append(images[labels == lv])
        bright.append(images[(labels > 0) & (labels != lv)])
        # the field's position code no longer steps by one voxel along the first axis
        step = (dist[:, 0, 1:] - dist[:, 0, :-1]) * 100
        turned += int(float((step - 1).abs().mean()) > 0.02)
    dark, bright = torch.cat(dark), torch.cat(bright)
    assert dark.numel() and float(dark.mean()) < float(bright.mean())
    assert turned >= 4


def test_augmented_batches_stay_in_range():
    raw, mask, values, distance = head()
    items = [item(raw, mask, values, distance), item(raw, mask, values, distance, real=False)]
    draw = sampler(items, SamplingSettings(mode="mixed", on_device=True, field_jitter=1.5))
    for n in range(6):
        out = draw.batch(n)
        assert torch.isfinite(out["image"]).all()
        assert 0 <= float(out["image"].min()) and float(out["image"].max()) <= 1
        assert int(out["label"].max()) < SYNTHSEG32.num_classes


def test_checks_its_items_and_settings():
    raw, mask, values, distance = head()
    with pytest.raises(ValueError, match="at least one"):
        sampler([], plain())
    label_only = item(raw, mask, values, distance)
    label_only.values = None
    with pytest.raises(ValueError, match="synthesise"):
        sampler([label_only], plain(real_fraction=0.7))
    with pytest.raises(ValueError, match="mixed"):
        SamplingSettings(mode="patches", on_device=True)
