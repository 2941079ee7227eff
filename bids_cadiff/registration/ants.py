"""Atlas-to-subject registration with antspyx, cached on disk, and warping of atlas-space maps.

The atlas (moving) is registered to the subject T1w (fixed) in two stages, both on copies of the
images resampled to ``resolution_mm`` (the distance field is smooth, so 2 mm is enough):

1. Affine (Mattes MI), started from the centres of mass.
2. SyN (Mattes MI) from that affine (skipped for ``type_of_transform="Affine"``).

Skull or no skull: when the subject looks skull-stripped (foreground under 2.5 litres, see
:func:`~bids_cadiff.imaging.preprocess.looks_skull_stripped`) the brain-extracted atlas is the
moving image, else the atlas with its skull (if it has one). Registering a with-skull atlas to a
brain-only image (or the reverse) pulls the atlas scalp onto the cortex; matching them avoids it.

Quality: the Pearson correlation (NCC) between the warped atlas and the subject inside the warped
atlas brain mask, on the ``resolution_mm`` grid. Below ``min_quality`` the registration is
rejected with :class:`~bids_cadiff.errors.RegistrationError`. The default threshold (0.25) is
calibrated against Colin27 on real T1w: good registrations scored 0.44 (chris_t1, affine only),
0.59 (chris_t1, SyN 2 mm) and 0.62 (FreeSurfer T1.mgz, SyN 2 mm); failures scored at most 0.13
(chris_t1 flipped upside down 0.01/0.08, rotated 90 degrees 0.04/0.13, uniform noise 0.00,
affine/SyN). Initialisation is by centres of mass only: a head rotated by more than a few tens of
degrees is not recovered, it is rejected.

Threads and seeds: ANTs reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``; this module never
changes the environment; the CLI sets it from --omp-nthreads before the first registration (1
with ``--reproducible``). The metrics' random sampling is always seeded
(``RegistrationParams.random_seed``); multi-threaded metric sums still vary in the last bits
from run to run, single-threaded ones do not.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import nibabel as nib
import numpy as np

from bids_cadiff.errors import RegistrationError
from bids_cadiff.imaging.preprocess import foreground_mask, looks_skull_stripped, nib_to_ants
from bids_cadiff.io.atomic import atomic_write
from bids_cadiff.io.faults import kill_point
from bids_cadiff.io.hashing import file_sha256 as file_sha256_uncached
from bids_cadiff.registration.atlas import AtlasSpec, file_sha256, load_atlas

if TYPE_CHECKING:  # pragma: no cover
    import ants

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MIN_QUALITY",
    "Registration",
    "RegistrationParams",
    "register_atlas",
    "warp_distance_field",
    "warp_labels",
]

#: NCC threshold below which a registration is rejected (calibrated, see module docstring).
DEFAULT_MIN_QUALITY = 0.25

#: Bumped whenever the algorithm changes in a way that invalidates cached transforms.
_CACHE_VERSION = "2"
#: Dilation (mm) of the affinely carried atlas brain mask that skull-strips head images.
BRAIN_MASK_DILATE_MM = 6.0
_META_NAME = "registration.json"
#: Temporary folders of the cache older than this (s) belong to killed registrations.
STALE_TMP_SECONDS = 24 * 3600


@dataclass(frozen=True)
class RegistrationParams:
    """Everything that changes the transforms (all of it goes into the cache key).

    Attributes:
        resolution_mm: both images are resampled to this isotropic voxel size first.
        type_of_transform: ``"SyN"`` (affine then SyN) or ``"Affine"`` (affine only).
        aff_iterations: affine iterations per level (coarse to fine).
        aff_shrink_factors: affine shrink factors per level, relative to ``resolution_mm``.
        aff_smoothing_sigmas: affine smoothing (voxels) per level.
        reg_iterations: SyN iterations per level; level ``i`` of ``n`` is shrunk ``2**(n-1-i)``.
        syn_grad_step, syn_flow_sigma, syn_total_sigma: ``SyN[grad, flow, total]``.
        random_seed: seed of the metrics' random sampling (``antsRegistration --random-seed``;
            without it ANTs seeds from the clock, and two runs differ).
    """

    resolution_mm: float = 2.0
    type_of_transform: str = "SyN"
    aff_iterations: tuple[int, ...] = (1000, 500, 250)
    aff_shrink_factors: tuple[int, ...] = (4, 2, 1)
    aff_smoothing_sigmas: tuple[float, ...] = (2.0, 1.0, 0.0)
    reg_iterations: tuple[int, ...] = (40, 20, 10)
    syn_grad_step: float = 0.2
    syn_flow_sigma: float = 3.0
    syn_total_sigma: float = 0.0
    random_seed: int = 1

    def __post_init__(self) -> None:
        if self.random_seed < 1:
            raise ValueError(f"random_seed must be a positive integer, got {self.random_seed}")
        if self.type_of_transform not in ("SyN", "Affine"):
            raise ValueError(
                f"type_of_transform must be 'SyN' or 'Affine', got {self.type_of_transform!r}"
            )
        if not self.resolution_mm > 0:
            raise ValueError(f"resolution_mm must be > 0, got {self.resolution_mm}")


@dataclass(frozen=True)
class Registration:
    """Result of :func:`register_atlas`.

    Attributes:
        forward_transforms: transform files taking the atlas onto the subject, in the order
            ``ants.apply_transforms(fixed=subject, moving=atlas, transformlist=...)`` wants.
        quality: the quality figure (higher is better).
        quality_metric: what ``quality`` is.
        mask_dice: Dice between the warped atlas foreground (brain or head, whichever was
            registered) and the subject foreground, on the registration grid.
        brain_only: whether the brain-extracted atlas was used (subject looked skull-stripped).
        seconds: wall time of the registration (of the original run when ``cached``).
        cached: whether the transforms were reused from the cache.
        params: the parameters used.
    """

    forward_transforms: tuple[Path, ...]
    quality: float
    quality_metric: str
    mask_dice: float
    brain_only: bool
    seconds: float
    cached: bool = False
    params: RegistrationParams = field(default_factory=RegistrationParams)


def _image_name(img: nib.Nifti1Image, image_path: Path | str | None) -> Path:
    if image_path is not None:
        return Path(image_path)
    filename = img.get_filename()
    return Path(filename) if filename else Path("<in-memory image>")


def _cache_key(
    data: np.ndarray, affine: np.ndarray, atlas: AtlasSpec, params: RegistrationParams
) -> str:
    digest = hashlib.sha256()
    digest.update(f"cadiff-registration-v{_CACHE_VERSION}".encode())
    digest.update(str(data.dtype).encode() + str(data.shape).encode())
    digest.update(np.ascontiguousarray(data).tobytes())
    digest.update(np.asarray(affine, dtype=np.float64).round(6).tobytes())
    digest.update(file_sha256(Path(atlas.t1_path)).encode())
    if atlas.brain_mask_path is not None:
        digest.update(file_sha256(Path(atlas.brain_mask_path)).encode())
    digest.update(atlas.brain_mask_source.encode())
    digest.update(json.dumps(asdict(params), sort_keys=True).encode())
    return digest.hexdigest()


def _downsample(image: "ants.ANTsImage", resolution_mm: float) -> "ants.ANTsImage":
    import ants

    if min(image.spacing) >= resolution_mm - 1e-6:
        return image
    return ants.resample_image(image, (resolution_mm,) * 3, use_voxels=False, interp_type=0)


def _ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    x, y = a[mask].astype(np.float64), b[mask].astype(np.float64)
    if x.size < 10:
        return 0.0
    x -= x.mean()
    y -= y.mean()
    denom = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denom) if denom > 0 else 0.0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else 0.0


def _run_ants(
    fixed: "ants.ANTsImage",
    moving: "ants.ANTsImage",
    params: RegistrationParams,
    workdir: Path,
    initial: Path | None = None,
) -> list[Path]:
    """Run the affine (+ SyN) stages; return the forward transform files, renamed stably.

    ``initial``: an affine to start from (else the centres of mass).
    """
    import ants

    extra = {"initial_transform": str(initial)} if initial is not None else {}
    with _seeded(ants, params.random_seed):
        return _run_ants_seeded(ants, fixed, moving, params, workdir, extra)


@contextlib.contextmanager
def _seeded(ants: Any, seed: int) -> Iterator[None]:
    """antspyx passes ``--random-seed`` only from its module-level config: set it for the
    duration of a registration (and put back what was there)."""
    before = ants.config._random_seed
    ants.config._random_seed = int(seed)
    try:
        yield
    finally:
        ants.config._random_seed = before


def _run_ants_seeded(
    ants: Any, fixed: Any, moving: Any, params: RegistrationParams, workdir: Path,
    extra: dict[str, str],
) -> list[Path]:
    affine_out = ants.registration(
        fixed, moving, type_of_transform="Affine", **extra,
        aff_metric="mattes", aff_iterations=params.aff_iterations,
        aff_shrink_factors=params.aff_shrink_factors,
        aff_smoothing_sigmas=params.aff_smoothing_sigmas,
        outprefix=str(workdir / "affine_"),
    )
    affine_mat = Path(affine_out["fwdtransforms"][0])
    final_affine = workdir / "0_affine.mat"
    shutil.copyfile(affine_mat, final_affine)
    if params.type_of_transform == "Affine":
        return [final_affine]
    syn_out = ants.registration(
        fixed, moving, type_of_transform="SyNOnly", initial_transform=str(final_affine),
        syn_metric="mattes", reg_iterations=params.reg_iterations,
        grad_step=params.syn_grad_step, flow_sigma=params.syn_flow_sigma,
        total_sigma=params.syn_total_sigma,
        outprefix=str(workdir / "syn_"),
    )
    warps = [Path(p) for p in syn_out["fwdtransforms"] if str(p).endswith("Warp.nii.gz")]
    if len(warps) != 1:
        raise RuntimeError(f"unexpected SyN outputs: {syn_out['fwdtransforms']}")
    final_warp = workdir / "1_warp.nii.gz"
    shutil.copyfile(warps[0], final_warp)
    # apply_transforms applies the list last-to-first: affine first, then the warp.
    return [final_warp, final_affine]


def _run_with_skull(
    fixed: "ants.ANTsImage",
    moving_head: "ants.ANTsImage",
    moving_brain: "ants.ANTsImage",
    moving_mask: "ants.ANTsImage",
    params: RegistrationParams,
    workdir: Path,
    ants: Any,
) -> list[Path]:
    """Head images: affine of the atlas head, then brain-to-brain refinement.

    Registering a head atlas to a head directly lets scalp and skull pull the atlas brain off
    the subject's brain (SyN undershoots the brain edge). Instead: (1) affine of the atlas head
    to the subject head; (2) the atlas brain mask carried by that affine, dilated by
    ``BRAIN_MASK_DILATE_MM``, skull-strips the subject; (3) the brain-extracted atlas is
    registered (affine from step 1, then SyN) to that masked subject.
    """
    head_dir = workdir / "head"
    head_dir.mkdir()
    head_affine = _run_ants(
        fixed, moving_head, RegistrationParams(
            resolution_mm=params.resolution_mm, type_of_transform="Affine",
            aff_iterations=params.aff_iterations, aff_shrink_factors=params.aff_shrink_factors,
            aff_smoothing_sigmas=params.aff_smoothing_sigmas,
        ), head_dir,
    )[0]
    mask = ants.apply_transforms(fixed, moving_mask, [str(head_affine)], interpolator="linear")
    radius = max(1, int(round(BRAIN_MASK_DILATE_MM / params.resolution_mm)))
    mask = ants.iMath(ants.threshold_image(mask, 0.5, 2.0), "MD", radius)
    fixed_brain = fixed * mask
    moving_brain = _downsample(moving_brain, params.resolution_mm)
    transforms = _run_ants(fixed_brain, moving_brain, params, workdir, initial=head_affine)
    shutil.rmtree(head_dir, ignore_errors=True)
    return transforms


def _cleanup_ants_outputs(workdir: Path, keep: list[Path]) -> None:
    keep_names = {p.name for p in keep}
    for path in workdir.iterdir():
        if path.name not in keep_names and path.name != _META_NAME:
            path.unlink(missing_ok=True)


def _meta_checksum(meta: dict[str, Any]) -> str:
    """sha256 of a cache entry's metadata without its own ``checksum`` field."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _check_entry(entry: Path) -> dict[str, Any]:
    """The metadata of a complete, intact cache entry.

    Raises:
        ValueError: the entry is incomplete or corrupt (the reason in words).
    """
    try:
        meta = json.loads((entry / _META_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no {_META_NAME} (an entry is published complete; this one was not)")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{_META_NAME} unreadable ({exc})") from None
    if not isinstance(meta, dict) or "checksum" not in meta:
        raise ValueError(f"{_META_NAME} without a checksum (written by an older bids_cadiff)")
    if meta["checksum"] != _meta_checksum(meta):
        raise ValueError(f"{_META_NAME} does not match its checksum")
    try:
        for name, expected in meta["sha256"].items():
            try:
                actual = file_sha256_uncached(entry / name)
            except FileNotFoundError:
                raise ValueError(f"{name} is missing") from None
            if actual != expected:
                raise ValueError(f"{name} does not match its checksum (truncated or corrupt)")
        if not meta["forward_transforms"] or set(meta["forward_transforms"]) - set(meta["sha256"]):
            raise ValueError("a transform without a checksum")
    except (KeyError, TypeError, AttributeError):
        raise ValueError(f"{_META_NAME} lacks a field") from None
    return meta


def _discard(entry: Path) -> None:
    """Remove a broken cache entry: renamed aside first (atomic, so no process ever reads a
    half-deleted entry), then deleted. Another process may have discarded or replaced it
    already; that is fine."""
    trash = entry.with_name(f".tmp-discard-{entry.name[:16]}-{os.getpid()}-{time.time_ns()}")
    try:
        os.replace(entry, trash)
    except OSError:
        return
    with contextlib.suppress(ValueError):
        _check_entry(trash)
        # another process re-published an intact entry since this one looked: put it back
        with contextlib.suppress(OSError):
            os.replace(trash, entry)
            return
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


def _load_cached(entry: Path, params: RegistrationParams) -> Registration | None:
    """The cached registration of ``entry``, or ``None`` when there is none or it cannot be
    trusted (incomplete or corrupt: then it is removed with a warning, and recomputed)."""
    if not entry.exists():
        return None
    try:
        meta = _check_entry(entry)
        transforms = tuple(entry / name for name in meta["forward_transforms"])
        return Registration(
            forward_transforms=transforms, quality=float(meta["quality"]),
            quality_metric=str(meta["quality_metric"]), mask_dice=float(meta["mask_dice"]),
            brain_only=bool(meta["brain_only"]), seconds=float(meta["seconds"]),
            cached=True, params=params,
        )
    except (KeyError, TypeError, ValueError) as exc:
        logger.warning("registration cache entry %s cannot be trusted (%s): removed, the "
                       "registration is recomputed", entry, exc)
        _discard(entry)
        return None


def _publish(tmp: Path, entry: Path, params: RegistrationParams) -> Registration | None:
    """Atomically move a finished temporary folder into place.

    Returns:
        ``None`` when ``tmp`` became the entry; the other process's registration when one
        published the same key first (``tmp`` is then deleted).
    """
    for _ in range(3):
        try:
            os.replace(tmp, entry)
            return None
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        theirs = _load_cached(entry, params)  # a broken one is discarded: try again
        if theirs is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return theirs
    shutil.rmtree(tmp, ignore_errors=True)
    raise OSError(errno.EEXIST, "cannot publish the registration cache entry", str(entry))


def _remove_stale_temporaries(cache_dir: Path) -> None:
    """Delete temporary folders of registrations that were killed (older than
    :data:`STALE_TMP_SECONDS`: a registration in progress in another process is younger)."""
    limit = time.time() - STALE_TMP_SECONDS
    with contextlib.suppress(OSError):
        for path in cache_dir.iterdir():
            with contextlib.suppress(OSError):
                if path.name.startswith(".tmp-") and path.stat().st_mtime < limit:
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink()


def register_atlas(
    fixed: nib.Nifti1Image,
    atlas: AtlasSpec,
    *,
    cache_dir: Path | None,
    resolution_mm: float = 2.0,
    type_of_transform: str = "SyN",
    params: RegistrationParams | None = None,
    min_quality: float = DEFAULT_MIN_QUALITY,
    image_path: Path | str | None = None,
) -> Registration:
    """Register the atlas (moving) to a subject T1w (fixed).

    Args:
        fixed: subject T1w ``(X, Y, Z)``, any orientation, with or without skull.
        atlas: the atlas from :func:`~bids_cadiff.registration.atlas.resolve_atlas`.
        cache_dir: where transforms are kept, keyed on a sha256 of the image data, affine,
            atlas files and parameters; ``None`` writes them to a fresh temporary directory
            (the caller may delete it once the maps are warped).
        resolution_mm: registration voxel size (ignored when ``params`` is given).
        type_of_transform: ``"SyN"`` or ``"Affine"`` (ignored when ``params`` is given).
        params: full parameter set, overriding the two arguments above.
        min_quality: reject registrations whose NCC is below this.
        image_path: file name used in error messages (default: ``fixed.get_filename()``).

    Returns:
        :class:`Registration` with the forward transform files.

    Raises:
        RegistrationError: ANTs failed, or the result's quality is below ``min_quality``.
    """
    import ants

    if params is None:
        params = RegistrationParams(resolution_mm=resolution_mm, type_of_transform=type_of_transform)
    name = _image_name(fixed, image_path)
    data = np.asanyarray(fixed.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise RegistrationError(name, f"expected a 3-D T1w image, got shape {data.shape}.")

    entry: Path | None = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        entry = cache_dir / _cache_key(data, fixed.affine, atlas, params)
        cached = _load_cached(entry, params)
        if cached is not None:
            logger.info("%s: reusing cached registration %s", name, entry.name[:12])
            return cached
        _remove_stale_temporaries(cache_dir)
        workdir = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir))
    else:
        workdir = Path(tempfile.mkdtemp(prefix="cadiff-registration-"))

    try:
        result = _register(data, fixed.affine, atlas, params, workdir, name, ants)
        if result.quality < min_quality and atlas.has_skull:
            result = _other_kind_if_better(result, data, fixed.affine, atlas, params, workdir,
                                           name, ants)
        if result.quality < min_quality:
            raise RegistrationError(
                name,
                f"the atlas did not register well ({result.quality_metric} = {result.quality:.2f}, "
                f"below {min_quality:.2f}). Check that this is a T1w head or brain image with a "
                "correct orientation in its header (view it with the atlas in a viewer), or pass "
                "a better-matching atlas with --atlas.",
            )
        kill_point("registration")  # tests only: die with the transforms not yet published
        meta: dict[str, Any] = {
            "forward_transforms": [p.name for p in result.forward_transforms],
            "quality": result.quality, "quality_metric": result.quality_metric,
            "mask_dice": result.mask_dice, "brain_only": result.brain_only,
            "seconds": result.seconds, "params": asdict(params),
            "atlas": atlas.description, "image": str(name),
            "sha256": {p.name: file_sha256_uncached(p) for p in result.forward_transforms},
        }
        meta["checksum"] = _meta_checksum(meta)
        atomic_write(workdir / _META_NAME, json.dumps(meta, indent=2))
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    if entry is None:
        return result
    theirs = _publish(workdir, entry, params)
    if theirs is not None:
        logger.info("%s: another process published this registration first; using its "
                    "transforms", name)
        return theirs
    return Registration(
        forward_transforms=tuple(entry / p.name for p in result.forward_transforms),
        quality=result.quality, quality_metric=result.quality_metric,
        mask_dice=result.mask_dice, brain_only=result.brain_only, seconds=result.seconds,
        cached=False, params=params,
    )


def _other_kind_if_better(
    first: Registration, data: np.ndarray, affine: np.ndarray, atlas: AtlasSpec,
    params: RegistrationParams, workdir: Path, name: Path, ants: Any,
) -> Registration:
    """A registration below the quality threshold, tried again as the other kind of image
    (with skull instead of brain only, or the reverse); the better of the two, its transforms
    in ``workdir``.

    Whether an image is skull-stripped is judged from its foreground volume
    (:func:`~bids_cadiff.imaging.preprocess.looks_skull_stripped`), which a field of view that
    cuts the head (through the cerebellum) makes look like a brain's.
    """
    kinds = ("a head with skull", "a skull-stripped brain")
    logger.warning("%s: registered as %s, the atlas fits poorly (NCC %.3f); trying it as %s",
                   name, kinds[first.brain_only], first.quality, kinds[not first.brain_only])
    other_dir = workdir / "other"
    other_dir.mkdir()
    try:
        other = _register(data, affine, atlas, params, other_dir, name, ants,
                          brain_only=not first.brain_only)
        if other.quality <= first.quality:
            return first
        for path in first.forward_transforms:
            path.unlink()
        moved = tuple(path.rename(workdir / path.name) for path in other.forward_transforms)
        logger.warning("%s: registered as %s instead (NCC %.3f)", name,
                       kinds[other.brain_only], other.quality)
        return replace(other, forward_transforms=moved,
                       seconds=first.seconds + other.seconds)
    finally:
        shutil.rmtree(other_dir, ignore_errors=True)


def _register(
    data: np.ndarray,
    affine: np.ndarray,
    atlas: AtlasSpec,
    params: RegistrationParams,
    workdir: Path,
    name: Path,
    ants: Any,
    brain_only: bool | None = None,
) -> Registration:
    """One registration into ``workdir``; ``brain_only``: register the brain-extracted atlas
    (``None``: when the image looks skull-stripped or the atlas has no skull)."""
    start = time.perf_counter()
    data = np.nan_to_num(np.asarray(data, dtype=np.float32))
    if not np.any(data > 0):
        raise RegistrationError(name, "the image has no positive voxels; is it a T1w image?")
    atlas_images = load_atlas(atlas)
    if brain_only is None:
        brain_only = looks_skull_stripped(data, affine) or not atlas.has_skull
    moving_nib = atlas_images.brain_image() if brain_only else atlas_images.t1
    fixed_img = _downsample(nib_to_ants(nib.Nifti1Image(data, affine)), params.resolution_mm)
    moving_img = _downsample(nib_to_ants(moving_nib), params.resolution_mm)
    mask_img = _downsample(
        nib_to_ants(atlas_images.t1, atlas_images.brain_mask.astype(np.float32)),
        params.resolution_mm,
    )
    logger.info(
        "%s: registering atlas %s (%s) at %.1f mm, %s",
        name, atlas.name, "brain only" if brain_only else "with skull",
        params.resolution_mm, params.type_of_transform,
    )
    try:
        if brain_only:
            transforms = _run_ants(fixed_img, moving_img, params, workdir)
        else:
            transforms = _run_with_skull(
                fixed_img, moving_img, nib_to_ants(atlas_images.brain_image()), mask_img,
                params, workdir, ants,
            )
        warped = ants.apply_transforms(fixed_img, moving_img, [str(p) for p in transforms],
                                       interpolator="linear")
        warped_mask = ants.apply_transforms(fixed_img, mask_img, [str(p) for p in transforms],
                                            interpolator="linear")
    except RegistrationError:
        raise
    except Exception as exc:  # antspyx raises RuntimeError/ValueError from C++
        raise RegistrationError(
            name, f"ANTs registration failed ({type(exc).__name__}: {exc}). Check that the file "
            "is a readable 3-D T1w image.",
        ) from exc
    _cleanup_ants_outputs(workdir, transforms)
    fixed_np, warped_np = fixed_img.numpy(), warped.numpy()
    brain = warped_mask.numpy() > 0.5
    quality = _ncc(fixed_np, warped_np, brain)
    dice = _dice(foreground_mask(warped_np), foreground_mask(fixed_np))
    seconds = time.perf_counter() - start
    logger.info("%s: registration NCC %.3f, foreground Dice %.3f, %.1f s",
                name, quality, dice, seconds)
    return Registration(
        forward_transforms=tuple(transforms), quality=quality,
        quality_metric="ncc_in_warped_atlas_brain", mask_dice=dice,
        brain_only=brain_only, seconds=seconds, cached=False, params=params,
    )


def _apply(
    volume: np.ndarray,
    atlas_image: nib.Nifti1Image,
    registration: Registration,
    fixed_ants: "ants.ANTsImage",
    interpolator: str,
) -> np.ndarray:
    import ants

    moving = nib_to_ants(atlas_image, volume.astype(np.float32))
    out = ants.apply_transforms(
        fixed_ants, moving, [str(p) for p in registration.forward_transforms],
        interpolator=interpolator, defaultvalue=0,
    )
    return out.numpy()


def warp_distance_field(
    field: np.ndarray,
    atlas_image: nib.Nifti1Image,
    registration: Registration,
    fixed: nib.Nifti1Image,
) -> np.ndarray:
    """Carry the atlas distance field onto the subject grid (linear interpolation).

    Args:
        field: float ``(3, X, Y, Z)`` on the atlas grid (from ``atlas_distance_field``).
        atlas_image: the atlas image whose grid ``field`` is on.
        registration: from :func:`register_atlas` for this subject and atlas.
        fixed: the subject image ``(X', Y', Z')`` (its grid only is used).

    Returns:
        float32 ``(3, X', Y', Z')`` in ``[0, 1]``; 0 where the atlas brain does not reach.
    """
    if field.ndim != 4 or field.shape[0] != 3 or field.shape[1:] != atlas_image.shape[:3]:
        raise ValueError(
            f"field must be (3, *atlas shape) = (3, {atlas_image.shape[:3]}), got {field.shape}"
        )
    shape = fixed.shape[:3]
    fixed_ants = nib_to_ants(fixed, np.zeros(shape, dtype=np.float32))
    out = np.stack([_apply(c, atlas_image, registration, fixed_ants, "linear") for c in field])
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def warp_labels(
    labels: np.ndarray,
    atlas_image: nib.Nifti1Image,
    registration: Registration,
    fixed: nib.Nifti1Image,
) -> np.ndarray:
    """Carry an atlas-space label map onto the subject grid (nearest neighbour).

    Args:
        labels: integer ``(X, Y, Z)`` on the atlas grid (label values up to 2**24 exactly).
        atlas_image: the atlas image whose grid ``labels`` is on.
        registration: from :func:`register_atlas`.
        fixed: the subject image ``(X', Y', Z')``.

    Returns:
        ``(X', Y', Z')`` with ``labels``' dtype; 0 outside the warped atlas.
    """
    if labels.shape != atlas_image.shape[:3]:
        raise ValueError(f"labels shape {labels.shape} differs from atlas {atlas_image.shape[:3]}")
    shape = fixed.shape[:3]
    fixed_ants = nib_to_ants(fixed, np.zeros(shape, dtype=np.float32))
    out = _apply(labels, atlas_image, registration, fixed_ants, "nearestNeighbor")
    return np.rint(out).astype(labels.dtype)


def registration_ncc(
    image: nib.Nifti1Image,
    atlas: AtlasSpec,
    registration: Registration,
    *,
    shift_mm: float = 0.0,
) -> float:
    """The registration's quality figure (NCC inside the warped atlas brain), recomputed on
    the image it was computed on, optionally with the warped atlas moved by ``shift_mm``: how a
    registration off by that much would score (the QC reference's registration threshold is
    chosen with it). Of the three axes, the one where the shift lowers the NCC least is taken
    (the hardest misregistration to catch).

    Args:
        image: the fixed image of the registration (the app's N4-corrected model grid).
        atlas: the atlas that was registered.
        registration: its result (:func:`register_atlas`).
        shift_mm: translation of the warped atlas; 0 reproduces ``registration.quality``.

    Returns:
        the NCC (when shifted, the highest over the three axes).
    """
    import ants

    images = load_atlas(atlas)
    res = registration.params.resolution_mm
    fixed = _downsample(nib_to_ants(image), res)
    moving = _downsample(
        nib_to_ants(images.brain_image() if registration.brain_only else images.t1), res
    )
    mask = _downsample(nib_to_ants(images.t1, images.brain_mask.astype(np.float32)), res)
    transforms = [str(t) for t in registration.forward_transforms]
    warped = ants.apply_transforms(fixed, moving, transforms, interpolator="linear").numpy()
    brain = ants.apply_transforms(fixed, mask, transforms, interpolator="linear").numpy() > 0.5
    data = fixed.numpy()
    steps = int(round(shift_mm / res))
    if steps == 0:
        return _ncc(data, warped, brain)
    return max(
        _ncc(data, np.roll(warped, steps, axis), np.roll(brain, steps, axis)) for axis in range(3)
    )
