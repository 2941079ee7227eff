"""Mixed training patches: real images (skull on or off) and images synthesised from label maps
(SynthSeg manner), with their distance fields and targets; deterministic and resumable.

Sample ``n`` of rank ``r`` is a pure function of ``(seed, r, n)``, as in
:class:`~bids_cadiff.training.data.PatchDataset`: every choice below is drawn from
``numpy.random.default_rng([seed, r, n])``, so the data state of a resumable run is only the
index of the next sample.

Per sample (:class:`MixedPatchDataset`):

1. a real image with probability ``real_fraction`` (among items with a real T1w), else an
   image synthesised from the label values of any item (label maps without images included);
2. the patch centre: with probability ``balanced_fraction`` a voxel of a structure drawn
   uniformly among those present (class balance: small structures as often as large ones),
   else any labelled voxel; then jittered by up to 8 voxels;
3. skull on with probability ``skull_fraction``, else the skull-stripped input;
4. the image: a real image's crop (then a random bias field and intensity augmentation), or a
   synthesised one (:func:`~bids_cadiff.training.synth.synthesize`: random per-label
   intensities, bias, the whole map's normalisation, blur, noise);
5. image, distance field and labels rotated and scaled together (MONAI ``RandAffined``) and,
   with ``elastic``, deformed together by a smooth random displacement;
6. registration jitter (``field_jitter`` > 0): the distance field alone is deformed by another
   smooth displacement, so the network sees fields that are off by as much as two good
   registrations of one image differ, and learns to follow the image where they disagree.

**Normalisation is the app's.** The app normalises each whole image once (percentiles 0.5 and
99.5 of its nonzero voxels) and the network sees crops of that. A real patch is cut from an
image normalised the same way (``image``: skull on; ``image_brain``: the app's input for the
skull-stripped image); a synthesised patch is normalised with the percentiles of its *whole*
label map (:func:`~bids_cadiff.training.synth.mixture_range`). No statistic of the patch itself
enters, so without augmentation a real patch is exactly the app's input there
(``tests/training/test_sampler.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from monai.transforms import RandAffined

from bids_cadiff.training.data import TrainingItem, sample_seed
from bids_cadiff.training.synth import (
    augment_intensity,
    bias_field,
    deform,
    smooth_deformation,
    synthesize,
)

__all__ = ["SAMPLING_MODES", "MixedPatchDataset", "SamplingSettings"]

#: ``patches``: real images only, MONAI augmentation (:class:`~bids_cadiff.training.data.
#: PatchDataset`, the paper's setting); ``mixed``: :class:`MixedPatchDataset`.
SAMPLING_MODES: tuple[str, ...] = ("patches", "mixed")
#: Largest jitter of a patch centre around the chosen voxel, in voxels.
CENTRE_JITTER = 8


@dataclass(frozen=True)
class SamplingSettings:
    """How training patches are drawn (the recipe's ``[sampling]`` table).

    Attributes:
        mode: one of :data:`SAMPLING_MODES`.
        real_fraction: probability of a real image (when there are real images).
        balanced_fraction: probability of a class-balanced patch centre.
        skull_fraction: probability of the image with skull (else skull-stripped).
        elastic: smooth random deformation of image, field and labels together.
        elastic_voxels: its scale in voxels.
        field_jitter: registration jitter: scale in voxels of a smooth displacement applied to
            the distance field only (0: none).
        rotate: largest rotation of the random affine per axis (radians).
        scale: largest relative scaling of the random affine per axis.
        affine_prob: probability of the random affine.
        augment: intensity augmentation of real and synthesised images.
        on_device: draw the patches on the training device (the GPU recipe):
            :class:`~bids_cadiff.training.device_sampler.DevicePatchSampler`, the same steps in
            torch, with every item held in device memory. ``mode`` must be ``"mixed"``.
    """

    mode: str = "patches"
    real_fraction: float = 0.7
    balanced_fraction: float = 0.5
    skull_fraction: float = 0.6
    elastic: bool = True
    elastic_voxels: float = 3.0
    field_jitter: float = 0.0
    rotate: float = 0.17
    scale: float = 0.1
    affine_prob: float = 0.7
    augment: bool = True
    on_device: bool = False

    def __post_init__(self) -> None:
        if self.mode not in SAMPLING_MODES:
            raise ValueError(f"sampling mode must be one of {SAMPLING_MODES}, got {self.mode!r}")
        if self.on_device and self.mode != "mixed":
            raise ValueError("on_device sampling draws mixed patches: set mode = \"mixed\"")
        for name in ("real_fraction", "balanced_fraction", "skull_fraction", "affine_prob"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("elastic_voxels", "field_jitter", "rotate", "scale"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class MixedPatchDataset(torch.utils.data.Dataset):
    """Patch ``n`` of an endless, deterministic stream of real and synthesised patches (see the
    module docstring).

    Args:
        items: training items; synthesis needs their ``values``, skull-stripped real patches
            their ``image_brain``.
        patch_size: ``(X, Y, Z)`` voxels.
        seed: the run's seed.
        rank: the process rank under DDP.
        settings: the sampling settings.
        length: ``len()`` of the dataset (indices beyond it still work).

    ``dataset[n]`` returns ``{"image": (1, X, Y, Z) float32, "distance": (3, X, Y, Z) float32,
    "label": (1, X, Y, Z) int64}``.
    """

    def __init__(
        self,
        items: Sequence[TrainingItem],
        *,
        patch_size: Sequence[int],
        seed: int,
        rank: int = 0,
        settings: SamplingSettings = SamplingSettings(mode="mixed"),
        length: int = 2**62,
    ) -> None:
        if not items:
            raise ValueError("MixedPatchDataset needs at least one training item")
        if len(patch_size) != 3:
            raise ValueError(f"MixedPatchDataset draws 3D patches, got patch_size {tuple(patch_size)}")
        self.items = list(items)
        self.patch = np.asarray([int(p) for p in patch_size], dtype=int)
        self.seed, self.rank, self.length = int(seed), int(rank), int(length)
        self.settings = settings
        self.real_items = [i for i, it in enumerate(self.items) if it.real]
        self.synth_items = [i for i, it in enumerate(self.items) if it.values is not None]
        if not self.real_items and not self.synth_items:
            raise ValueError("no item has a real image or label values to synthesise from")
        if not self.synth_items and settings.real_fraction < 1.0:
            raise ValueError(
                "real_fraction < 1 needs items with label values to synthesise images from"
            )
        self.affine = RandAffined(
            keys=["image", "distance", "label"], prob=settings.affine_prob,
            rotate_range=[settings.rotate] * 3, scale_range=[settings.scale] * 3,
            mode=["bilinear", "bilinear", "nearest"], padding_mode="zeros",
        )
        self._counts: dict[int, dict[int, int]] = {}
        self._present: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.length

    def _value_counts(self, index: int) -> dict[int, int]:
        if index not in self._counts:
            values = self.items[index].values
            assert values is not None
            present, n = np.unique(values, return_counts=True)
            self._counts[index] = {int(v): int(c) for v, c in zip(present, n)}
        return self._counts[index]

    def _classes(self, index: int) -> np.ndarray:
        if index not in self._present:
            labels = self.items[index].labels
            self._present[index] = np.unique(labels[labels > 0])
        return self._present[index]

    def _centre(self, rng: np.random.Generator, index: int) -> np.ndarray:
        item = self.items[index]
        classes = self._classes(index)
        if len(classes) and rng.random() < self.settings.balanced_fraction:
            chosen = classes[int(rng.integers(len(classes)))]
            voxels = np.argwhere(item.labels == chosen)
            centre = voxels[int(rng.integers(len(voxels)))]
        elif len(item.foreground):
            flat = int(item.foreground[rng.integers(len(item.foreground))])
            centre = np.array(np.unravel_index(flat, item.labels.shape))
        else:
            centre = np.array([int(rng.integers(n)) for n in item.labels.shape])
        return centre + rng.integers(-CENTRE_JITTER, CENTRE_JITTER + 1, size=3)

    def real_patch(self, index: int, box: tuple[slice, ...], *, skull: bool) -> np.ndarray:
        """A real image's input before augmentation: the app's input there (skull on:
        ``image``; skull off: ``image_brain``)."""
        item = self.items[index]
        source = item.image if skull or item.image_brain is None else item.image_brain
        return np.asarray(source[box], dtype=np.float32)

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Steps 1-4 of the module docstring: ``(image (*P), distance (3, *P), labels (*P))``,
        zero-padded where the map is smaller than the patch."""
        s = self.settings
        use_real = bool(self.real_items) and (
            not self.synth_items or rng.random() < s.real_fraction
        )
        pool = self.real_items if use_real else self.synth_items
        index = pool[int(rng.integers(len(pool)))]
        item = self.items[index]
        centre = self._centre(rng, index)
        shape = np.array(item.labels.shape)
        lo = np.clip(centre - self.patch // 2, 0, np.maximum(shape - self.patch, 0))
        box = tuple(slice(int(a), int(a) + int(p)) for a, p in zip(lo, self.patch))
        skull = rng.random() < s.skull_fraction
        if use_real:
            image = self.real_patch(index, box, skull=skull)
            if s.augment:
                image = np.clip(image * bias_field(image.shape, rng, rng.uniform(0, 0.3)), 0, 1)
                image = augment_intensity(image, rng)
        else:
            assert item.values is not None
            image = synthesize(np.asarray(item.values[box]), rng, skull=skull,
                               counts=self._value_counts(index), augment=s.augment)
        distance = np.asarray(item.distance[(slice(None), *box)], dtype=np.float32)
        labels = np.asarray(item.labels[box]).astype(np.int64)
        pad = [(0, int(p) - n) for p, n in zip(self.patch, image.shape)]
        return (np.pad(image, pad).astype(np.float32), np.pad(distance, [(0, 0), *pad]),
                np.pad(labels, pad))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = sample_seed(self.seed, self.rank, index)
        image, distance, labels = self.draw(rng)
        self.affine.set_random_state(seed=int(rng.integers(2**31 - 1)))
        out = self.affine({"image": image[None], "distance": distance,
                           "label": labels[None].astype(np.float32)})
        arrays = {k: _numpy(out[k]) for k in ("image", "distance", "label")}
        s = self.settings
        if s.elastic:  # image, field and labels deformed together
            arrays = deform(arrays, smooth_deformation(tuple(int(p) for p in self.patch), rng, s.elastic_voxels),
                            nearest=("label",))
        if s.field_jitter > 0:  # the field alone: another good registration
            arrays["distance"] = deform(
                {"distance": arrays["distance"]},
                smooth_deformation(tuple(int(p) for p in self.patch), rng, s.field_jitter),
            )["distance"]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(arrays["image"], dtype=np.float32)),
            "distance": torch.from_numpy(
                np.ascontiguousarray(arrays["distance"], dtype=np.float32)).clamp_(0.0, 1.0),
            "label": torch.from_numpy(np.ascontiguousarray(arrays["label"])).round().long(),
        }


def _numpy(value: object) -> np.ndarray:
    """MetaTensor, tensor or array → numpy array."""
    if hasattr(value, "as_tensor"):
        value = value.as_tensor()  # type: ignore[union-attr]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
