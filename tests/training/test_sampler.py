"""The default recipe's patch sampler: the network sees in training what it sees in the app."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_cadiff.imaging.preprocess import normalise_intensity
from bids_cadiff.labels import SYNTHSEG32
from bids_cadiff.training.sampler import PatchSampler
from bids_cadiff.training.synth import draw_intensities, mixture_range, synthesize

SHAPE = (40, 44, 36)
PATCH = (16, 16, 16)


def head(seed: int = 0):
    """A raw head: bright scalp (out of the brain's range), brain tissues 30-100 (any scale),
    the brain mask, FreeSurfer values, and a distance field that encodes each voxel's
    position (so a patch tells where it was cut)."""
    rng = np.random.default_rng(seed)
    raw = np.zeros(SHAPE, np.float32)
    raw[2:-2, 2:-2, 2:-2] = 250.0  # scalp and skull
    mask = np.zeros(SHAPE, bool)
    mask[6:-6, 6:-6, 6:-6] = True
    values = np.zeros(SHAPE, np.int16)
    values[mask] = 3  # cortex
    values[12:-12, 12:-12, 10:-10] = 2  # white matter
    values[18:-18, 18:-18, 14:-14] = 4  # lateral ventricle
    tissue = {3: 60.0, 2: 100.0, 4: 30.0}
    for v, m in tissue.items():
        raw[values == v] = m
    raw += rng.normal(0, 3, SHAPE).astype(np.float32) * (raw > 0)
    raw = np.clip(raw, 0, None)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")).astype(np.float32)
    distance = grid / 100.0
    return raw, mask, values, distance


def item(raw, mask, values, distance):
    return {"image": normalise_intensity(raw), "image_brain": normalise_intensity(raw * mask),
            "distance": distance, "values": values, "raw_labels": values.astype(np.int16),
            "mask": mask, "real": np.array(True)}


def where(distance_patch: np.ndarray) -> tuple[slice, ...]:
    start = np.rint(distance_patch[:, 0, 0, 0] * 100).astype(int)
    return tuple(slice(int(s), int(s) + p) for s, p in zip(start, PATCH))


def test_real_patches_are_exactly_the_apps_input():
    raw, mask, values, distance = head()
    sampler = PatchSampler([item(raw, mask, values, distance)], ["head"], 0, PATCH,
                           real_fraction=1.0, augment=False)
    # what the app feeds the network: the whole image normalised once, with skull or (a
    # skull-stripped input) the image times its brain mask
    app = {True: normalise_intensity(raw), False: normalise_intensity(raw * mask)}
    seen = {True: 0, False: 0}
    for _ in range(40):
        image, dist, labels = sampler.sample()
        box = where(dist)
        if image.shape != app[True][box].shape or not mask[box].any():
            continue
        # the draw took one of the two variants: the patch is exactly that variant's app input
        match = [skull for skull in (True, False) if np.allclose(image, app[skull][box], atol=1e-6)]
        assert len(match) == 1, "the patch is not the app's input of either variant"
        np.testing.assert_array_equal(labels, SYNTHSEG32.value_to_index(values[box]))
        seen[match[0]] += 1
    assert min(seen.values()) >= 3


def test_synthesised_patches_are_normalised_over_the_whole_map():
    # a patch holding only ventricle (dark in a T1w) stays dark: its normalisation comes from
    # the whole map (mostly brighter tissue), not from the patch (which would stretch it to 0-1)
    _, _, values, _ = head()
    present, n = np.unique(values, return_counts=True)
    counts = {int(v): int(c) for v, c in zip(present, n)}
    patch = np.full((8, 8, 8), 4, np.int16)
    means = [synthesize(patch, np.random.default_rng(s), skull=True, t1_like=1.0, counts=counts,
                        augment=False).mean() for s in range(10)]
    assert max(means) < 0.45
    whole = [synthesize(values, np.random.default_rng(s), skull=True, t1_like=1.0,
                        augment=False) for s in range(3)]
    assert all(0 <= w.min() and w.max() <= 1 for w in whole)


def test_mixture_range_matches_the_percentiles_of_a_drawn_volume():
    rng = np.random.default_rng(0)
    counts = {0: 5000, 2: 30000, 3: 20000, 4: 2000}
    intensities = draw_intensities(list(counts), rng, skull=True)
    voxels = np.concatenate([np.clip(rng.normal(*intensities[v], size=c), 0, None)
                             for v, c in counts.items() if v])
    lo, hi = mixture_range(counts, intensities, np.random.default_rng(1))
    want = np.percentile(voxels[voxels > 0], [0.5, 99.5])
    assert abs(lo - want[0]) < 0.02 and abs(hi - want[1]) < 0.02


def test_sampler_is_reproducible_and_checks_its_items():
    raw, mask, values, distance = head()
    items = [item(raw, mask, values, distance)]
    a = PatchSampler(items, ["h"], 3, PATCH, real_fraction=0.5, balanced_fraction=0.5)
    b = PatchSampler(items, ["h"], 3, PATCH, real_fraction=0.5, balanced_fraction=0.5)
    for _ in range(4):
        for x, y in zip(a.sample(), b.sample()):
            np.testing.assert_array_equal(x, y)
    image, dist, labels = a.sample()
    assert image.shape == PATCH and dist.shape == (3, *PATCH) and labels.shape == PATCH
    assert 0 <= image.min() and image.max() <= 1
    with pytest.raises(ValueError, match="name"):
        PatchSampler(items, [], 0, PATCH)
    synthetic = {**items[0], "real": np.array(False)}
    with pytest.raises(ValueError, match="real"):
        PatchSampler([synthetic], ["s"], 0, PATCH, real_fraction=0.7)


def test_maps_prepared_without_image_brain_renormalise_the_masked_image():
    raw, mask, values, distance = head()
    old = item(raw, mask, values, distance)
    del old["image_brain"]
    sampler = PatchSampler([old], ["old"], 0, PATCH, real_fraction=1.0, augment=False)
    box = (slice(8, 24), slice(8, 24), slice(8, 24))
    got = sampler.real_patch(0, box, skull=False)
    assert got.min() >= 0 and got.max() <= 1
    brain = got[mask[box]]
    assert brain.max() > 0.9  # the brain spans the range again, as the app would normalise it


def test_augmented_batch_moves_image_field_and_labels_together():
    from monai.transforms import RandAffined

    from bids_cadiff.training.sampler import augmented_batch

    raw, mask, values, distance = head()
    sampler = PatchSampler([item(raw, mask, values, distance)], ["h"], 0, PATCH, real_fraction=1.0,
                           augment=False)
    affine = RandAffined(keys=["image", "distance", "labels"], prob=1.0, rotate_range=[0.3] * 3,
                         mode=["bilinear", "bilinear", "nearest"], padding_mode="zeros")
    affine.set_random_state(0)
    images, distances, labels = augmented_batch(sampler, affine, 3, elastic=True)
    assert images.shape == (3, 1, *PATCH) and distances.shape == (3, 3, *PATCH)
    assert labels.shape == (3, 1, *PATCH) and labels.dtype == torch.int64
    # where a label is lateral ventricle (index of value 4), the image is dark (30 of 250)
    lv = SYNTHSEG32.value_to_index(np.array([4]))[0]
    dark, bright = images[labels == lv], images[(labels > 0) & (labels != lv)]
    assert dark.numel() and float(dark.mean()) < float(bright.mean())
