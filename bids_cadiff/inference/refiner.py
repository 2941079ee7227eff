"""Running the 1 mm refiner (:mod:`bids_cadiff.models.refiner`) on a segmented image.

The model's probabilities on its coarse grid (the brain box, ``crop_affine``) are upsampled
by an integer factor onto a fine grid that subdivides each coarse voxel (2 mm → 1 mm), the
bias-corrected T1w is resampled onto the same fine grid, and the refiner runs there in MONAI
sliding windows. Its probabilities then go onto the T1w's own grid as the coarse ones would
(:func:`~bids_cadiff.inference.resample.posterior_on_grid`).

Only the part of the box where some structure is possible (background probability below
``active_threshold`` on the coarse grid, plus a margin) is refined; elsewhere the fine grid is
background, as the coarse probabilities say. Inside, a structure whose upsampled coarse
probability is at most the refiner's ``prob_floor`` keeps probability 0, so the refiner moves
boundaries but does not spread every structure thinly over the box (which would inflate soft
volumes).

The image normalisation (:func:`refiner_image`) is the one training uses
(:mod:`bids_cadiff.training.refiner_data`): intensities divided by their 99th percentile over
the brain, clipped to [0, 1].
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from bids_cadiff.inference.resample import field_to_grid
from bids_cadiff.models.refiner import Refiner

log = logging.getLogger(__name__)

__all__ = [
    "BRAIN_PERCENTILE",
    "refiner_image",
    "grid_factor",
    "fine_grid",
    "upsample_probabilities",
    "active_box",
    "refine_probabilities",
]

#: Percentile of the brain's intensities that maps to 1 in the refiner's input.
BRAIN_PERCENTILE = 99.0


def refiner_image(intensity: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """The refiner's image input: ``intensity`` divided by its :data:`BRAIN_PERCENTILE`-th
    percentile over ``brain``, clipped to [0, 1].

    Args:
        intensity: ``(X, Y, Z)`` bias-corrected intensities (any scale).
        brain: ``(X, Y, Z)`` bool, the voxels of the brain (any structure more probable than
            background at inference; the labelled voxels in training).

    Returns:
        ``(X, Y, Z)`` float32 in [0, 1] (zeros when ``brain`` is empty or dark).
    """
    values = np.asarray(intensity, dtype=np.float32)
    inside = values[np.asarray(brain, dtype=bool)]
    scale = float(np.percentile(inside, BRAIN_PERCENTILE)) if inside.size else 0.0
    if not scale > 0:
        return np.zeros(values.shape, dtype=np.float32)
    return np.clip(values / scale, 0.0, 1.0).astype(np.float32)


def grid_factor(zooms: "np.ndarray | list[float] | tuple[float, ...]", voxel_size: float) -> int | None:
    """The integer number of ``voxel_size`` voxels per coarse voxel of size ``zooms`` (mm)
    along every axis, or ``None`` when it is not the same integer on all of them."""
    ratio = np.asarray(zooms, dtype=float) / float(voxel_size)
    factor = int(round(float(ratio[0])))
    return factor if factor >= 1 and np.allclose(ratio, factor, atol=1e-3) else None


def upsampling_factor(coarse_affine: np.ndarray, voxel_size: float) -> int:
    """How many fine voxels of ``voxel_size`` mm split a coarse voxel along each axis.

    Raises:
        ValueError: the coarse grid is not isotropic or not an integer multiple of ``voxel_size``.
    """
    zooms = np.linalg.norm(np.asarray(coarse_affine)[:3, :3], axis=0)
    factor = grid_factor(zooms, voxel_size)
    if factor is None:
        raise ValueError(
            f"the model's grid ({', '.join(f'{z:.3g}' for z in zooms)} mm) is not an integer "
            f"multiple of the refiner's {voxel_size:g} mm; use a refiner made for this model"
        )
    return factor


def fine_grid(
    coarse_shape: tuple[int, int, int], coarse_affine: np.ndarray, factor: int
) -> tuple[tuple[int, int, int], np.ndarray]:
    """The grid that splits every coarse voxel into ``factor³`` fine ones (same extent).

    Fine voxel ``j`` has its centre at coarse coordinate ``(j + 0.5) / factor − 0.5``, the
    geometry of ``F.interpolate(..., scale_factor=factor, align_corners=False)``.

    Returns:
        ``(shape, affine)`` of the fine grid.
    """
    scale = np.eye(4)
    scale[:3, :3] /= factor
    scale[:3, 3] = (1.0 / factor - 1.0) / 2.0
    shape = tuple(int(n) * factor for n in coarse_shape)
    return (shape[0], shape[1], shape[2]), np.asarray(coarse_affine, dtype=np.float64) @ scale


def upsample_probabilities(probs: torch.Tensor, factor: int, normalise: bool = True) -> torch.Tensor:
    """``(C, X, Y, Z)`` → ``(C, fX, fY, fZ)`` trilinear (the :func:`fine_grid` geometry),
    renormalised to sum to 1 over the classes unless ``normalise`` is false (for a subset of
    the classes)."""
    if factor == 1:
        return probs.float()
    fine = F.interpolate(probs[None].float(), scale_factor=factor, mode="trilinear",
                         align_corners=False)[0]
    return fine / fine.sum(dim=0, keepdim=True).clamp_min(1e-6) if normalise else fine


def active_box(
    probs: torch.Tensor, threshold: float = 0.995, margin: int = 2, multiple: int = 2
) -> tuple[slice, slice, slice]:
    """The coarse voxels where some structure is possible (background below ``threshold``),
    with ``margin`` voxels around, widened so each side is a multiple of ``multiple`` voxels
    where the grid allows (the refiner wants fine sizes divisible by 4).

    Args:
        probs: ``(C, X, Y, Z)`` probabilities, channel 0 background.

    Returns:
        three slices (the whole grid when nothing is active).
    """
    shape = probs.shape[1:]
    active = np.argwhere((probs[0] < threshold).numpy())
    if len(active) == 0:
        return tuple(slice(0, int(n)) for n in shape)  # type: ignore[return-value]
    lo = np.maximum(active.min(0) - margin, 0)
    hi = np.minimum(active.max(0) + margin + 1, shape)
    out = []
    for a, b, n in zip(lo, hi, shape):
        size = int(math.ceil((b - a) / multiple) * multiple)
        b = min(int(a) + size, int(n))
        a = max(b - size, 0)
        out.append(slice(int(a), int(b)))
    return tuple(out)  # type: ignore[return-value]


def refine_probabilities(
    refiner: Refiner,
    probs: torch.Tensor,
    coarse_affine: np.ndarray,
    intensity: np.ndarray,
    intensity_affine: np.ndarray,
    *,
    window: int = 96,
    overlap: float = 0.25,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[torch.Tensor, np.ndarray]:
    """The refiner's probabilities on the fine grid of the active part of the box.

    Args:
        refiner: the trained refiner (eval mode is set here).
        probs: ``(C, X, Y, Z)`` the model's probabilities on its coarse grid.
        coarse_affine: ``(4, 4)`` voxel-to-world matrix of ``probs``.
        intensity: ``(X', Y', Z')`` bias-corrected T1w on its own grid.
        intensity_affine: ``(4, 4)`` the T1w's voxel-to-world matrix.
        window: sliding-window size in fine voxels (a multiple of 4).
        overlap: sliding-window overlap.
        device: where the network runs.
        progress: tqdm bar over windows.

    Returns:
        ``(fine_probs, fine_affine)``: ``(C, fX, fY, fZ)`` float32 probabilities on the CPU
        and their grid.
    """
    factor = upsampling_factor(coarse_affine, refiner.config.voxel_size)
    box = active_box(probs, multiple=max(1, 4 // math.gcd(4, factor)))
    offset = np.eye(4)
    offset[:3, 3] = [s.start for s in box]
    box_affine = np.asarray(coarse_affine, dtype=np.float64) @ offset
    coarse = probs[(slice(None), *box)]
    shape, affine = fine_grid(tuple(coarse.shape[1:]), box_affine, factor)  # type: ignore[arg-type]
    image, classes = _network_input(coarse, factor, intensity, intensity_affine, shape, affine)
    device = torch.device(device)
    refiner.to(device).eval()

    floor = refiner.config.prob_floor

    def predictor(x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        coarse_window = condition.float()
        logits = refiner(torch.cat([x, coarse_window], dim=1))
        # a structure the coarse probabilities rule out (at most the floor) stays out: the
        # floor would otherwise spread a little of every structure over the whole box
        probs = torch.softmax(logits, dim=1) * (coarse_window > floor)
        return probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-12)

    size = [min(window, int(math.ceil(n / 4) * 4)) for n in shape]
    with torch.no_grad():
        # the image is MONAI's input (its float32 sets the output's dtype); the half-precision
        # class channels travel as the window's `condition`, cut the same way
        out = sliding_window_inference(
            image, roi_size=size, sw_batch_size=1, predictor=predictor, overlap=overlap,
            mode="gaussian", padding_mode="constant", sw_device=device,
            device=torch.device("cpu"), progress=progress, condition=classes,
        )[0]
    del classes
    return out.div_(out.sum(dim=0, keepdim=True).clamp_min_(1e-6)), affine


def _network_input(
    coarse: torch.Tensor,
    factor: int,
    intensity: np.ndarray,
    intensity_affine: np.ndarray,
    shape: tuple[int, int, int],
    affine: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The refiner's inputs on the fine grid: ``(1, 1, fX, fY, fZ)`` float32, the normalised
    image (:func:`refiner_image`), and ``(1, C, fX, fY, fZ)`` float16, the coarse probabilities
    upsampled (:func:`upsample_probabilities`).

    Half precision, filled a few classes at a time, keeps the largest array of the stage at
    half the size of a float32 copy of the fine probabilities (the network sees float32).
    """
    classes = torch.empty((1, coarse.shape[0], *shape), dtype=torch.float16)
    # trilinear weights sum to 1, so classes upsampled apart still sum to 1 (to rounding)
    for start in range(0, coarse.shape[0], _CHANNEL_CHUNK):
        part = coarse[start:start + _CHANNEL_CHUNK]
        classes[0, start:start + part.shape[0]] = upsample_probabilities(
            part, factor, normalise=False)
    image = field_to_grid(np.asarray(intensity, dtype=np.float32), intensity_affine, shape, affine)
    # the brain: where background (class 0) is below 0.5
    brain = (classes[0, 0].float() < 0.5).numpy()
    return torch.from_numpy(refiner_image(image, brain))[None, None], classes


#: Classes upsampled at once by :func:`_network_input` (bounds its float32 temporaries).
_CHANNEL_CHUNK = 4
