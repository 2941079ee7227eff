"""Reading input images, with the checks that turn bad files into clear per-image errors."""

from __future__ import annotations

import logging
from pathlib import Path

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
            f"has voxel size {tuple(zooms.round(3))} mm, outside the plausible "
            f"{VOXEL_RANGE_MM[0]}-{VOXEL_RANGE_MM[1]} mm; check the header's pixdim",
        )
    fov = np.asarray(data.shape) * zooms
    if min(data.shape) < MIN_VOXELS or fov.min() < MIN_FOV_MM:
        raise InputError(
            path,
            f"is too small to be a head or brain image (shape {data.shape}, field of view "
            f"{tuple(fov.round(1))} mm; needs >= {MIN_VOXELS} voxels and >= {MIN_FOV_MM:.0f} mm "
            "per axis)",
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
