"""Image preprocessing for T1w inputs: orientation, resampling, intensity scaling, bias correction.

All functions take and return in-memory objects (``nibabel.Nifti1Image`` or numpy arrays); none
reads or writes files. Arrays are indexed ``(X, Y, Z)`` in voxel order; after :func:`to_ras` the
voxel axes point Right, Anterior, Superior.

The antspyx bridge (:func:`nib_to_ants`, :func:`ants_to_nib`) converts between nibabel's RAS
world convention and ITK's LPS one: ``affine_lps = diag(-1, -1, 1, 1) @ affine_ras``, with
ITK's ``origin``, ``spacing`` and ``direction`` read from ``affine_lps``. ``antspyx`` is imported
lazily so that importing this module stays cheap.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to
from scipy import ndimage

if TYPE_CHECKING:  # pragma: no cover
    import ants

logger = logging.getLogger(__name__)

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

__all__ = [
    "ants_affine",
    "bias_field",
    "ants_to_nib",
    "foreground_mask",
    "looks_skull_stripped",
    "n4_bias_correct",
    "nib_to_ants",
    "normalise_intensity",
    "resample_to_reference",
    "resample_to_spacing",
    "to_ras",
]


def to_ras(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """Reorient an image to the closest RAS+ voxel order.

    Args:
        img: 3-D image ``(X, Y, Z)`` or 4-D with a singleton last axis ``(X, Y, Z, 1)``, any
            orientation (e.g. LIA for FreeSurfer's ``.mgz``).

    Returns:
        A ``Nifti1Image`` whose voxel axes are R, A, S (a pure axis permutation/flip: no
        interpolation, same data type, same world coordinates for every voxel).

    Raises:
        ValueError: the image is not 3-D after squeezing a singleton 4th axis.
    """
    if len(img.shape) == 4 and img.shape[3] == 1:
        data = np.asanyarray(img.dataobj)[..., 0]
        img = nib.Nifti1Image(data, img.affine)
    elif len(img.shape) != 3:
        raise ValueError(f"expected a 3-D image (or 4-D with one volume), got shape {img.shape}")
    if not isinstance(img, nib.Nifti1Image):
        img = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine)
    return nib.as_closest_canonical(img)


def _as_spacing(spacing_mm: float | tuple[float, float, float]) -> np.ndarray:
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,)).copy()
    if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    return spacing


def resample_to_spacing(
    img: nib.Nifti1Image, spacing_mm: float | tuple[float, float, float], order: int = 1
) -> nib.Nifti1Image:
    """Resample an image to a new voxel size, keeping its field of view.

    The new grid starts at the same corner (voxel edge) as the old one and covers the same
    extent, rounded to whole voxels; axis directions are kept.

    Args:
        img: 3-D image ``(X, Y, Z)``, normally RAS (from :func:`to_ras`).
        spacing_mm: target voxel size in mm, one number or one per axis.
        order: spline order (0 nearest for labels, 1 linear, 3 cubic).

    Returns:
        ``Nifti1Image`` of shape ``round(shape * old_spacing / spacing)``; float32 data for
        ``order > 0``, the input dtype for ``order == 0``.
    """
    new_spacing = _as_spacing(spacing_mm)
    affine = np.asarray(img.affine, dtype=float)
    rot_zoom = affine[:3, :3]
    old_spacing = np.sqrt((rot_zoom**2).sum(axis=0))
    directions = rot_zoom / old_spacing
    shape = np.asarray(img.shape[:3])
    new_shape = np.maximum(np.round(shape * old_spacing / new_spacing), 1).astype(int)
    new_rot_zoom = directions * new_spacing
    # Voxel centre (0,0,0) sits half a voxel inside the grid's corner; keep the corner fixed.
    corner = affine[:3, 3] - rot_zoom @ np.full(3, 0.5)
    new_affine = np.eye(4)
    new_affine[:3, :3] = new_rot_zoom
    new_affine[:3, 3] = corner + new_rot_zoom @ np.full(3, 0.5)
    data = np.asanyarray(img.dataobj)
    if order > 0:
        data = data.astype(np.float32, copy=False)
    src = nib.Nifti1Image(data, affine)
    out = resample_from_to(src, (tuple(int(s) for s in new_shape), new_affine), order=order,
                           mode="nearest")
    out_data = np.asanyarray(out.dataobj)
    if order > 0:
        out_data = out_data.astype(np.float32, copy=False)
    return nib.Nifti1Image(out_data, new_affine)


def resample_to_reference(
    data: np.ndarray,
    src_affine: np.ndarray,
    ref_shape: tuple[int, int, int],
    ref_affine: np.ndarray,
    order: int = 0,
    *,
    cval: float = 0.0,
) -> np.ndarray:
    """Bring an array from its grid onto a reference grid (e.g. a prediction onto the T1w).

    Args:
        data: ``(X, Y, Z)`` or channels-first ``(C, X, Y, Z)`` array on the grid ``src_affine``.
        src_affine: ``(4, 4)`` voxel-to-world affine of ``data``'s spatial axes.
        ref_shape: spatial shape ``(X', Y', Z')`` of the reference grid.
        ref_affine: ``(4, 4)`` voxel-to-world affine of the reference grid.
        order: 0 nearest (labels: values are copied, dtype kept), 1 linear (probabilities,
            distance fields).
        cval: value for reference voxels that fall outside ``data``.

    Returns:
        ``(X', Y', Z')`` or ``(C, X', Y', Z')``; dtype of ``data`` for ``order == 0``, float32
        otherwise.
    """
    if data.ndim not in (3, 4):
        raise ValueError(f"data must be (X, Y, Z) or (C, X, Y, Z), got shape {data.shape}")
    ref_shape = tuple(int(s) for s in ref_shape[:3])
    # voxel index in src for each voxel index in ref: src_vox = inv(src) @ ref @ ref_vox
    mapping = np.linalg.inv(np.asarray(src_affine, float)) @ np.asarray(ref_affine, float)
    matrix, offset = mapping[:3, :3], mapping[:3, 3]
    channels = data[None] if data.ndim == 3 else data
    out_dtype = data.dtype if order == 0 else np.float32
    out = np.empty((channels.shape[0], *ref_shape), dtype=out_dtype)
    # Pad one voxel of cval and extend with "nearest": a reference voxel whose centre falls in
    # the outer half of an edge voxel still gets that voxel (order 0), beyond it cval.
    for c, channel in enumerate(channels):
        src = channel if order == 0 else channel.astype(np.float32, copy=False)
        src = np.pad(src, 1, mode="constant", constant_values=cval)
        out[c] = ndimage.affine_transform(
            src, matrix, offset=offset + 1.0, output_shape=ref_shape, order=order,
            mode="nearest",
        )
    return out[0] if data.ndim == 3 else out


def normalise_intensity(
    data: np.ndarray,
    *,
    lower_percentile: float = 0.5,
    upper_percentile: float = 99.5,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Robustly rescale intensities to ``[0, 1]``.

    ``lo``/``hi`` are the given percentiles over the nonzero voxels (or over ``mask``);
    the output is ``clip((data - lo) / (hi - lo), 0, 1)``. Because it depends only on the
    ranks of intensities, a raw scanner T1w (any scale, e.g. 0-4095) and a FreeSurfer-style
    image (white matter at 110) of the same head map to the same values, and a positive
    rescaling ``a * data`` gives exactly the same result.

    Args:
        data: ``(X, Y, Z)`` array, any numeric dtype.
        lower_percentile: percentile mapped to 0.
        upper_percentile: percentile mapped to 1 (bright outliers such as vessels clip).
        mask: optional boolean ``(X, Y, Z)``; percentiles are taken inside it.

    Returns:
        float32 ``(X, Y, Z)`` in ``[0, 1]``. An image with no spread (constant) gives zeros.
    """
    if not 0 <= lower_percentile < upper_percentile <= 100:
        raise ValueError(
            f"need 0 <= lower_percentile < upper_percentile <= 100, "
            f"got {lower_percentile}, {upper_percentile}"
        )
    data = np.asarray(data, dtype=np.float32)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != data.shape:
            raise ValueError(f"mask shape {mask.shape} differs from data shape {data.shape}")
        values = data[mask]
    else:
        values = data[data != 0]
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.zeros_like(data, dtype=np.float32)
    lo, hi = np.percentile(values, [lower_percentile, upper_percentile])
    if not hi > lo:
        return np.zeros_like(data, dtype=np.float32)
    out = (data - np.float32(lo)) / np.float32(hi - lo)
    out = np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


#: Largest foreground volume (mL) still taken as a brain-only image; with skull, heads are
#: > 3000 mL (measured: Colin27 3915, chris_t1 3086, FreeSurfer T1.mgz 3034), brains < 1900.
SKULL_STRIPPED_MAX_ML = 2500.0


def foreground_mask(data: np.ndarray, *, fraction: float = 0.1) -> np.ndarray:
    """The object in an image: voxels above ``fraction`` x the 99th percentile of positive
    voxels, largest connected component, holes filled.

    Args:
        data: ``(X, Y, Z)`` intensities (nonnegative).
        fraction: threshold relative to the 99th percentile.

    Returns:
        boolean ``(X, Y, Z)``; all False if the image has no positive voxel.
    """
    data = np.asarray(data, dtype=np.float32)
    positive = data[data > 0]
    if positive.size == 0:
        return np.zeros(data.shape, dtype=bool)
    mask = data > fraction * float(np.percentile(positive, 99))
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(mask)


def looks_skull_stripped(data: np.ndarray, affine: np.ndarray) -> bool:
    """Whether an image shows a brain only (no skull/scalp), judged by its foreground volume.

    Args:
        data: ``(X, Y, Z)`` T1w intensities.
        affine: ``(4, 4)`` voxel-to-world affine (for the voxel volume).

    Returns:
        True when the :func:`foreground_mask` volume is under :data:`SKULL_STRIPPED_MAX_ML`.
    """
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, float)[:3, :3]))) / 1000.0
    volume_ml = float(foreground_mask(data).sum()) * voxel_ml
    logger.debug("foreground volume %.0f mL", volume_ml)
    return volume_ml < SKULL_STRIPPED_MAX_ML


def nib_to_ants(img: nib.Nifti1Image, data: np.ndarray | None = None) -> "ants.ANTsImage":
    """Convert a 3-D nibabel image (RAS world) to an ``ants.ANTsImage`` (LPS physical space).

    Args:
        img: 3-D image; only its affine is used when ``data`` is given.
        data: optional ``(X, Y, Z)`` array to use instead of ``img``'s data.

    Returns:
        float32 ANTs image with origin, spacing and direction such that every voxel has the same
        physical position as in ``img`` (LPS sign convention).
    """
    import ants

    arr = np.asanyarray(img.dataobj) if data is None else data
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.ndim != 3:
        raise ValueError(f"expected a 3-D array, got shape {arr.shape}")
    lps = _RAS_TO_LPS @ np.asarray(img.affine, dtype=float)
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    direction = lps[:3, :3] / spacing
    return ants.from_numpy(
        arr, origin=tuple(float(v) for v in lps[:3, 3]),
        spacing=tuple(float(v) for v in spacing), direction=direction,
    )


def ants_affine(image: "ants.ANTsImage") -> np.ndarray:
    """The ``(4, 4)`` RAS voxel-to-world affine of an ANTs image."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.direction, float) * np.asarray(image.spacing, float)
    lps[:3, 3] = np.asarray(image.origin, float)
    return _RAS_TO_LPS @ lps


def ants_to_nib(image: "ants.ANTsImage") -> nib.Nifti1Image:
    """Convert a 3-D ``ants.ANTsImage`` back to a ``Nifti1Image`` (inverse of :func:`nib_to_ants`).

    Returns:
        ``Nifti1Image`` with the ANTs voxel array ``(X, Y, Z)`` and the RAS affine.
    """
    return nib.Nifti1Image(np.asarray(image.numpy()), ants_affine(image))


def n4_bias_correct(img: nib.Nifti1Image, *, shrink_factor: int = 4) -> nib.Nifti1Image:
    """Remove a smooth multiplicative intensity bias with ANTs N4.

    The correction runs over the image's foreground (voxels above 1 % of the 99th
    percentile, holes filled); background voxels keep their values divided by the bias field.

    Args:
        img: 3-D T1w image ``(X, Y, Z)``, any orientation and intensity scale (nonnegative).
        shrink_factor: N4's internal downsampling (4 is fast and enough for a smooth field).

    Returns:
        float32 ``Nifti1Image`` on the same grid (same affine), bias-corrected.
    """
    import ants

    data = np.asanyarray(img.dataobj).astype(np.float32)
    positive = data[data > 0]
    if positive.size == 0:
        raise ValueError("image has no positive voxels: nothing to bias-correct")
    threshold = 0.01 * float(np.percentile(positive, 99))
    mask = ndimage.binary_fill_holes(data > threshold)
    image = nib_to_ants(img, np.clip(data, 0, None))
    mask_image = image.new_image_like(mask.astype(np.float32))
    corrected = ants.n4_bias_field_correction(
        image, mask=mask_image, shrink_factor=shrink_factor
    )
    out = corrected.numpy().astype(np.float32)
    logger.debug("N4 bias correction done on %s voxels", int(mask.sum()))
    return nib.Nifti1Image(out, np.asarray(img.affine))


def bias_field(before: np.ndarray, after: np.ndarray, *, sigma_voxels: float = 2.0) -> np.ndarray:
    """The multiplicative bias a correction removed: ``before / after``, smoothed.

    Args:
        before, after: ``(X, Y, Z)`` the image before and after bias correction (same grid).
        sigma_voxels: Gaussian smoothing of the ratio (N4's field is smooth; this only
            removes the noise of the division at dark voxels).

    Returns:
        ``(X, Y, Z)`` float32 field: the normalised Gaussian average of the ratio over the
        voxels where it is defined (``after`` above 1 % of its 99th percentile of positive
        values), at those voxels and where they make up more than half of the smoothing
        window; 1 elsewhere (far from any defined voxel).
    """
    before = np.asarray(before, dtype=np.float32)
    after = np.asarray(after, dtype=np.float32)
    if before.shape != after.shape:
        raise ValueError(f"shapes differ: {before.shape} and {after.shape}")
    positive = after[after > 0]
    if positive.size == 0:
        return np.ones_like(after)
    valid = after > 0.01 * float(np.percentile(positive, 99))
    ratio = np.where(valid, before / np.where(valid, after, 1.0), 0.0).astype(np.float32)
    weight = valid.astype(np.float32)
    num = ndimage.gaussian_filter(ratio, sigma_voxels)
    den = ndimage.gaussian_filter(weight, sigma_voxels)
    field = np.where(den > 1e-3, num / np.maximum(den, 1e-3), 1.0)
    return np.where(valid | (den > 0.5), field, 1.0).astype(np.float32)
