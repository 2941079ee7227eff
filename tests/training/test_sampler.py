"""Mixed real and synthesised patches: the network sees in training what it sees in the app."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_cadiff.imaging.preprocess import normalise_intensity
from bids_cadiff.labels import SYNTHSEG32
from bids_cadiff.training.data import TrainingItem
from bids_cadiff.training.sampler import MixedPatchDataset, SamplingSettings
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


def item(raw, mask, values, distance, *, real: bool = True) -> TrainingItem:
    return TrainingItem(
        "head", normalise_intensity(raw), distance, SYNTHSEG32.value_to_index(values).astype(np.int16),
        np.eye(4), values=values.astype(np.int32), mask=mask,
        image_brain=normalise_intensity(raw * mask), real=real,
    )


def plain(**changes) -> SamplingSettings:
    """No augmentation, no spatial transform: the patch as cut."""
    return SamplingSettings(**{"mode": "mixed", "augment": False, "affine_prob": 0.0,
                               "elastic": False, **changes})


def where(distance_patch: np.ndarray) -> tuple[slice, ...]:
    start = np.rint(distance_patch[:, 0, 0, 0] * 100).astype(int)
    return tuple(slice(int(s), int(s) + p) for s, p in zip(start, PATCH))


def assert_real_patches_are_the_apps_input(patches, raw, mask, values, atol: float = 1e-6) -> None:
    """``patches``: ``(image, distance, labels)`` numpy patches of a sampler with the plain
    settings and only real images, over ``head()``: each is exactly the app's input at the place
    its distance field names, with skull or (a skull-stripped input) without, and each variant
    was seen at least three times."""
    # what the app feeds the network: the whole image normalised once, with skull or (a
    # skull-stripped input) the image times its brain mask
    app = {True: normalise_intensity(raw), False: normalise_intensity(raw * mask)}
    seen = {True: 0, False: 0}
    for image, dist, labels in patches:
        box = where(dist)
        if app[True][box].shape != PATCH or not mask[box].any():
            continue
        # the draw took one of the two variants: the patch is exactly that variant's app input
        match = [skull for skull in (True, False) if np.allclose(image, app[skull][box], atol=atol)]
        assert len(match) == 1, "the patch is not the app's input of either variant"
        np.testing.assert_array_equal(labels, SYNTHSEG32.value_to_index(values[box]))
        seen[match[0]] += 1
    assert min(seen.values()) >= 3


def test_real_patches_are_exactly_the_apps_input():
    raw, mask, values, distance = head()
    data = MixedPatchDataset([item(raw, mask, values, distance)], patch_size=PATCH, seed=0,
                             settings=plain(real_fraction=1.0))
    patches = ((out["image"][0].numpy(), out["distance"].numpy(), out["label"][0].numpy())
               for out in (data[n] for n in range(40)))
    assert_real_patches_are_the_apps_input(patches, raw, mask, values)


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


def test_sample_n_is_a_pure_function_of_seed_rank_and_n():
    raw, mask, values, distance = head()
    items = [item(raw, mask, values, distance)]
    settings = SamplingSettings(mode="mixed", real_fraction=0.5, field_jitter=1.5)
    a = MixedPatchDataset(items, patch_size=PATCH, seed=3, settings=settings)
    b = MixedPatchDataset(items, patch_size=PATCH, seed=3, settings=settings)
    for n in (5, 0, 7, 5):  # any order: resuming at sample n draws what an unbroken run drew
        for key in ("image", "distance", "label"):
            torch.testing.assert_close(a[n][key], b[n][key], rtol=0, atol=0)
    other = MixedPatchDataset(items, patch_size=PATCH, seed=3, rank=1, settings=settings)
    assert not torch.equal(a[0]["image"], other[0]["image"])
    out = a[1]
    assert out["image"].shape == (1, *PATCH) and out["distance"].shape == (3, *PATCH)
    assert out["label"].shape == (1, *PATCH) and out["label"].dtype == torch.int64
    assert 0 <= float(out["image"].min()) and float(out["image"].max()) <= 1


def test_checks_its_items_and_settings():
    raw, mask, values, distance = head()
    with pytest.raises(ValueError, match="at least one"):
        MixedPatchDataset([], patch_size=PATCH, seed=0)
    label_only = item(raw, mask, values, distance)
    label_only.values = None
    with pytest.raises(ValueError, match="synthesise"):
        MixedPatchDataset([label_only], patch_size=PATCH, seed=0,
                          settings=SamplingSettings(mode="mixed", real_fraction=0.7))
    with pytest.raises(ValueError, match="real_fraction"):
        SamplingSettings(real_fraction=1.5)
    with pytest.raises(ValueError, match="mode"):
        SamplingSettings(mode="other")


def test_label_maps_without_images_are_only_synthesised_from():
    # an item whose image is a stand-in (real=False) must never be shown as an image: its
    # stand-in is constant 0.5 here, which no synthesised image is
    raw, mask, values, distance = head()
    stand_in = item(raw, mask, values, distance, real=False)
    stand_in.image = np.full(SHAPE, 0.5, np.float32)
    stand_in.image_brain = None
    data = MixedPatchDataset([stand_in], patch_size=PATCH, seed=0,
                             settings=plain(real_fraction=1.0))
    for n in range(10):
        image = data[n]["image"][0].numpy()
        assert not np.allclose(image[image > 0], 0.5)


def one_voxel_structure() -> tuple[TrainingItem, int]:
    """``head()``'s item with one voxel of hippocampus, and that structure's class."""
    raw, mask, values, distance = head()
    values = values.copy()
    values[20, 22, 18] = 17
    return item(raw, mask, values, distance), int(SYNTHSEG32.value_to_index(np.array([17]))[0])


def test_class_balanced_centres_reach_small_structures():
    one, small = one_voxel_structure()
    counts = {}
    for fraction in (0.0, 1.0):
        data = MixedPatchDataset([one], patch_size=PATCH, seed=0,
                                 settings=plain(real_fraction=1.0, balanced_fraction=fraction))
        counts[fraction] = sum(int((data[n]["label"] == small).any()) for n in range(60))
    assert counts[1.0] >= 8 and counts[1.0] > counts[0.0] + 5


def test_field_jitter_moves_the_field_and_nothing_else():
    raw, mask, values, distance = head()
    items = [item(raw, mask, values, distance)]
    still = MixedPatchDataset(items, patch_size=PATCH, seed=0, settings=plain(real_fraction=1.0))
    jittered = MixedPatchDataset(items, patch_size=PATCH, seed=0,
                                 settings=plain(real_fraction=1.0, field_jitter=3.0))
    moved = 0
    for n in range(6):
        a, b = still[n], jittered[n]
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
        torch.testing.assert_close(a["label"], b["label"], rtol=0, atol=0)
        interior = (slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
        moved += int(not torch.allclose(a["distance"][interior], b["distance"][interior], atol=1e-4))
    assert moved >= 4


def test_spatial_augmentation_moves_image_field_and_labels_together():
    raw, mask, values, distance = head()
    data = MixedPatchDataset([item(raw, mask, values, distance)], patch_size=PATCH, seed=0,
                             settings=plain(real_fraction=1.0, affine_prob=1.0, rotate=0.3,
                                            elastic=True))
    lv = SYNTHSEG32.value_to_index(np.array([4]))[0]
    dark, bright = [], []
    for n in range(6):
        out = data[n]
        images, labels = out["image"], out["label"]
        dark.append(images[labels == lv])
        bright.append(images[(labels > 0) & (labels != lv)])
    # where a label is lateral ventricle (value 4), the image is dark (30 of 250)
    dark, bright = torch.cat(dark), torch.cat(bright)
    assert dark.numel() and float(dark.mean()) < float(bright.mean())
