"""Training data of the 1 mm refiner: fine patches of image and labels, with simulated coarse
probabilities.

The refiner (:mod:`bids_cadiff.models.refiner`) learns to turn coarse class probabilities and
the 1 mm image into 1 mm labels. Its coarse input is *simulated* from the true labels, not
taken from a trained CA-Diff model: a model's outputs on its own training images are better
than on new ones, and a refiner trained on them would learn to trust them too much. The
simulation (:func:`simulate_coarse`) makes the kinds of error a coarse model makes: the
labels displaced by a smooth random deformation of several millimetres, averaged onto the
coarse grid (partial volume), blurred, tempered, with every structure grown or shrunk by a
random logit bias, then trilinearly upsampled back, as the app upsamples. A refiner trained
this way does not depend on any one CA-Diff model.

Images: real T1w (skull on, or skull-stripped with the labels' brain mask) and images
synthesised from label maps in the SynthSeg manner (:mod:`bids_cadiff.training.synth`), both
normalised by :func:`~bids_cadiff.inference.refiner.refiner_image`'s rule over the *whole*
volume's brain (for synthetic images from the drawn intensities, as
:func:`~bids_cadiff.training.synth.mixture_range` does), never over the patch.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from bids_cadiff.imaging.preprocess import to_ras
from bids_cadiff.inference.refiner import BRAIN_PERCENTILE, refiner_image
from bids_cadiff.labels import ASEG_MERGE, LabelTable, split_left_codes_at_midline
from bids_cadiff.training.prepare import brain_mask_from_labels, labels_to_index
from bids_cadiff.training.synth import (
    augment_intensity,
    bias_field,
    deform,
    draw_intensities,
    extracerebral_csf_to_background,
    mixture_range,
    smooth_deformation,
)

log = logging.getLogger(__name__)

__all__ = [
    "CoarseSimulation",
    "RefinerVolume",
    "simulate_coarse",
    "load_real_volume",
    "load_label_map_volume",
    "RefinerPatches",
]


@dataclass(frozen=True)
class CoarseSimulation:
    """How :func:`simulate_coarse` degrades the true labels.

    Attributes:
        factor: fine voxels per coarse voxel along each axis (2: 1 mm → 2 mm).
        deformation: scale of the smooth random displacement, fine voxels
            (:func:`~bids_cadiff.training.synth.smooth_deformation`'s ``max_voxels``).
        blur: range of the Gaussian blur, coarse voxels.
        temperature: range of the temperature applied to the coarse log-probabilities.
        class_bias: standard deviation of a random logit bias per structure (grows or
            shrinks it; background keeps 0).
    """

    factor: int = 2
    deformation: float = 6.0
    blur: tuple[float, float] = (0.3, 1.0)
    temperature: tuple[float, float] = (0.7, 2.0)
    class_bias: float = 0.7

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise ValueError(f"factor must be >= 1, got {self.factor}")
        if self.deformation < 0 or self.class_bias < 0:
            raise ValueError("deformation and class_bias must be >= 0")
        if not 0 <= self.blur[0] <= self.blur[1]:
            raise ValueError(f"blur must be a range (low, high) >= 0, got {self.blur}")
        if not 0 < self.temperature[0] <= self.temperature[1]:
            raise ValueError(f"temperature must be a range (low, high) > 0, got {self.temperature}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def simulate_coarse(
    index: np.ndarray, num_classes: int, rng: np.random.Generator, sim: CoarseSimulation
) -> np.ndarray:
    """Coarse-model-like probabilities of a fine label patch, back on the fine grid.

    Args:
        index: ``(X, Y, Z)`` channel indices (0 background), sizes divisible by ``sim.factor``.
        num_classes: C.
        rng: random generator.
        sim: the degradation.

    Returns:
        ``(C, X, Y, Z)`` float32 probabilities summing to 1.
    """
    if any(n % sim.factor for n in index.shape):
        raise ValueError(f"patch {index.shape} is not divisible by the factor {sim.factor}")
    onehot = np.zeros((num_classes, *index.shape), dtype=np.float32)
    np.put_along_axis(onehot, index.astype(np.int64)[None], 1.0, axis=0)
    if sim.deformation > 0:
        disp = smooth_deformation(tuple(index.shape), rng, max_voxels=sim.deformation)  # type: ignore[arg-type]
        onehot = deform({"p": onehot}, disp)["p"]
        onehot[0] += np.clip(1.0 - onehot.sum(axis=0), 0.0, None)  # outside: background
    coarse = F.avg_pool3d(torch.from_numpy(onehot)[None], sim.factor)[0].numpy()
    sigma = float(rng.uniform(*sim.blur))
    if sigma > 0:
        coarse = ndimage.gaussian_filter(coarse, (0, sigma, sigma, sigma), mode="nearest")
    logits = np.log(np.clip(coarse, 1e-4, None)) / float(rng.uniform(*sim.temperature))
    bias = rng.normal(0.0, sim.class_bias, size=num_classes).astype(np.float32)
    bias[0] = 0.0
    logits += bias[:, None, None, None]
    probs = torch.softmax(torch.from_numpy(logits.astype(np.float32)), dim=0)
    if sim.factor > 1:
        probs = F.interpolate(probs[None], scale_factor=sim.factor, mode="trilinear",
                              align_corners=False)[0]
    return (probs / probs.sum(dim=0, keepdim=True)).numpy().astype(np.float32)


@dataclass
class RefinerVolume:
    """One training volume on a 1 mm RAS grid, cropped to its labelled head.

    Attributes:
        index: ``(X, Y, Z)`` int16 target channels.
        values: ``(X, Y, Z)`` int32 FreeSurfer values the synthesis draws from (label maps).
        image: ``(X, Y, Z)`` float32 real image with skull, normalised (``None``: label map).
        stripped: ``(X, Y, Z)`` float32 real image skull-stripped, normalised.
        name: for logs.
    """

    index: np.ndarray
    values: np.ndarray | None = None
    image: np.ndarray | None = None
    stripped: np.ndarray | None = None
    name: str = ""

    def __post_init__(self) -> None:
        self.foreground = np.argwhere(self.index > 0).astype(np.int32)
        if self.values is not None:
            brain = self.values[self.index > 0]
            present, counts = np.unique(brain, return_counts=True)
            self.brain_counts = {int(v): int(c) for v, c in zip(present, counts)}

    @property
    def real(self) -> bool:
        return self.image is not None


def _head_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    found = np.argwhere(mask)
    lo = np.maximum(found.min(0) - margin, 0)
    hi = np.minimum(found.max(0) + margin + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _on_grid(path: Path, voxel_size: float) -> nib.Nifti1Image:
    img = to_ras(nib.load(str(path)))
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    if not np.allclose(zooms, voxel_size, atol=0.05 * voxel_size):
        raise ValueError(
            f"{path}: the refiner trains on {voxel_size:g} mm images and labels, this one has "
            f"{', '.join(f'{z:.3g}' for z in zooms)} mm voxels; resample it to "
            f"{voxel_size:g} mm (e.g. mri_convert --conform for 1 mm) first"
        )
    return img


def load_real_volume(
    t1w_path: str | Path,
    label_path: str | Path,
    table: LabelTable,
    *,
    merge: Mapping[int, int] | None = ASEG_MERGE,
    voxel_size: float = 1.0,
    margin: int = 24,
) -> RefinerVolume:
    """A labelled real T1w (``voxel_size`` mm, any orientation) with its labels on its grid
    (values mapped to ``table`` with ``merge``, as CA-Diff's training maps them).

    The skull-stripped variant is the T1w times the labels' filled brain mask, as training of
    the coarse model makes it. Both images are normalised over the labelled voxels
    (:func:`~bids_cadiff.inference.refiner.refiner_image`).
    """
    t1 = _on_grid(Path(t1w_path), voxel_size)
    lab = _on_grid(Path(label_path), voxel_size)
    if t1.shape[:3] != lab.shape[:3] or not np.allclose(t1.affine, lab.affine, atol=1e-3):
        raise ValueError(f"{label_path} is not on the grid of {t1w_path}; resample it onto the T1w")
    values = np.asarray(lab.dataobj).astype(np.int32)
    index = labels_to_index(values, table, merge, lab.affine)
    box = _head_box(values > 0, margin)
    image = np.asarray(t1.dataobj, dtype=np.float32)[box]
    index = index[box]
    brain = index > 0
    mask = brain_mask_from_labels(values[box])
    return RefinerVolume(
        index=index, image=refiner_image(image, brain), stripped=refiner_image(image * mask, brain),
        name=Path(t1w_path).name,
    )


def load_label_map_volume(
    path: str | Path,
    table: LabelTable,
    *,
    merge: Mapping[int, int] | None = ASEG_MERGE,
    split_midline: bool = False,
    csf_to_background: bool = True,
    voxel_size: float = 1.0,
    margin: int = 24,
) -> RefinerVolume:
    """A SynthSeg-style label map (``voxel_size`` mm): targets as CA-Diff's training makes
    them (with ``csf_to_background``, extra-cerebral CSF is background, as
    :func:`~bids_cadiff.training.synth.extracerebral_csf_to_background`), raw values kept for
    the synthesis."""
    img = _on_grid(Path(path), voxel_size)
    values = np.asarray(img.dataobj).astype(np.int32)
    if split_midline:
        values = split_left_codes_at_midline(values, img.affine)
    box = _head_box(values > 0, margin)
    values = values[box]
    targets = extracerebral_csf_to_background(values) if csf_to_background else values
    index = labels_to_index(targets, table, merge, img.affine)
    return RefinerVolume(index=index, values=values, name=Path(path).name)


def synthesize_patch(
    values: np.ndarray, brain_counts: dict[int, int], rng: np.random.Generator, *, skull: bool
) -> np.ndarray:
    """A random-contrast image of a label patch, normalised as :func:`refiner_image` would
    normalise the whole synthetic volume: divided by the brain's
    :data:`~bids_cadiff.inference.refiner.BRAIN_PERCENTILE`-th percentile estimated from the
    drawn intensities and the whole map's brain voxel counts; then intensity augmentation.

    Returns:
        ``(X, Y, Z)`` float32 in [0, 1].
    """
    present = {int(v) for v in np.unique(values)} | set(brain_counts)
    intensities = draw_intensities(sorted(present), rng, skull=skull)
    out = np.zeros(values.shape, dtype=np.float32)
    for v in np.unique(values):
        mean, std = intensities[int(v)]
        if mean > 0:
            mask = values == v
            out[mask] = rng.normal(mean, std, size=int(mask.sum()))
    out = np.clip(out, 0, None) * bias_field(out.shape, rng, rng.uniform(0.0, 0.3))
    _, scale = mixture_range(brain_counts, intensities, rng, lower=0.0, upper=BRAIN_PERCENTILE)
    return augment_intensity(np.clip(out / max(scale, 1e-6), 0, 1), rng)


def _crop(array: np.ndarray, lo: np.ndarray, size: int) -> np.ndarray:
    """``array[lo : lo + size]`` on each axis, zero-padded where it leaves the array."""
    hi = lo + size
    src = tuple(slice(max(int(a), 0), min(int(b), n)) for a, b, n in zip(lo, hi, array.shape))
    pad = [(max(-int(a), 0), max(int(b) - n, 0)) for a, b, n in zip(lo, hi, array.shape)]
    return np.pad(array[src], pad)


class RefinerPatches(torch.utils.data.Dataset):
    """Random training patches of the refiner.

    Item ``i`` is drawn from ``np.random.default_rng([seed, i])``: a real volume with
    probability ``real_fraction`` (skull on with probability ``skull_fraction``), else a label
    map with a synthesised image (head or brain alike); a centre on a labelled voxel; the
    coarse probabilities simulated on a margin around the patch.

    Items: ``{"input": (1 + C, P, P, P) float32, "target": (1, P, P, P) int64}``.
    """

    def __init__(
        self,
        real: Sequence[RefinerVolume],
        maps: Sequence[RefinerVolume],
        *,
        num_classes: int,
        patch: int,
        length: int,
        sim: CoarseSimulation,
        real_fraction: float = 0.5,
        skull_fraction: float = 0.6,
        seed: int = 0,
        margin: int = 8,
    ) -> None:
        if not real and not maps:
            raise ValueError("the refiner needs at least one real volume or label map")
        if patch % 4 or (patch + 2 * margin) % sim.factor:
            raise ValueError(f"patch {patch} must be divisible by 4 (and by the factor)")
        self.real, self.maps = list(real), list(maps)
        self.num_classes, self.patch, self.length = num_classes, patch, length
        self.sim, self.seed, self.margin = sim, seed, margin
        self.real_fraction = real_fraction if maps and real else (1.0 if real else 0.0)
        self.skull_fraction = skull_fraction

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(i)])
        real = rng.random() < self.real_fraction
        pool = self.real if real else self.maps
        vol = pool[int(rng.integers(len(pool)))]
        centre = vol.foreground[int(rng.integers(len(vol.foreground)))]
        size = self.patch + 2 * self.margin
        lo = centre - size // 2 + rng.integers(-8, 9, size=3)
        index = _crop(vol.index, lo, size)
        coarse = simulate_coarse(index, self.num_classes, rng, self.sim)
        inner = (slice(None),) + (slice(self.margin, self.margin + self.patch),) * 3
        coarse = coarse[inner]
        lo_in = lo + self.margin
        skull = rng.random() < self.skull_fraction
        if real:
            source = vol.image if skull else vol.stripped
            assert source is not None
            image = _crop(source, lo_in, self.patch)
            if rng.random() < 0.5:
                image = augment_intensity(image, rng)
        else:
            assert vol.values is not None
            image = synthesize_patch(_crop(vol.values, lo_in, self.patch), vol.brain_counts,
                                     rng, skull=skull)
        target = _crop(vol.index, lo_in, self.patch)
        return {
            "input": torch.from_numpy(np.concatenate([image[None], coarse]).astype(np.float32)),
            "target": torch.from_numpy(target.astype(np.int64)[None]),
        }
