"""SynthSeg-style image synthesis from label maps, and intensity augmentation of real images.

Operates on numpy arrays on the model grid; spatial augmentation (deformations) is done jointly
on image, labels and distance field elsewhere (MONAI transforms), so labels and field stay in
register.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: T1w-like mean intensities (white matter = 1) of FreeSurfer values, used as the centre of the
#: random per-label intensities; unknown (extra-cerebral) values get fully random intensities.
T1_PRIOR: dict[int, float] = {
    0: 0.0, 2: 1.0, 41: 1.0, 7: 0.95, 46: 0.95, 16: 0.85, 28: 0.8, 60: 0.8,
    3: 0.55, 42: 0.55, 8: 0.6, 47: 0.6, 17: 0.55, 53: 0.55, 18: 0.55, 54: 0.55,
    10: 0.75, 49: 0.75, 11: 0.6, 50: 0.6, 12: 0.65, 51: 0.65, 13: 0.8, 52: 0.8,
    26: 0.6, 58: 0.6, 4: 0.15, 43: 0.15, 5: 0.2, 44: 0.2, 14: 0.15, 15: 0.15, 24: 0.15,
    30: 0.4, 62: 0.4, 31: 0.4, 63: 0.4, 77: 0.85, 85: 0.7,
}

#: FreeSurfer values inside the brain (what a skull-stripped image keeps).
BRAIN_VALUES: frozenset[int] = frozenset(v for v in T1_PRIOR if v != 0) | frozenset(range(251, 256))


def mean_t1_image(labels: np.ndarray) -> np.ndarray:
    """A noiseless T1w-like image of a label map (prior intensities; others 0.3), float32."""
    values = np.unique(labels)
    lut = {int(v): T1_PRIOR.get(int(v), 0.3) for v in values}
    out = np.zeros(labels.shape, dtype=np.float32)
    for v, m in lut.items():
        out[labels == v] = m
    return out


def bias_field(shape: tuple[int, ...], rng: np.random.Generator, strength: float) -> np.ndarray:
    """Smooth multiplicative field ``exp(N(0, strength))`` from a 4³ grid, upsampled."""
    coarse = rng.normal(0.0, strength, size=(4, 4, 4))
    field = ndimage.zoom(coarse, [s / 4 for s in shape], order=3)[tuple(slice(0, s) for s in shape)]
    return np.exp(field).astype(np.float32)


def draw_intensities(
    values: "np.ndarray | list[int]", rng: np.random.Generator, *, skull: bool,
    t1_like: float = 0.7,
) -> dict[int, tuple[float, float]]:
    """Random Gaussian ``(mean, std)`` per label value, in the SynthSeg manner: T1w-like means
    with jitter with probability ``t1_like``, else fully random. Background (0), and with
    ``skull=False`` every non-brain value, get ``(0, 0)``."""
    t1 = rng.random() < t1_like
    out: dict[int, tuple[float, float]] = {}
    for v in sorted(int(x) for x in values):
        if v == 0 or (not skull and v not in BRAIN_VALUES):
            out[v] = (0.0, 0.0)
            continue
        mean = (
            float(np.clip(T1_PRIOR.get(v, rng.uniform(0.05, 0.9)) + rng.normal(0, 0.08), 0.02, 1.2))
            if t1
            else float(rng.uniform(0.05, 1.0))
        )
        out[v] = (mean, float(rng.uniform(0.01, 0.06)))
    return out


def mixture_range(
    counts: "dict[int, int]", intensities: dict[int, tuple[float, float]],
    rng: np.random.Generator, *, lower: float = 0.5, upper: float = 99.5, draws: int = 20_000,
) -> tuple[float, float]:
    """The ``lower``/``upper`` percentiles of the nonzero voxels of a whole synthesised volume,
    estimated without drawing it: ``draws`` samples of the per-label Gaussians, labels
    chosen in proportion to their voxel ``counts`` (the app's
    :func:`~bids_cadiff.imaging.preprocess.normalise_intensity` of the whole volume)."""
    keys = [v for v in counts if intensities.get(v, (0.0, 0.0))[0] > 0]
    if not keys:
        return 0.0, 1.0
    weights = np.array([counts[v] for v in keys], dtype=np.float64)
    pick = rng.choice(len(keys), size=draws, p=weights / weights.sum())
    means = np.array([intensities[v][0] for v in keys])[pick]
    stds = np.array([intensities[v][1] for v in keys])[pick]
    samples = np.clip(rng.normal(means, stds), 0, None)
    samples = samples[samples > 0]
    lo, hi = np.percentile(samples, [lower, upper]) if samples.size else (0.0, 1.0)
    return float(lo), float(max(hi, lo + 1e-6))


def synthesize(
    labels: np.ndarray, rng: np.random.Generator, *, skull: bool, t1_like: float = 0.7,
    counts: "dict[int, int] | None" = None, augment: bool = True,
) -> np.ndarray:
    """A random-contrast image of a label map (or a patch of one), in the SynthSeg manner,
    normalised as the app normalises a whole image.

    Random Gaussian intensity per label (:func:`draw_intensities`), a random bias field, then
    the percentile normalisation of the *whole* volume the labels come from
    (:func:`mixture_range` over ``counts``; the patch's own labels when ``counts`` is
    ``None``), then :func:`augment_intensity` (blur, resolution loss, gamma, noise). No
    statistic of the patch itself enters the normalisation, as none does in the app.

    Args:
        labels: ``(X, Y, Z)`` FreeSurfer label values (extra-cerebral values allowed).
        rng: random generator.
        skull: keep non-brain labels (a head) or zero them (a skull-stripped brain).
        counts: voxels per label value of the whole map the patch comes from.
        augment: apply :func:`augment_intensity`.

    Returns:
        ``(X, Y, Z)`` float32 in [0, 1].
    """
    if counts is None:
        present, n = np.unique(labels, return_counts=True)
        counts = {int(v): int(c) for v, c in zip(present, n)}
    values = set(counts) | {int(v) for v in np.unique(labels)}
    intensities = draw_intensities(sorted(values), rng, skull=skull, t1_like=t1_like)
    out = np.zeros(labels.shape, dtype=np.float32)
    for v in np.unique(labels):
        mean, std = intensities[int(v)]
        if mean <= 0:
            continue
        mask = labels == v
        out[mask] = rng.normal(mean, std, size=int(mask.sum()))
    out = np.clip(out, 0, None)
    out *= bias_field(out.shape, rng, rng.uniform(0.0, 0.3))
    lo, hi = mixture_range(counts, intensities, rng)
    out = np.clip((out - lo) / (hi - lo), 0, 1).astype(np.float32)
    return augment_intensity(out, rng) if augment else out


def augment_intensity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur, resolution loss, gamma and noise of a normalised image (values in [0, 1]).

    Works in the normalised scale and uses no statistic of the image itself, so a patch is
    augmented the same way wherever it was cut from (the app normalises whole images).

    Returns:
        float32 in [0, 1], the shape of ``image``.
    """
    out = np.clip(image.astype(np.float32, copy=True), 0, 1)
    if rng.random() < 0.5:
        out = ndimage.gaussian_filter(out, rng.uniform(0.2, 1.0))
    if rng.random() < 0.3:
        axis = int(rng.integers(0, 3))
        factor = rng.uniform(1.3, 2.5)
        zoom = [1.0, 1.0, 1.0]
        zoom[axis] = 1.0 / factor
        small = ndimage.zoom(out, zoom, order=1)
        out = ndimage.zoom(small, [o / s for o, s in zip(out.shape, small.shape)], order=1)
        out = out[tuple(slice(0, s) for s in image.shape)]
        out = np.pad(out, [(0, s - o) for s, o in zip(image.shape, out.shape)], mode="edge")
    out = np.clip(out, 0, 1) ** np.exp(rng.normal(0, 0.2))
    out = out + rng.normal(0, rng.uniform(0.0, 0.04), size=out.shape).astype(np.float32)
    return np.clip(out, 0, 1).astype(np.float32)


def smooth_deformation(
    shape: tuple[int, int, int],
    rng: np.random.Generator,
    max_voxels: float = 3.0,
    control_points: int = 5,
) -> np.ndarray:
    """A smooth random displacement field, in the SynthSeg manner (cheap: a coarse grid).

    Normal displacements on a ``control_points³`` grid with a standard deviation drawn
    uniformly from ``[0, max_voxels / 2]`` are upsampled (trilinear) to the patch.

    Args:
        shape: the patch ``(X, Y, Z)``.
        rng: random generator.
        max_voxels: scale of the displacements (about the largest, in voxels).
        control_points: coarse grid size per axis (smoothness: fewer is smoother).

    Returns:
        float32 ``(3, X, Y, Z)`` displacement in voxels along each axis.
    """
    import torch
    import torch.nn.functional as F

    std = rng.uniform(0.0, max_voxels / 2.0)
    coarse = rng.normal(0.0, std, size=(1, 3, control_points, control_points, control_points))
    fine = F.interpolate(torch.from_numpy(coarse.astype(np.float32)), size=tuple(shape),
                         mode="trilinear", align_corners=True)
    return fine[0].numpy()


def deform(
    arrays: dict[str, np.ndarray], displacement: np.ndarray, nearest: tuple[str, ...] = ()
) -> dict[str, np.ndarray]:
    """Warp channel-first ``(C, X, Y, Z)`` arrays by one displacement field (jointly).

    Args:
        arrays: name → ``(C, X, Y, Z)`` array, all on the displacement's grid.
        displacement: ``(3, X, Y, Z)`` voxels, from :func:`smooth_deformation`.
        nearest: names resampled with nearest neighbour (label maps); others linearly.

    Returns:
        the warped arrays (same shapes and dtypes); outside the patch is 0.
    """
    import torch
    import torch.nn.functional as F

    shape = displacement.shape[1:]
    position = np.indices(shape, dtype=np.float32) + displacement
    scale = np.array([max(s - 1, 1) for s in shape], dtype=np.float32).reshape(3, 1, 1, 1)
    # grid_sample wants (x, y, z) = (last, middle, first) array axis, in [-1, 1]
    grid = torch.from_numpy(2.0 * position / scale - 1.0).flip(0).permute(1, 2, 3, 0)[None]
    out: dict[str, np.ndarray] = {}
    for mode, names in (("bilinear", [n for n in arrays if n not in nearest]),
                        ("nearest", [n for n in arrays if n in nearest])):
        if not names:
            continue
        stacked = torch.from_numpy(np.concatenate([arrays[n].astype(np.float32) for n in names]))
        warped = F.grid_sample(stacked[None], grid, mode=mode, padding_mode="zeros",
                               align_corners=True)[0].numpy()
        start = 0
        for n in names:
            count = arrays[n].shape[0]
            out[n] = warped[start : start + count].astype(arrays[n].dtype)
            start += count
    return {n: out[n] for n in arrays}


#: FreeSurfer's CSF value. In aseg it is a small region (about 1 mL: the basal cisterns next
#: to the third ventricle and brain stem); in SynthSeg's training label maps it is all the
#: extra-cerebral CSF (about 350 mL), a different structure under the same value.
CSF_VALUE = 24


def extracerebral_csf_to_background(values: np.ndarray) -> np.ndarray:
    """Training targets of a SynthSeg label map in aseg's convention: CSF (24) becomes 0.

    The synthetic image is still drawn from the raw map (the CSF keeps its own intensity);
    only the target changes, so that a model trained on both kinds of map learns aseg's small
    CSF label from the real subjects instead of SynthSeg's extra-cerebral CSF.

    Args:
        values: ``(X, Y, Z)`` FreeSurfer values of the 32 structures (0 elsewhere).

    Returns:
        a copy with :data:`CSF_VALUE` set to 0.
    """
    return np.where(values == CSF_VALUE, 0, values).astype(values.dtype)
