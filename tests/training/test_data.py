"""Patch sampling: shapes, determinism from (seed, rank, index), one spatial transform for all."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_cadiff.training.data import PatchDataset, TrainingItem


def _item(shape=(20, 22, 18)) -> TrainingItem:
    labels = np.zeros(shape, np.int16)
    labels[4:16, 5:17, 3:15] = 1
    labels[8:12, 9:13, 7:11] = 2
    rng = np.random.default_rng(0)
    image = (labels / 2 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    # Channel 0 of the field is a function of the label: any spatial mismatch shows.
    distance = np.stack([labels / 2.0, np.full(shape, 0.5), np.full(shape, 0.25)]).astype(np.float32)
    return TrainingItem("x", image, distance, labels, np.eye(4))


@pytest.mark.parametrize("dims,patch", [(3, (16, 16, 16)), (2, (24, 20))])
def test_shapes_and_determinism(dims, patch):
    ds = PatchDataset([_item()], spatial_dims=dims, patch_size=patch, seed=3)
    a, b, c = ds[7], ds[7], ds[8]
    assert a["image"].shape == (1, *patch) and a["distance"].shape == (3, *patch)
    assert a["label"].shape == (1, *patch) and a["label"].dtype == torch.int64
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["image"], c["image"])
    other_rank = PatchDataset([_item()], spatial_dims=dims, patch_size=patch, seed=3, rank=1)[7]
    assert not torch.equal(a["image"], other_rank["image"])


def test_distance_field_follows_the_labels_through_augmentation():
    ds = PatchDataset([_item()], spatial_dims=3, patch_size=(16, 16, 16), seed=0)
    agree = []
    for n in range(6):
        s = ds[n]
        inside = s["distance"][1] > 0.25  # voxels that came from inside the volume
        diff = (s["distance"][0] - s["label"][0].float() / 2).abs()[inside]
        agree.append(float((diff < 0.26).float().mean()))
    assert min(agree) > 0.9, agree


def test_rejects_mismatched_arrays():
    item = _item()
    with pytest.raises(ValueError, match="share the grid"):
        TrainingItem("bad", item.image, item.distance[:, :-1], item.labels, np.eye(4))
