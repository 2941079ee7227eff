"""Training patches of the default-model recipe: real images and images synthesised from label
maps (SynthSeg manner), with their distance fields and targets.

Items are prepared maps on the model grid (``.npz`` written by the recipe's preparation stage):

=================  ==========================================================================
``image``          ``(X, Y, Z)`` float32, the app's preprocessing of the whole image
                   (:func:`bids_cadiff.app.participant.prepare_image`: N4, then the percentile
                   normalisation of the whole volume)
``distance``       ``(3, X, Y, Z)`` the atlas distance field warped onto it
``values``         ``(X, Y, Z)`` training targets as FreeSurfer values of the label table
``raw_labels``     ``(X, Y, Z)`` the label map's own values (synthesis draws from these)
``mask``           ``(X, Y, Z)`` bool brain mask
``image_brain``    optional ``(X, Y, Z)`` float32: the app's input for the skull-stripped
                   image (N4-corrected image × mask, normalised over the brain)
``real``           whether ``image`` is a real T1w (else a label map's stand-in)
=================  ==========================================================================

**Normalisation is the app's.** The app normalises each whole image once (percentiles 0.5 and
99.5 of its nonzero voxels) and the network sees crops of that. A patch here is cut from an
image normalised the same way: a real image's ``image`` as prepared (skull on), or its
``image_brain`` (skull off; maps prepared before it existed: ``image × mask`` renormalised over
the whole brain, which differs where the head's normalisation clipped dark brain voxels); a
synthesised patch with the percentiles of its *whole* label map
(:func:`bids_cadiff.training.synth.mixture_range`). Augmentation then works in the normalised
scale. No statistic of the patch itself enters, so without augmentation a real patch is
exactly the app's input there (``tests/training/test_sampler.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from bids_cadiff.labels import SYNTHSEG32, LabelTable
from bids_cadiff.training.synth import (
    augment_intensity,
    bias_field,
    deform,
    extracerebral_csf_to_background,
    smooth_deformation,
    synthesize,
)

__all__ = ["PatchSampler", "augmented_batch", "load_item"]

#: Percentiles of the app's intensity normalisation (the checkpoint's ``normalization``).
LOWER, UPPER = 0.5, 99.5


def load_item(
    path: Path, csf_to_background: bool = False, keys: tuple[str, ...] | None = None
) -> dict[str, np.ndarray]:
    """A prepared map (only ``keys`` if given); with ``csf_to_background`` a SynthSeg map's CSF
    target becomes 0 (aseg's convention)."""
    with np.load(path) as data:
        item = {k: data[k] for k in (keys or data.files)}
    if csf_to_background and not bool(item["real"]):
        item["values"] = extracerebral_csf_to_background(item["values"])
    return item


def brain_range(image: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """The app's normalisation percentiles of the skull-stripped image ``image × mask``."""
    values = image[mask & (image != 0)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [LOWER, UPPER])
    return float(lo), float(max(hi, lo + 1e-6))


class PatchSampler:
    """Draws training patches; all randomness from one seeded numpy generator (its state is
    what a resumable training state stores: :attr:`rng`).

    Args:
        items: prepared maps (:func:`load_item`).
        names: one name per item (for messages).
        seed: seeds :attr:`rng`.
        patch: patch size in voxels.
        balanced: phases 1-2's draws: class-balanced centres for every patch (else none).
        real_fraction: ``None``: phases 1-2's draws (an item uniformly, then its real image
            with probability 1/2). Given: a real image with this probability, else an image
            synthesised from any item's labels.
        balanced_fraction: with ``real_fraction``: class-balanced centres with this
            probability.
        augment: intensity augmentation (bias field, blur, resolution loss, gamma, noise).
        table: the label table of the targets.
    """

    def __init__(
        self,
        items: Sequence[dict[str, np.ndarray]],
        names: Sequence[str],
        seed: int,
        patch: Sequence[int],
        *,
        balanced: bool = False,
        real_fraction: float | None = None,
        balanced_fraction: float | None = None,
        augment: bool = True,
        table: LabelTable = SYNTHSEG32,
    ) -> None:
        if len(items) != len(names) or not items:
            raise ValueError(f"need one name per item and at least one item, got "
                             f"{len(items)} items and {len(names)} names")
        self.items, self.names = list(items), list(names)
        self.patch = np.asarray(patch, dtype=int)
        self.rng = np.random.default_rng(seed)
        self.balanced = balanced
        self.real_fraction = real_fraction
        self.balanced_fraction = balanced_fraction
        self.augment = augment
        self.table = table
        self.all_items = list(range(len(self.items)))
        self.real_items = [i for i in self.all_items if bool(self.items[i]["real"])]
        if real_fraction is not None and real_fraction > 0 and not self.real_items:
            raise ValueError("real_fraction > 0 but no item is a real image")
        self._brain_ranges: dict[int, tuple[float, float]] = {}
        self._counts: dict[int, dict[int, int]] = {}

    def _brain_range(self, index: int) -> tuple[float, float]:
        if index not in self._brain_ranges:
            item = self.items[index]
            self._brain_ranges[index] = brain_range(item["image"], item["mask"].astype(bool))
        return self._brain_ranges[index]

    def _label_counts(self, index: int) -> dict[int, int]:
        if index not in self._counts:
            present, n = np.unique(self.items[index]["raw_labels"], return_counts=True)
            self._counts[index] = {int(v): int(c) for v, c in zip(present, n)}
        return self._counts[index]

    def real_patch(self, index: int, box: tuple[slice, ...], *, skull: bool) -> np.ndarray:
        """The network input of a real image's patch before augmentation: the app's input
        there (skull on: ``image``; skull off: ``image_brain``, or for maps without it
        ``image × mask`` renormalised over the whole brain)."""
        item = self.items[index]
        if skull:
            return item["image"][box].astype(np.float32)
        if "image_brain" in item:
            return item["image_brain"][box].astype(np.float32)
        image = item["image"][box].astype(np.float32)
        lo, hi = self._brain_range(index)
        stripped = image * item["mask"][box]
        return np.where(stripped != 0, np.clip((stripped - lo) / (hi - lo), 0, 1), 0).astype(
            np.float32
        )

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One patch: ``(image (*P) float32 in [0, 1], distance (3, *P) float32, labels (*P)
        int channel indices)``, zero-padded where the map is smaller than the patch."""
        rng = self.rng
        if self.real_fraction is None:
            index = int(rng.integers(len(self.items)))
            balanced = self.balanced
        else:
            use_real = rng.random() < self.real_fraction
            pool = self.real_items if use_real else self.all_items
            index = pool[int(rng.integers(len(pool)))]
            balanced = rng.random() < (self.balanced_fraction or 0.0)
        item = self.items[index]
        values = item["values"]
        if balanced:  # class-balanced: a structure uniformly, then one of its voxels
            present = np.unique(values[values > 0])
            fg = np.argwhere(values == present[int(rng.integers(len(present)))])
        else:
            fg = np.argwhere(values > 0)
        centre = fg[int(rng.integers(len(fg)))] + rng.integers(-8, 9, size=3)
        lo = np.clip(centre - self.patch // 2, 0, np.maximum(np.array(values.shape) - self.patch, 0))
        box = tuple(slice(int(a), int(a) + int(p)) for a, p in zip(lo, self.patch))
        skull = rng.random() < 0.6
        if self.real_fraction is None:
            real = bool(item["real"]) and rng.random() < 0.5
        else:
            real = use_real
        if real:
            image = self.real_patch(index, box, skull=skull)
            if self.augment:
                image = np.clip(image * bias_field(image.shape, rng, rng.uniform(0, 0.3)), 0, 1)
                image = augment_intensity(image, rng)
        else:
            counts = self._label_counts(index)
            image = synthesize(item["raw_labels"][box], rng, skull=skull, counts=counts,
                               augment=self.augment)
        distance = item["distance"][(slice(None), *box)].astype(np.float32)
        labels = self.table.value_to_index(values[box])
        pad = [(0, int(p) - s) for p, s in zip(self.patch, image.shape)]
        image = np.pad(image, pad)
        distance = np.pad(distance, [(0, 0), *pad])
        labels = np.pad(labels, pad)
        return image, distance, labels



def augmented_batch(
    sampler: PatchSampler,
    affine: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    size: int,
    *,
    elastic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training batch: ``size`` patches from ``sampler``, each rotated and scaled with its
    field and labels by ``affine`` (MONAI ``RandAffined`` on keys image, distance, labels) and,
    with ``elastic``, deformed with them by a smooth random displacement (drawn from
    ``sampler.rng``).

    Returns:
        ``(image (B, 1, *P) float32, distance (B, 3, *P) float32, labels (B, 1, *P) int64)``.
    """
    imgs, dists, labs = [], [], []
    for _ in range(size):
        image, distance, labels = sampler.sample()
        out = affine({"image": image[None], "distance": distance,
                      "labels": labels[None].astype(np.float32)})
        if elastic:  # image, field and labels deformed together
            arrays = {k: np.asarray(out[k]) for k in ("image", "distance", "labels")}
            out = deform(arrays, smooth_deformation(arrays["image"].shape[1:], sampler.rng),
                         nearest=("labels",))
        imgs.append(torch.as_tensor(np.asarray(out["image"])))
        dists.append(torch.as_tensor(np.asarray(out["distance"])))
        labs.append(torch.as_tensor(np.asarray(out["labels"])).round().long())
    return torch.stack(imgs), torch.stack(dists), torch.stack(labs)
