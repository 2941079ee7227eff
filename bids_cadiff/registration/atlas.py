"""Which atlas the distance field comes from, and loading it once per process.

Lookup order of :func:`resolve_atlas`:

1. ``--atlas PATH``: a T1w in MNI-like space (world (0, 0, 0) at the anterior commissure), with
   skull or brain-extracted. Its brain mask is, in this order: a sibling file named
   ``<stem>bet*``, ``<stem>_brain*`` / ``<stem>_brainmask*`` / ``<stem>_mask*`` or
   ``brainmask.*`` (nonzero voxels of it; a brain-extracted T1 or a binary mask both work);
   else, when the file name says ``bet``/``brain`` or the image *looks* brain-extracted
   (foreground under 2.5 litres, see :func:`~bids_cadiff.imaging.preprocess.looks_skull_stripped`),
   the image's own foreground (voxels above 10 % of its 99th percentile, largest component,
   holes filled). A with-skull image without a sibling mask is refused (UsageError).
2. Colin27 from Debian's ``mricron-data``: ``/usr/share/mricron/templates/ch2.nii.gz`` (with
   skull), brain mask from ``ch2bet.nii.gz`` on the same grid.
3. nilearn's MNI152 2009 template (``load_mni152_template(resolution=1)``, brain-extracted, in
   nilearn's wheel, no download) with ``load_mni152_brain_mask(resolution=1)``.
4. Otherwise :class:`~bids_cadiff.errors.UsageError`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from bids_cadiff.errors import UsageError
from bids_cadiff.io.hashing import file_sha256 as _file_sha256
from bids_cadiff.imaging.distance_field import build_distance_field
from bids_cadiff.imaging.preprocess import foreground_mask, looks_skull_stripped, to_ras

logger = logging.getLogger(__name__)

COLIN27_DIR = Path("/usr/share/mricron/templates")

__all__ = [
    "AtlasImages",
    "AtlasSpec",
    "atlas_distance_field",
    "file_sha256",
    "load_atlas",
    "resolve_atlas",
]


@dataclass(frozen=True)
class AtlasSpec:
    """Where the atlas comes from.

    Attributes:
        name: ``"Colin27"``, ``"MNI152NLin2009"`` or ``"custom"``.
        t1_path: the atlas T1w file.
        brain_mask_path: file whose nonzero voxels are the brain (``None``: derived, see
            ``brain_mask_source``).
        brain_mask_source: how the brain mask is obtained, in words (for logs and sidecars).
        has_skull: whether ``t1_path`` shows the skull and scalp.
        description: one line for sidecars/provenance.
        origin_world: RAS world position (mm) of the anterior commissure in the atlas.
    """

    name: str
    t1_path: Path
    brain_mask_path: Path | None
    brain_mask_source: str
    has_skull: bool
    description: str
    origin_world: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class AtlasImages:
    """A loaded atlas, RAS oriented.

    Attributes:
        t1: the atlas T1w image ``(X, Y, Z)``, float32.
        brain_mask: boolean ``(X, Y, Z)`` on the same grid (read-only array).
    """

    t1: nib.Nifti1Image
    brain_mask: np.ndarray

    def brain_image(self) -> nib.Nifti1Image:
        """The brain-extracted atlas: T1 times brain mask, float32 ``(X, Y, Z)``."""
        data = np.asanyarray(self.t1.dataobj).astype(np.float32) * self.brain_mask
        return nib.Nifti1Image(data, self.t1.affine)


_MASK_SIBLING_SUFFIXES = ("bet", "_brain", "_brainmask", "_brain_mask", "_mask", "-brain", "-mask")


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".mgz", ".mgh"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _find_mask_sibling(path: Path) -> Path | None:
    stem = _stem(path).lower()
    candidates = []
    for sibling in sorted(path.parent.iterdir()):
        if sibling == path or not sibling.is_file():
            continue
        sib_stem = _stem(sibling).lower()
        if not sibling.name.lower().endswith((".nii", ".nii.gz", ".mgz", ".mgh")):
            continue
        if sib_stem == "brainmask" or any(
            sib_stem.startswith(stem + suffix) for suffix in _MASK_SIBLING_SUFFIXES
        ):
            candidates.append(sibling)
    return candidates[0] if candidates else None


def _custom_atlas(path: Path) -> AtlasSpec:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(
            f"--atlas {path}: file not found. Pass a T1w NIfTI in MNI-like space, or leave "
            "--atlas out to use Colin27 (apt-get install mricron-data)."
        )
    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise UsageError(f"--atlas {path}: cannot be read as an image ({exc}).") from exc
    if len(img.shape) not in (3, 4) or (len(img.shape) == 4 and img.shape[3] != 1):
        raise UsageError(f"--atlas {path}: expected a 3-D T1w image, got shape {img.shape}.")
    data = np.asanyarray(img.dataobj).squeeze().astype(np.float32)
    stripped = looks_skull_stripped(data, img.affine)
    name_says_brain = any(tag in _stem(path).lower() for tag in ("bet", "brain"))
    sibling = _find_mask_sibling(path)
    if sibling is not None:
        return AtlasSpec(
            name="custom", t1_path=path, brain_mask_path=sibling,
            brain_mask_source=f"nonzero voxels of {sibling.name}",
            has_skull=not stripped, description=f"custom atlas {path} (brain mask {sibling.name})",
        )
    if stripped or name_says_brain:
        return AtlasSpec(
            name="custom", t1_path=path, brain_mask_path=None,
            brain_mask_source="foreground threshold of the brain-extracted atlas image",
            has_skull=False, description=f"custom brain-extracted atlas {path}",
        )
    raise UsageError(
        f"--atlas {path}: the image shows a skull but no brain mask was found next to it. "
        f"Put a brain-extracted copy or a brain mask beside it named {_stem(path)}_brain.nii.gz "
        "(or ...bet.nii.gz / brainmask.nii.gz), or pass the brain-extracted image itself."
    )


def _nilearn_mni_path() -> Path | None:
    try:
        import nilearn.datasets  # noqa: F401  (optional dependency)
    except ImportError:
        return None
    path = (
        Path(nilearn.datasets.__file__).parent / "data"
        / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    )
    return path if path.is_file() else None


def resolve_atlas(explicit: Path | None, *, colin27_dir: Path = COLIN27_DIR) -> AtlasSpec:
    """Pick the atlas (see the module docstring for the order).

    Args:
        explicit: the ``--atlas`` path, or ``None``.
        colin27_dir: where ``mricron-data`` installs ``ch2.nii.gz`` (overridable for tests).

    Returns:
        The :class:`AtlasSpec`; nothing is loaded yet.

    Raises:
        UsageError: ``explicit`` is unusable, or no atlas is available at all.
    """
    if explicit is not None:
        return _custom_atlas(Path(explicit))
    ch2, ch2bet = Path(colin27_dir) / "ch2.nii.gz", Path(colin27_dir) / "ch2bet.nii.gz"
    if ch2.is_file() and ch2bet.is_file():
        return AtlasSpec(
            name="Colin27", t1_path=ch2, brain_mask_path=ch2bet,
            brain_mask_source=f"nonzero voxels of {ch2bet}", has_skull=True,
            description="Colin27 (ch2.nii.gz, ch2bet.nii.gz) from Debian mricron-data, MNI space",
        )
    mni = _nilearn_mni_path()
    if mni is not None:
        return AtlasSpec(
            name="MNI152NLin2009", t1_path=mni, brain_mask_path=None,
            brain_mask_source="nilearn.datasets.load_mni152_brain_mask(resolution=1)",
            has_skull=False,
            description="MNI152 ICBM 2009 symmetric template (brain-extracted) shipped with nilearn",
        )
    raise UsageError(
        "No atlas available for the distance field: install Colin27 with "
        "`apt-get install mricron-data` (provides /usr/share/mricron/templates/ch2.nii.gz), "
        "install nilearn (`pip install bids_cadiff[nilearn]`), or pass --atlas PATH."
    )


@functools.lru_cache(maxsize=4)
def load_atlas(spec: AtlasSpec) -> AtlasImages:
    """Load the atlas T1w and brain mask, RAS oriented; cached per process.

    Returns:
        :class:`AtlasImages` with a float32 T1 and a read-only boolean brain mask on its grid.
    """
    t1 = to_ras(nib.load(spec.t1_path))
    t1 = nib.Nifti1Image(np.asanyarray(t1.dataobj).astype(np.float32), t1.affine)
    t1_data = np.asanyarray(t1.dataobj)
    if spec.name == "MNI152NLin2009" and spec.brain_mask_path is None:
        from nilearn import datasets

        mask_img = to_ras(datasets.load_mni152_brain_mask(resolution=1))
        mask = _on_grid(mask_img, t1) > 0
    elif spec.brain_mask_path is not None:
        mask_img = to_ras(nib.load(spec.brain_mask_path))
        mask = _on_grid(mask_img, t1) > 0
        mask = ndimage.binary_fill_holes(mask)
    else:
        mask = foreground_mask(t1_data)
    if not mask.any():
        raise UsageError(f"atlas {spec.t1_path}: the brain mask ({spec.brain_mask_source}) is empty.")
    mask = np.asarray(mask, dtype=bool)
    mask.setflags(write=False)
    logger.info("atlas %s loaded: %s, brain mask %d voxels", spec.name, t1.shape, int(mask.sum()))
    return AtlasImages(t1=t1, brain_mask=mask)


def _on_grid(img: nib.Nifti1Image, ref: nib.Nifti1Image) -> np.ndarray:
    """``img``'s data on ``ref``'s grid (nearest), as float32."""
    from bids_cadiff.imaging.preprocess import resample_to_reference

    data = np.asanyarray(img.dataobj).astype(np.float32)
    if data.shape == ref.shape[:3] and np.allclose(img.affine, ref.affine, atol=1e-3):
        return data
    return resample_to_reference(data, img.affine, ref.shape[:3], ref.affine, order=0)


@functools.lru_cache(maxsize=4)
def atlas_distance_field(spec: AtlasSpec) -> tuple[nib.Nifti1Image, np.ndarray]:
    """The atlas T1w image and its distance field; built once per process.

    Returns:
        ``(image, field)``: the RAS atlas T1w ``(X, Y, Z)`` and the read-only float32 field
        ``(3, X, Y, Z)`` of :func:`~bids_cadiff.imaging.distance_field.build_distance_field`.
    """
    atlas = load_atlas(spec)
    field = build_distance_field(atlas.brain_mask, atlas.t1.affine, origin_world=spec.origin_world)
    field.setflags(write=False)
    return atlas.t1, field


@functools.lru_cache(maxsize=16)
def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file's bytes (cached per process: atlas files do not change)."""
    return _file_sha256(path)
