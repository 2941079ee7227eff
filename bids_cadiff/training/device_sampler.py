"""Mixed training patches drawn on the training device: the GPU recipe's sampler.

:class:`~bids_cadiff.training.sampler.MixedPatchDataset` draws each patch with numpy and scipy
on the CPU. At the paper's scale (96³ patches at 1 mm) that is slower than a GPU step, so
``[sampling] on_device = true`` uses :class:`DevicePatchSampler` instead: every training item is
moved to the device once (images and distance fields in ``float16`` on CUDA, labels as small
integers), and a batch is made there with torch alone. It follows the same recipe as the CPU
sampler, step for step (see :mod:`bids_cadiff.training.sampler`):

1. real image or synthesis (``real_fraction``), the item, skull on or off (``skull_fraction``);
2. the patch centre: a voxel of a uniformly drawn structure (``balanced_fraction``) or any
   labelled voxel, jittered by up to :data:`~bids_cadiff.training.sampler.CENTRE_JITTER`;
3. one sampling grid for the patch: the random rotation and scaling about the centre
   (``affine_prob``, ``rotate``, ``scale``) and the smooth elastic displacement (``elastic``),
   applied to the whole volume with ``grid_sample`` (linear for image and distance field,
   nearest for labels), so a rotated patch has no empty corners;
4. registration jitter (``field_jitter``): the distance field alone is read through the grid
   plus a second smooth displacement;
5. the image: a real image (``image`` or ``image_brain``, already normalised as the app does;
   with ``augment`` a bias field) or one synthesised from the label values (random Gaussian
   per value, a bias field, the whole map's normalisation estimated from the value counts);
   then, with ``augment``, blur, resolution loss along one axis, gamma and noise.

Batch ``n`` of rank ``r`` is a pure function of ``(seed, r, n)`` on a given device type: the
small choices of its sample ``b`` come from ``numpy.random.default_rng([seed, r, n, SEED_TAG,
b])`` (on the CPU), the large random tensors from a device ``torch.Generator`` seeded from it.

Where it differs from the CPU sampler, knowingly: a synthesised image is drawn on the resampled
(rotated, deformed) labels, as SynthSeg does, not resampled after drawing; a rotated patch is
read from the whole volume, so it has no empty corners; the blur is cut at 3 sigma with
replicated edges (scipy: 4 sigma, reflected). Stored in float16 on CUDA, a real patch differs
from the app's float32 input by float16's rounding (about 5e-4 at 1). A resumed run therefore draws
the same batches as an uninterrupted one; the CPU and a GPU draw different ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bids_cadiff.training.data import TrainingItem
from bids_cadiff.training.sampler import CENTRE_JITTER, SamplingSettings
from bids_cadiff.training.synth import BRAIN_VALUES, T1_PRIOR

__all__ = ["DevicePatchSampler"]

#: Control points per axis of the smooth displacements (as :func:`~bids_cadiff.training.synth.
#: smooth_deformation`).
CONTROL_POINTS = 5
#: Draws of the per-value Gaussians that estimate a synthesised volume's percentiles.
MIXTURE_DRAWS = 20_000
#: Sets the sampler's seeds apart from the loop's per-step generators (``[seed, rank, n, 7]``).
SEED_TAG = 1_000_003


@dataclass
class _DeviceItem:
    """One training item on the device. ``linear``: ``(C, X, Y, Z)`` image (, image_brain),
    distance (3); ``nearest``: ``(2, X, Y, Z)`` label index and value index (float, exact);
    ``values``: label value of each value index; ``counts``: voxels per value index."""

    name: str
    linear: torch.Tensor
    nearest: torch.Tensor
    has_brain: bool
    real: bool
    values: np.ndarray | None
    counts: np.ndarray | None
    by_class: np.ndarray  # flat indices of labelled voxels, sorted by class (CPU: no GPU sync)
    class_starts: np.ndarray  # (classes + 1,) offsets into by_class: class c is [c] .. [c + 1]
    classes: np.ndarray  # classes present (> 0)


class DevicePatchSampler:
    """Batches of mixed real and synthesised patches made on ``device`` (module docstring).

    Args:
        items: training items (as for :class:`~bids_cadiff.training.sampler.MixedPatchDataset`).
        patch_size: ``(X, Y, Z)`` voxels.
        batch_size: patches per batch.
        seed: the run's seed.
        rank: the process rank under DDP.
        settings: the sampling settings.
        device: where the items are held and the batches made.
        dtype: storage and sampling precision of images and fields (default: ``float16`` on
            CUDA, ``float32`` elsewhere).

    ``sampler.batch(n)`` returns ``{"image": (B, 1, X, Y, Z) float32, "distance": (B, 3, X, Y, Z)
    float32 in [0, 1], "label": (B, 1, X, Y, Z) int64}`` on ``device``.
    """

    def __init__(
        self,
        items: Sequence[TrainingItem],
        *,
        patch_size: Sequence[int],
        batch_size: int,
        seed: int,
        rank: int = 0,
        settings: SamplingSettings = SamplingSettings(mode="mixed", on_device=True),
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        if not items:
            raise ValueError("DevicePatchSampler needs at least one training item")
        if len(patch_size) != 3:
            raise ValueError(f"DevicePatchSampler draws 3D patches, got {tuple(patch_size)}")
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.patch = tuple(int(p) for p in patch_size)
        self.batch_size, self.seed, self.rank = int(batch_size), int(seed), int(rank)
        self.settings = settings
        self.items = [self._to_device(item) for item in items]
        self.real_items = [i for i, it in enumerate(self.items) if it.real]
        self.synth_items = [i for i, it in enumerate(self.items) if it.values is not None]
        if not self.real_items and not self.synth_items:
            raise ValueError("no item has a real image or label values to synthesise from")
        if not self.synth_items and settings.real_fraction < 1.0:
            raise ValueError("real_fraction < 1 needs items with label values to synthesise from")
        # patch voxel coordinates relative to the centre, (X, Y, Z, 3)
        axes = [torch.arange(p, device=self.device, dtype=torch.float32) - p // 2
                for p in self.patch]
        self._offsets = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)

    # ------------------------------------------------------------------ set-up

    def _to_device(self, item: TrainingItem) -> _DeviceItem:
        channels = [item.image[None]]
        has_brain = item.image_brain is not None
        if has_brain:
            channels.append(item.image_brain[None])  # type: ignore[index]
        channels.append(item.distance)
        linear = torch.from_numpy(np.concatenate(channels).astype(np.float32)).to(
            self.device, self.dtype)
        values = counts = None
        value_index = np.zeros(item.labels.shape, np.int64)
        if item.values is not None:
            values, value_index, counts = np.unique(item.values, return_inverse=True,
                                                    return_counts=True)
            value_index = value_index.reshape(item.labels.shape)
        nearest = torch.from_numpy(
            np.stack([item.labels.astype(np.float32), value_index.astype(np.float32)])
        ).to(self.device, self.dtype if self.dtype != torch.float16 or value_index.max() < 2048
             else torch.float32)
        flat = item.labels.ravel().astype(np.int64)
        order = np.argsort(flat, kind="stable")
        sorted_classes = flat[order]
        n_classes = int(flat.max()) + 1 if flat.size else 1
        starts = np.searchsorted(sorted_classes, np.arange(n_classes + 1))
        first_labelled = int(starts[1]) if n_classes > 1 else len(order)
        classes = np.array([c for c in range(1, n_classes) if starts[c + 1] > starts[c]])
        return _DeviceItem(
            name=item.name, linear=linear, nearest=nearest, has_brain=has_brain, real=item.real,
            values=values, counts=counts,
            by_class=order[first_labelled:].astype(
                np.int32 if item.labels.size < 2**31 else np.int64),
            class_starts=starts - first_labelled, classes=classes,
        )

    # ------------------------------------------------------------------ drawing

    def batches(self, start: int, stop: int) -> Iterator[dict[str, torch.Tensor]]:
        """Batches ``start`` … ``stop - 1``."""
        for n in range(start, stop):
            yield self.batch(n)

    def batch(self, n: int) -> dict[str, torch.Tensor]:
        """Batch ``n`` (a pure function of ``(seed, rank, n)``; see the class docstring)."""
        samples = []
        for b in range(self.batch_size):
            rng = np.random.default_rng([self.seed, self.rank, int(n), SEED_TAG, b])
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(rng.integers(2**62)))
            samples.append(self._sample(rng, generator))
        return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}

    def _upload(self, values: np.ndarray) -> torch.Tensor:
        """Small float32 host values → the device, without waiting for the GPU's queue (pinned
        memory, non-blocking), so the next batch is drawn while the last step still runs."""
        host = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def _centre(self, rng: np.random.Generator, item: _DeviceItem) -> np.ndarray:
        shape = item.nearest.shape[1:]
        total = len(item.by_class)
        if len(item.classes) and rng.random() < self.settings.balanced_fraction:
            c = int(item.classes[int(rng.integers(len(item.classes)))])
            lo, hi = int(item.class_starts[c]), int(item.class_starts[c + 1])
            flat = int(item.by_class[int(rng.integers(lo, hi))])
        elif total:
            flat = int(item.by_class[int(rng.integers(total))])
        else:
            flat = int(rng.integers(int(np.prod(shape))))
        centre = np.array(np.unravel_index(flat, tuple(shape)), dtype=np.int64)
        centre = centre + rng.integers(-CENTRE_JITTER, CENTRE_JITTER + 1, size=3)
        # the unturned patch inside the volume where it fits (as the CPU sampler's crop)
        half = np.array(self.patch) // 2
        upper = np.maximum(np.array(shape) - np.array(self.patch), 0) + half
        return np.clip(centre, half, upper).astype(np.float64)

    def _matrix(self, rng: np.random.Generator) -> np.ndarray:
        """The random rotation and scaling (voxel axes), or the identity."""
        s = self.settings
        if rng.random() >= s.affine_prob:
            return np.eye(3)
        angles = rng.uniform(-s.rotate, s.rotate, size=3)
        scales = 1.0 + rng.uniform(-s.scale, s.scale, size=3)
        matrix = np.eye(3)
        for axis, angle in enumerate(angles):
            c, si = math.cos(angle), math.sin(angle)
            i, j = [a for a in range(3) if a != axis]
            rotation = np.eye(3)
            rotation[i, i], rotation[i, j], rotation[j, i], rotation[j, j] = c, -si, si, c
            matrix = rotation @ matrix
        return matrix @ np.diag(scales)

    def _displacement(self, rng: np.random.Generator, generator: torch.Generator,
                      max_voxels: float) -> torch.Tensor:
        """A smooth random displacement ``(X, Y, Z, 3)`` in voxels (as
        :func:`~bids_cadiff.training.synth.smooth_deformation`)."""
        std = rng.uniform(0.0, max_voxels / 2.0)
        coarse = torch.randn((1, 3, *(CONTROL_POINTS,) * 3), generator=generator,
                             device=self.device) * std
        fine = F.interpolate(coarse, size=self.patch, mode="trilinear", align_corners=True)
        return fine[0].permute(1, 2, 3, 0)

    def _sample(self, rng: np.random.Generator,
                generator: torch.Generator) -> dict[str, torch.Tensor]:
        s = self.settings
        use_real = bool(self.real_items) and (
            not self.synth_items or rng.random() < s.real_fraction)
        pool = self.real_items if use_real else self.synth_items
        item = self.items[pool[int(rng.integers(len(pool)))]]
        centre = self._centre(rng, item)
        skull = rng.random() < s.skull_fraction
        shape = item.nearest.shape[1:]
        # one upload of the sample's geometry: rotation/scaling, centre, the volume's last index
        geometry = self._upload(np.concatenate([
            self._matrix(rng).ravel(), centre, [int(n) - 1 for n in shape]]))
        matrix, centre_t, last = geometry[:9].view(3, 3), geometry[9:12], geometry[12:15]
        position = self._offsets @ matrix.T + centre_t
        if s.elastic:
            position = position + self._displacement(rng, generator, s.elastic_voxels)
        grid = _normalised_grid(position, last)
        first_field = 2 if item.has_brain else 1
        image_channel = 1 if (item.has_brain and not skull) else 0
        linear = _read(item.linear[image_channel : image_channel + 1], grid, "bilinear")
        if s.field_jitter > 0:
            jittered = position + self._displacement(rng, generator, s.field_jitter)
            distance = _read(item.linear[first_field:], _normalised_grid(jittered, last),
                               "bilinear")
        else:
            distance = _read(item.linear[first_field:], grid, "bilinear")
        nearest = _read(item.nearest, grid, "nearest").round().long()
        labels = nearest[:1]
        if use_real:  # the app's input there; a bias field only as augmentation
            image = linear.float().clamp(0, 1)
            if s.augment:
                image = (image * self._bias(rng, generator)).clamp(0, 1)
        else:
            image = self._synthesise(item, nearest[1], rng, generator, skull=skull)
        if s.augment:
            image = self._augment(image, rng, generator)
        inside = _inside(position, last)  # outside the volume: zeros, as the CPU sampler pads
        return {"image": (image * inside).float(), "distance": distance.float().clamp(0, 1),
                "label": labels * inside.long()}

    def _synthesise(self, item: _DeviceItem, value_index: torch.Tensor, rng: np.random.Generator,
                    generator: torch.Generator, *, skull: bool) -> torch.Tensor:
        """``(1, X, Y, Z)`` random-contrast image of the patch's value indices, normalised by
        the whole map's estimated percentiles (as :func:`~bids_cadiff.training.synth.synthesize`)."""
        assert item.values is not None and item.counts is not None
        values = item.values
        t1 = rng.random() < 0.7
        keep = np.array([v != 0 and (skull or int(v) in BRAIN_VALUES) for v in values])
        if t1:
            prior = np.array([T1_PRIOR.get(int(v), rng.uniform(0.05, 0.9)) for v in values])
            means = np.clip(prior + rng.normal(0, 0.08, size=len(values)), 0.02, 1.2)
        else:
            means = rng.uniform(0.05, 1.0, size=len(values))
        stds = rng.uniform(0.01, 0.06, size=len(values))
        means, stds = np.where(keep, means, 0.0), np.where(keep, stds, 0.0)
        weights = np.where(keep, item.counts, 0).astype(np.float64)
        if weights.sum() > 0:
            pick = rng.choice(len(values), size=MIXTURE_DRAWS, p=weights / weights.sum())
            draws = np.clip(rng.normal(means[pick], stds[pick]), 0, None)
            draws = draws[draws > 0]
            lo, hi = np.percentile(draws, [0.5, 99.5]) if draws.size else (0.0, 1.0)
        else:
            lo, hi = 0.0, 1.0
        hi = max(float(hi), float(lo) + 1e-6)
        mean_t, std_t = self._upload(np.stack([means, stds]))
        index = value_index.clamp(0, len(values) - 1)[None]
        noise = torch.randn(index.shape, generator=generator, device=self.device)
        image = (mean_t[index] + std_t[index] * noise).clamp_min(0)
        image = image * self._bias(rng, generator)
        return ((image - lo) / (hi - lo)).clamp(0, 1)

    def _bias(self, rng: np.random.Generator, generator: torch.Generator) -> torch.Tensor:
        """A smooth multiplicative field ``exp(N(0, strength))`` from a 4³ grid."""
        strength = rng.uniform(0.0, 0.3)
        coarse = torch.randn((1, 1, 4, 4, 4), generator=generator, device=self.device) * strength
        return torch.exp(F.interpolate(coarse, size=self.patch, mode="trilinear",
                                       align_corners=True)[0])

    def _augment(self, image: torch.Tensor, rng: np.random.Generator,
                 generator: torch.Generator) -> torch.Tensor:
        """Blur, resolution loss, gamma and noise of ``(1, X, Y, Z)`` in [0, 1] (as
        :func:`~bids_cadiff.training.synth.augment_intensity`)."""
        out = image
        if rng.random() < 0.5:
            out = _gaussian_blur(out, rng.uniform(0.2, 1.0))
        if rng.random() < 0.3:
            axis = int(rng.integers(0, 3))
            factor = rng.uniform(1.3, 2.5)
            small = list(self.patch)
            small[axis] = max(1, round(self.patch[axis] / factor))
            low = F.interpolate(out[None], size=tuple(small), mode="trilinear",
                                align_corners=True)
            out = F.interpolate(low, size=self.patch, mode="trilinear", align_corners=True)[0]
        out = out.clamp(0, 1) ** float(np.exp(rng.normal(0, 0.2)))
        sigma = rng.uniform(0.0, 0.04)
        out = out + sigma * torch.randn(out.shape, generator=generator, device=self.device)
        return out.clamp(0, 1)


def _normalised_grid(position: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Voxel positions ``(X, Y, Z, 3)`` in a volume whose last index is ``last`` (3,) →
    ``grid_sample``'s ``(1, X, Y, Z, 3)`` grid: ``(x, y, z)`` = (last, middle, first) axis, in
    [-1, 1] (``align_corners``)."""
    return (2.0 * position / last.clamp_min(1) - 1.0).flip(-1)[None]


def _read(volume: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    """``volume`` ``(C, X, Y, Z)`` read at ``grid`` → ``(C, *patch)``, zeros outside."""
    return F.grid_sample(volume[None], grid.to(volume.dtype), mode=mode, padding_mode="zeros",
                         align_corners=True)[0]


def _inside(position: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """``(1, X, Y, Z)`` 1 where a position lies inside the volume (last index ``last``), else 0."""
    ok = ((position >= -0.5) & (position <= last + 0.5)).all(dim=-1)
    return ok[None].to(torch.float32)


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(1, X, Y, Z)`` (truncated at 3 sigma), edges replicated."""
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=image.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(image.dtype)
    out = image[None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.view(shape))
    return out[0]
