"""Whole-volume inference: MONAI sliding windows around the seeded few-step sampler.

The starting noise M_T is drawn once for the whole volume from the seed and travels through
the sliding window as extra input channels, so overlapping windows start from the same noise
and one seed gives one result whatever the window layout. Window outputs (class probabilities)
are blended with MONAI's Gaussian importance weighting.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from bids_cadiff.models.diffusion import CADiff

log = logging.getLogger(__name__)

#: Voxels of context kept around the brain's bounding box for inference.
CROP_MARGIN = 6


def brain_box(distance: np.ndarray, margin: int = CROP_MARGIN) -> tuple[slice, ...]:
    """Bounding box (with margin) of the voxels the distance field covers: where the app
    runs the network (outside it every voxel is background).

    Args:
        distance: ``(3, X, Y, Z)``.

    Returns:
        three slices; the whole volume when the field is empty.
    """
    covered = np.argwhere(distance.any(axis=0))
    if len(covered) == 0:
        return tuple(slice(0, n) for n in distance.shape[1:])
    lo = np.maximum(covered.min(0) - margin, 0)
    hi = np.minimum(covered.max(0) + margin + 1, distance.shape[1:])
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def resolve_device(device: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(device)


def cuda_autocast_dtype() -> torch.dtype:
    """bfloat16 where the GPU has it natively, else float16 (GPUs before Ampere, such as the
    V100 and T4, only emulate bfloat16, slowly)."""
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if native else torch.float16


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Mixed precision on GPUs (:func:`cuda_autocast_dtype`); plain fp32 on CPUs, where bf16
    autocast is two orders of magnitude slower."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=cuda_autocast_dtype())
    return contextlib.nullcontext()


@dataclass(frozen=True)
class SlidingWindowSettings:
    """Args: roi_size: window in voxels; overlap: fraction in [0, 1); sw_batch_size: windows
    per network call."""

    roi_size: Sequence[int]
    overlap: float = 0.25
    sw_batch_size: int = 1


def predict_probabilities(
    model: CADiff,
    image: torch.Tensor,
    distance: torch.Tensor | None,
    *,
    window: SlidingWindowSettings,
    steps: int = 5,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Class probabilities for a whole volume.

    Args:
        model: the CA-Diff model (eval mode).
        image: ``(1, 1, *S)`` normalised image on the CPU.
        distance: ``(1, 3, *S)`` distance field in [0, 1] (``None`` in ``diffusion`` mode).
        window: sliding-window settings.
        steps: DDIM steps S.
        seed: seeds the starting noise.
        device: where the network runs; the stitched volume stays on the CPU.
        progress: show a tqdm bar over windows.

    Returns:
        ``(1, num_classes, *S)`` float32 probabilities on the CPU.
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((1, model.num_classes, *image.shape[2:]), generator=generator)
    parts = [image.float()]
    if model.model_config.uses_distance_field:
        if distance is None:
            raise ValueError(f"the model ({model.model_config.mode}) needs a distance field")
        parts.append(distance.float())
    parts.append(noise)
    stacked = torch.cat(parts, dim=1)
    n_img = image.shape[1]
    n_dist = 3 if model.model_config.uses_distance_field else 0

    def predictor(x: torch.Tensor) -> torch.Tensor:
        img = x[:, :n_img]
        dist = x[:, n_img : n_img + n_dist] if n_dist else None
        with _autocast(device):
            return model.sample(img, dist, steps=steps, noise=x[:, n_img + n_dist :]).float()

    model.to(device).eval()
    with torch.no_grad():
        return sliding_window_inference(
            stacked,
            roi_size=list(window.roi_size),
            sw_batch_size=window.sw_batch_size,
            predictor=predictor,
            overlap=window.overlap,
            mode="gaussian",
            padding_mode="constant",
            sw_device=device,
            device=torch.device("cpu"),
            progress=progress,
        )


def predict_ensemble(
    model: CADiff,
    image: torch.Tensor,
    distance: torch.Tensor | None,
    *,
    window: SlidingWindowSettings,
    seeds: Sequence[int],
    steps: int = 5,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Several samples with different seeds: mean probabilities and their disagreement.

    Returns:
        ``(probabilities, uncertainty)``: ``(1, C, *S)`` mean probabilities and ``(1, 1, *S)``
        the fraction of samples whose label differs from the label of the mean (0 where all
        samples agree; at most ``1 - 1/len(seeds)``).
    """
    if not seeds:
        raise ValueError("predict_ensemble needs at least one seed")
    total: torch.Tensor | None = None
    labels = []
    for seed in seeds:
        probs = predict_probabilities(
            model, image, distance, window=window, steps=steps, seed=seed, device=device,
            progress=progress,
        )
        labels.append(probs.argmax(dim=1, keepdim=True).to(torch.int16))
        total = probs if total is None else total + probs
    assert total is not None
    mean = total / len(seeds)
    consensus = mean.argmax(dim=1, keepdim=True).to(torch.int16)
    disagreement = torch.stack([(lab != consensus).float() for lab in labels]).mean(dim=0)
    return mean, disagreement


def predict_volume(
    model: CADiff,
    image: "np.ndarray",
    distance: "np.ndarray | None",
    *,
    patch_size: Sequence[int],
    steps: int = 5,
    seed: int = 0,
    device: torch.device | str = "cpu",
    slice_axis: int = 2,
    overlap: float = 0.25,
    progress: bool = False,
) -> torch.Tensor:
    """Class probabilities of a whole prepared volume, with a 3D model or slice by slice in 2D.

    Args:
        model: the CA-Diff model (2D or 3D), eval mode.
        image: ``(X, Y, Z)`` normalised image.
        distance: ``(3, X, Y, Z)`` distance field (``None`` in ``diffusion`` mode).
        patch_size: sliding-window size (2 or 3 values, as the model).
        steps: DDIM steps; seed: sampling seed (2D: slice ``i`` uses ``seed + i``).
        device: where the network runs.
        slice_axis: 2D models: the axis slices are taken along (2: axial in RAS).
        overlap: sliding-window overlap.
        progress: tqdm bar (over windows in 3D, over slices in 2D).

    Returns:
        ``(C, X, Y, Z)`` float32 probabilities on the CPU.
    """
    import numpy as np
    from tqdm import tqdm

    window = SlidingWindowSettings(roi_size=tuple(int(p) for p in patch_size), overlap=overlap)
    dist_t = None if distance is None else torch.from_numpy(np.ascontiguousarray(distance))
    if model.model_config.spatial_dims == 3:
        return predict_probabilities(
            model, torch.from_numpy(np.ascontiguousarray(image))[None, None],
            None if dist_t is None else dist_t[None], window=window, steps=steps, seed=seed,
            device=device, progress=progress,
        )[0]
    img = torch.from_numpy(np.ascontiguousarray(image)).movedim(slice_axis, 0)
    dist = None if dist_t is None else dist_t.movedim(1 + slice_axis, 1)
    out = torch.zeros((model.num_classes, *img.shape), dtype=torch.float32)
    for i in tqdm(range(img.shape[0]), desc="slices", disable=not progress):
        out[:, i] = predict_probabilities(
            model, img[i][None, None], None if dist is None else dist[:, i][None],
            window=window, steps=steps, seed=seed + i, device=device,
        )[0]
    return out.movedim(1, 1 + slice_axis).contiguous()
