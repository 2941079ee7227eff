"""Reading input images, with the checks that turn bad files into clear per-image errors.

:func:`load_t1w` reads a T1w for segmentation; :func:`load_label_map` reads a label map
(``*_dseg``, FreeSurfer ``aseg``, ...) as integer values, on its own grid or resampled onto
another one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from bids_cadiff.errors import InputError

log = logging.getLogger(__name__)

#: Smallest plausible T1w: at least this many voxels along each axis...
MIN_VOXELS = 16
#: ...and this field of view (mm) along each axis.
MIN_FOV_MM = 60.0
#: Plausible voxel sizes (mm).
VOXEL_RANGE_MM = (0.1, 6.0)


def load_t1w(path: str | Path) -> nib.Nifti1Image:
    """Load a T1w image and check that it can be segmented.

    Accepts 3D images and 4D images with exactly one volume (squeezed to 3D). Rejects, each
    with an :class:`~bids_cadiff.errors.InputError` naming the file and what is wrong: files
    that cannot be read (empty, truncated, not an image), other dimensionalities, several
    volumes, non-finite values, images that are all zero or constant, implausibly small
    images and implausible voxel sizes.

    Returns:
        a float32 ``Nifti1Image`` ``(X, Y, Z)`` with the file's affine and header.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise InputError(path, "the file is empty; re-export or re-convert this image")
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except InputError:
        raise
    except Exception as exc:  # nibabel/gzip/zlib/EOF errors: all mean "unreadable"
        raise InputError(
            path,
            f"cannot be read as a NIfTI image ({type(exc).__name__}: {exc}); the file is "
            "truncated, corrupt or not an image: re-convert it (e.g. dcm2niix)",
        ) from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        raise InputError(
            path,
            f"has {data.shape[3]} volumes; a T1w must be a single 3D volume: split it "
            "(e.g. fslsplit) or average the volumes, and keep one T1w per file",
        )
    if data.ndim != 3:
        raise InputError(path, f"is {data.ndim}D (shape {data.shape}); a 3D T1w image is needed")
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    if not np.all((zooms >= VOXEL_RANGE_MM[0]) & (zooms <= VOXEL_RANGE_MM[1])):
        raise InputError(
            path,
            f"has voxel size {' x '.join(f'{z:g}' for z in zooms.round(3))} mm, outside the "
            f"plausible {VOXEL_RANGE_MM[0]}-{VOXEL_RANGE_MM[1]} mm; check the header's pixdim",
        )
    fov = np.asarray(data.shape) * zooms
    if min(data.shape) < MIN_VOXELS or fov.min() < MIN_FOV_MM:
        raise InputError(
            path,
            f"is too small to be a head or brain image (shape {data.shape}, field of view "
            f"{' x '.join(f'{v:g}' for v in fov.round(1))} mm; needs >= {MIN_VOXELS} voxels "
            f"and >= {MIN_FOV_MM:.0f} mm per axis)",
        )
    finite = np.isfinite(data)
    if not finite.all():
        bad = int((~finite).sum())
        if bad == data.size:
            raise InputError(path, "every voxel is NaN or infinite; the image holds no data")
        raise InputError(
            path, f"has {bad} NaN or infinite voxels; fix the conversion or replace them by 0"
        )
    if float(data.max()) <= 0:
        raise InputError(
            path, "has no positive voxels (a z-scored or inverted image?); give the raw "
            "magnitude T1w as the scanner wrote it"
        )
    if float(data.max()) == float(data.min()):
        raise InputError(path, f"every voxel has the same value ({float(data.max())}); no image")
    header = img.header.copy()
    out = nib.Nifti1Image(data, img.affine, header=nib.Nifti1Header.from_header(header))
    out.set_data_dtype(np.float32)
    return out


@dataclass(frozen=True)
class LabelMap:
    """Integer label values on a voxel grid.

    Attributes:
        values: ``(X, Y, Z)`` int32 label values (as in the file: no label table applied).
        affine: ``(4, 4)`` float64 voxel-to-world matrix of ``values``' grid.
        spacing: voxel size in mm along each axis of that grid.
    """

    values: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]


def load_label_map(
    path: str | Path,
    *,
    ref_shape: Sequence[int] | None = None,
    ref_affine: np.ndarray | None = None,
) -> LabelMap:
    """Read a label map, in any orientation, optionally on a reference grid.

    Accepts 3D images and 4D images with exactly one volume; integer data as it is, float data
    whose values are whole numbers (within ``np.allclose``) rounded to them. The voxel order is
    the file's own (no reorientation): the affine says where each voxel is.

    Args:
        path: the label map file (any format nibabel reads: NIfTI, MGH, ...).
        ref_shape: spatial shape ``(X', Y', Z')`` of a reference grid, with ``ref_affine``:
            the values are then resampled onto that grid by world coordinates with nearest
            neighbour (values copied, never blended; 0 outside the label map).
        ref_affine: ``(4, 4)`` voxel-to-world matrix of the reference grid.

    Returns:
        the values with their grid: the file's (affine, header voxel size), or the reference
        grid (``ref_affine``, its voxel size).

    Raises:
        InputError: the file cannot be read, is not 3D or holds non-integer values.
        ValueError: only one of ``ref_shape`` and ``ref_affine`` is given.
    """
    if (ref_shape is None) != (ref_affine is None):
        raise ValueError("give both ref_shape and ref_affine, or neither")
    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for bad files
        raise InputError(path, f"cannot be read as a NIfTI label map ({exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"a label map must be 3D, got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.integer):
        rounded = np.rint(data)
        if not np.allclose(rounded, data):
            raise InputError(path, "holds non-integer values; is it a label map (*_dseg)?")
        data = rounded
    values = np.asarray(data, dtype=np.int32)
    affine = np.asarray(img.affine, dtype=np.float64)
    if ref_shape is None or ref_affine is None:
        spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
        return LabelMap(values, affine, spacing)  # type: ignore[arg-type]
    from bids_cadiff.imaging.preprocess import resample_to_reference

    ref_affine = np.asarray(ref_affine, dtype=np.float64)
    shape = tuple(int(s) for s in ref_shape[:3])
    on_grid = resample_to_reference(values, affine, shape, ref_affine, order=0)  # type: ignore[arg-type]
    spacing = tuple(float(v) for v in np.sqrt((ref_affine[:3, :3] ** 2).sum(axis=0)))
    return LabelMap(on_grid, ref_affine, spacing)  # type: ignore[arg-type]
