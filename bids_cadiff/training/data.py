"""Training patches: deterministic, resumable sampling and MONAI augmentation.

Sample ``n`` of rank ``r`` is a pure function of ``(seed, r, n)``: which image, where the patch
is centred (half of them on a labelled voxel, half anywhere, as
:class:`monai.transforms.RandCropByPosNegLabeld` does) and every augmentation parameter are drawn
from ``numpy.random.default_rng([seed, r, n])``. The data "sampler state" is therefore only the
index of the next sample, ``iteration * batch_size``: resuming at iteration ``k`` draws exactly
the batches an uninterrupted run would have drawn, with any number of DataLoader workers.

Per sample:

1. pick an image; 3D: pick a patch centre; 2D: pick a slice along ``slice_axis`` (labelled
   slices nine times in ten), then a centre in it;
2. cut a region ``patch + 2 * margin`` around the centre, zero-padded at the volume edges
   (:class:`monai.transforms.SpatialCropd` / :class:`~monai.transforms.SpatialPadd`);
3. :class:`~monai.transforms.RandAffined` on image, distance field and labels together (one
   spatial transform; bilinear for image and field, nearest for labels), resampled to the patch
   size around the region's centre, so rotations do not bring in empty corners;
4. intensity augmentation of the image only: :class:`~monai.transforms.RandScaleIntensityd`,
   :class:`~monai.transforms.RandShiftIntensityd`, :class:`~monai.transforms.RandAdjustContrastd`,
   :class:`~monai.transforms.RandGaussianNoised`.

No flips: left and right structures have different labels (and the field's x axis would flip).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialCropd,
    SpatialPadd,
)

__all__ = ["KEYS", "PatchDataset", "TrainingItem", "build_augmentation", "sample_seed"]

KEYS: tuple[str, str, str] = ("image", "distance", "label")
#: Fraction of patches centred on a labelled (non-background) voxel.
POSITIVE_FRACTION = 0.5
#: Fraction of 2D slices drawn from those holding labels.
LABELLED_SLICE_FRACTION = 0.9


@dataclass
class TrainingItem:
    """One prepared, labelled image.

    Attributes:
        name: for logs (file name of the T1w).
        image: ``(X, Y, Z)`` float32 in [0, 1].
        distance: ``(3, X, Y, Z)`` float32 in [0, 1].
        labels: ``(X, Y, Z)`` int16 channel indices.
        affine: ``(4, 4)`` model-grid affine.
        values: optional ``(X, Y, Z)`` int label values of the source map (synthesis draws
            one intensity per value, extra-cerebral values included).
        mask: optional ``(X, Y, Z)`` bool brain mask.
        image_brain: optional ``(X, Y, Z)`` float32 skull-stripped input (the app's
            normalisation of the image inside ``mask``).
        real: ``False``: ``image`` is not a real T1w (a label map's stand-in), so only images
            synthesised from ``values`` are trained on.
    """

    name: str
    image: np.ndarray
    distance: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    values: np.ndarray | None = None
    mask: np.ndarray | None = None
    image_brain: np.ndarray | None = None
    real: bool = True

    def __post_init__(self) -> None:
        if self.image.shape != self.labels.shape or self.distance.shape != (3, *self.image.shape):
            raise ValueError(
                f"{self.name}: image {self.image.shape}, distance {self.distance.shape} and labels "
                f"{self.labels.shape} must share the grid (distance with 3 channels first)"
            )
        # Flat indices of labelled voxels, int32/int64 as needed: cheap positive sampling.
        flat = np.flatnonzero(self.labels.ravel())
        self.foreground = flat.astype(np.int32 if self.labels.size < 2**31 else np.int64)


def sample_seed(seed: int, rank: int, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of ``rank`` (see the module docstring)."""
    return np.random.default_rng([int(seed), int(rank), int(index)])


def build_augmentation(
    *, spatial_dims: int, patch_size: Sequence[int], augment: bool = True
) -> Compose:
    """Spatial and intensity augmentation of a cropped region to ``patch_size``.

    Args:
        spatial_dims: 2 or 3.
        patch_size: output size in voxels.
        augment: ``False``: centre crop only (no random transform).

    Returns:
        a MONAI ``Compose`` over dicts with ``image (1, *R)``, ``distance (3, *R)``,
        ``label (1, *R)``; seed it with ``set_random_state`` before each call.
    """
    keys = list(KEYS)
    size = [int(p) for p in patch_size]
    if not augment:
        return Compose([CenterSpatialCropd(keys, roi_size=size)])
    rotate = math.pi / 12
    return Compose(
        [
            RandAffined(
                keys,
                spatial_size=size,
                prob=0.8,
                rotate_range=(rotate,) * (3 if spatial_dims == 3 else 1),
                scale_range=(0.1,) * spatial_dims,
                translate_range=(2,) * spatial_dims,
                mode=("bilinear", "bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.05, prob=0.5),
            RandAdjustContrastd("image", gamma=(0.8, 1.25), prob=0.3),
            RandGaussianNoised("image", std=0.02, prob=0.3),
        ],
        map_items=False,
    )


class PatchDataset(torch.utils.data.Dataset):
    """Patch ``n`` of an endless, deterministic stream (see the module docstring).

    Args:
        items: the training images.
        spatial_dims: 3 (3D patches) or 2 (2D patches of slices).
        patch_size: voxels per axis (``spatial_dims`` values).
        seed: the run's seed.
        rank: the process rank under DDP (each rank draws its own stream).
        augment: random spatial and intensity augmentation.
        slice_axis: 2D only: the axis slices are taken along (2 = axial in RAS).
        length: ``len()`` of the dataset (indices beyond it still work).

    ``dataset[n]`` returns ``{"image": (1, *P) float32, "distance": (3, *P) float32,
    "label": (1, *P) int64}`` as torch tensors.
    """

    def __init__(
        self,
        items: Sequence[TrainingItem],
        *,
        spatial_dims: int,
        patch_size: Sequence[int],
        seed: int,
        rank: int = 0,
        augment: bool = True,
        slice_axis: int = 2,
        length: int = 2**62,
    ) -> None:
        if not items:
            raise ValueError("PatchDataset needs at least one training image")
        if len(patch_size) != spatial_dims:
            raise ValueError(f"patch_size {tuple(patch_size)} must have {spatial_dims} values")
        self.items = list(items)
        self.spatial_dims = spatial_dims
        self.patch_size = tuple(int(p) for p in patch_size)
        self.seed, self.rank, self.slice_axis, self.length = int(seed), int(rank), slice_axis, length
        self.augment = augment
        # Region cut before the spatial transform: a margin so rotated corners stay inside data.
        self.region = (
            tuple(int(math.ceil(p * 1.25)) for p in self.patch_size) if augment else self.patch_size
        )
        self.transforms = build_augmentation(
            spatial_dims=spatial_dims, patch_size=self.patch_size, augment=augment
        )
        self._labelled_slices = [
            np.flatnonzero(
                item.labels.any(axis=tuple(a for a in range(3) if a != slice_axis))
            )
            for item in self.items
        ]

    def __len__(self) -> int:
        return self.length

    def _centre(self, rng: np.random.Generator, labels: np.ndarray, fg: np.ndarray) -> list[int]:
        if len(fg) and rng.random() < POSITIVE_FRACTION:
            flat = int(fg[rng.integers(len(fg))])
            return [int(v) for v in np.unravel_index(flat, labels.shape)]
        return [int(rng.integers(n)) for n in labels.shape]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = sample_seed(self.seed, self.rank, index)
        k = int(rng.integers(len(self.items)))
        item = self.items[k]
        image, distance, labels = item.image[None], item.distance, item.labels[None]
        fg = item.foreground
        if self.spatial_dims == 2:
            labelled = self._labelled_slices[k]
            if len(labelled) and rng.random() < LABELLED_SLICE_FRACTION:
                s = int(labelled[rng.integers(len(labelled))])
            else:
                s = int(rng.integers(item.labels.shape[self.slice_axis]))
            take = [slice(None)] * 4
            take[1 + self.slice_axis] = s
            image, distance, labels = image[tuple(take)], distance[tuple(take)], labels[tuple(take)]
            fg = np.flatnonzero(labels[0].ravel())
        centre = self._centre(rng, labels[0], fg)
        data = {
            "image": np.ascontiguousarray(image, dtype=np.float32),
            "distance": np.ascontiguousarray(distance, dtype=np.float32),
            "label": np.ascontiguousarray(labels, dtype=np.float32),
        }
        # Crop what exists around the centre, then pad to the full region (zeros beyond edges).
        start = [c - r // 2 for c, r in zip(centre, self.region)]
        lo = [max(s, 0) for s in start]
        hi = [min(s + r, n) for s, r, n in zip(start, self.region, labels.shape[1:])]
        data = SpatialCropd(list(KEYS), roi_start=lo, roi_end=hi)(data)
        before = [l - s for l, s in zip(lo, start)]
        after = [r - (h - l) - b for r, h, l, b in zip(self.region, hi, lo, before)]
        if any(before) or any(after):
            pad = [(0, 0)] + list(zip(before, after))
            data = {k: np.pad(np.asarray(v), pad) for k, v in data.items()}
        data = SpatialPadd(list(KEYS), spatial_size=self.region)(data)
        self.transforms.set_random_state(seed=int(rng.integers(2**31 - 1)))
        out = self.transforms(data)
        return {
            "image": _plain(out["image"]).float(),
            "distance": _plain(out["distance"]).float().clamp_(0.0, 1.0),
            "label": _plain(out["label"]).round().long(),
        }


def _plain(value: object) -> torch.Tensor:
    """MetaTensor or array → a plain contiguous torch tensor (no MONAI metadata)."""
    if hasattr(value, "as_tensor"):
        value = value.as_tensor()  # type: ignore[union-attr]
    return torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value).contiguous()
