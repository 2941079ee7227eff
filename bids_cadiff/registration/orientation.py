"""Does a T1w's header tell the truth about its orientation? Fit the atlas to the image as
the header places it and to the same image flipped or rotated 180°, and see which fits best.

Why: an image whose header has an axis reversed (old ANALYZE conversions, hand-edited
affines) registers to the atlas well enough to pass the registration check, and is then
segmented in mirror image (a skull-stripped head whose header said LPS while its voxels were
RAS scored NCC 0.445 and came out with caudate and putamen in the back of the brain).

How (:func:`check_orientation`): the image, RAS-reoriented (:func:`~bids_cadiff.imaging.
preprocess.to_ras`), smoothed and resampled to ``resolution_mm`` (4 mm) and cropped to its
foreground, is tried in the 8 orientations that differ from the header's by reversing world
axes (:data:`CANDIDATES`): as given, each axis flipped (L-R, A-P, S-I), each 180° rotation
(about L-R = A-P and S-I reversed, about A-P = L-R and S-I, about S-I = L-R and A-P) and all
three reversed. For each, the atlas (with skull, or brain only, as
:func:`~bids_cadiff.registration.ants.register_atlas` chooses) is registered by a short affine
ANTs registration (Mattes MI, 30 + 15 iterations at 8 and 4 mm, from the centres of mass),
and the fit is the NCC between image and warped atlas inside the warped atlas brain. When no
orientation fits with NCC 0.5 or more (a head pitched 20° or more from the atlas), all 8 are
fitted again from starts pitched ±25° about L-R, and each keeps its better fit.

Decision (:func:`decide`): left and right cannot be told apart from the anatomy (the brain is
nearly mirror-symmetric: on the 16 real images of the shared data the mirrored image fitted
better than the true one in 10, by up to 0.03 NCC, and worse by up to 0.09). So orientations
are grouped in L-R pairs, and each pair scores its better fit: 4 groups (as given; A-P
reversed; S-I reversed; both). The header is flagged when another group fits better than the
header's by more than :data:`DEFAULT_MARGIN`; the message names the orientation the voxels
appear to have, with both left-right readings. A pure left-right flip is never flagged: the
check cannot see it. Measurements: ``docs/qc.md`` and ``artifacts/orientation/``
(``benchmarks/orientation.py``).

Cost: 8 affine registrations of about 45×55×45 voxels: 3.4 s (brain only) to 4.6 s (head) of
CPU time per image on average, about as much wall time on 2 threads; twice to three times
that when the second pass runs.
"""

from __future__ import annotations

import functools
import itertools
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from bids_cadiff.imaging.preprocess import (
    foreground_mask,
    looks_skull_stripped,
    nib_to_ants,
    resample_to_spacing,
    to_ras,
)
from bids_cadiff.registration.ants import _ncc, _seeded
from bids_cadiff.registration.atlas import AtlasSpec, load_atlas

if TYPE_CHECKING:  # pragma: no cover
    import ants

logger = logging.getLogger(__name__)

__all__ = [
    "CANDIDATES",
    "DEFAULT_MARGIN",
    "MARGIN_CHOSEN_ON",
    "OrientationCheck",
    "OrientationParams",
    "apparent_codes",
    "check_orientation",
    "corrected_affine",
    "decide",
    "flip_header",
]

#: The orientations tried: name → which world axes (R, A, S) are reversed. The first is the
#: header's own; a 180° rotation about an axis reverses the other two.
CANDIDATES: dict[str, tuple[bool, bool, bool]] = {
    "AsGiven": (False, False, False),
    "FlipLR": (True, False, False),
    "FlipAP": (False, True, False),
    "FlipSI": (False, False, True),
    "Rotate180LR": (False, True, True),
    "Rotate180AP": (True, False, True),
    "Rotate180SI": (True, True, False),
    "FlipAll": (True, True, True),
}

#: Flag when an orientation group fits better than the header's by more than this (NCC).
DEFAULT_MARGIN = 0.10
#: How :data:`DEFAULT_MARGIN` was chosen (shown in every sidecar's QC ``Checks``).
MARGIN_CHOSEN_ON = (
    "16 real T1w (fstd sub-01..07 T1.mgz and brainmask.mgz, chris_t1, t1_crop), each with its "
    "true header and with the 7 lying ones (benchmarks/orientation.py, "
    "artifacts/orientation/): with the true header, the best A-P/S-I-reversed orientation fitted "
    "worse than the header's by 0.25 to 0.42 NCC; with each A-P/S-I-reversing lie, the true "
    "orientation fitted better than the header's by 0.22 to 0.72. 0.10 leaves 0.35 against "
    "false flags (0.14 on cut or tilted images) and 0.12 for detection. A left-right flip alone "
    "is not detectable (the mirrored image fitted better in 10 of the 16) and never flagged"
)

_AXIS_LETTERS = (("R", "L"), ("A", "P"), ("S", "I"))
_AXIS_WORDS = ("left and right", "front and back", "top and bottom")


@dataclass(frozen=True)
class OrientationParams:
    """Settings of the orientation check (all of them change the scores).

    Attributes:
        resolution_mm: the image and atlas are smoothed and resampled to this voxel size.
        iterations: affine iterations per level (coarse to fine).
        shrink_factors: shrink factor per level, relative to ``resolution_mm``.
        smoothing_sigmas: smoothing (voxels) per level.
        sampling_rate: fraction of voxels the Mattes MI metric samples (seeded).
        random_seed: seed of that sampling.
        margin: flag when another orientation group fits better by more than this NCC.
        retry_below: when no orientation fits with an NCC of at least this from the
            centres of mass, all are fitted again from ``start_pitches_deg`` (each keeps its
            better fit): a head pitched 20-30° from the atlas is not recovered by so short a
            registration, and then no orientation fits.
        start_pitches_deg: rotations about L-R (nodding) to start the second pass's
            registrations from, one registration each (empty: no second pass).
    """

    resolution_mm: float = 4.0
    iterations: tuple[int, ...] = (30, 15)
    shrink_factors: tuple[int, ...] = (2, 1)
    smoothing_sigmas: tuple[float, ...] = (1.0, 0.0)
    sampling_rate: float = 0.1
    random_seed: int = 1
    margin: float = DEFAULT_MARGIN
    retry_below: float = 0.5
    start_pitches_deg: tuple[float, ...] = (-25.0, 25.0)

    def __post_init__(self) -> None:
        if not self.resolution_mm > 0:
            raise ValueError(f"resolution_mm must be > 0, got {self.resolution_mm}")
        if not len(self.iterations) == len(self.shrink_factors) == len(self.smoothing_sigmas):
            raise ValueError("iterations, shrink_factors and smoothing_sigmas need one value "
                             f"per level, got {self.iterations}, {self.shrink_factors}, "
                             f"{self.smoothing_sigmas}")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")
        if self.random_seed < 1:
            raise ValueError(f"random_seed must be a positive integer, got {self.random_seed}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")


@dataclass(frozen=True)
class OrientationCheck:
    """Result of :func:`check_orientation` (or :func:`decide` alone).

    Attributes:
        scores: ``{candidate name: NCC}`` for every name of :data:`CANDIDATES`.
        header_codes: the header's axis codes, e.g. ``"LIA"`` (voxel axis i points to letter i).
        best: the candidate of the best-fitting A-P/S-I group (of its L-R pair, the one
            fitting better); ``"AsGiven"`` or ``"FlipLR"`` when the header's group wins.
        margin: the best other A-P/S-I group's fit minus the header's group's fit (> 0:
            another orientation fits better; on correct headers it is negative).
        threshold: flag when ``margin`` exceeds it.
        flagged: the header looks wrong.
        apparent: when flagged, the orientations the voxels appear to have: the header's
            codes with the detected axes reversed, then the same with L and R also swapped
            (the anatomy cannot tell which); else ``()``.
        left_right_margin: ``scores["AsGiven"] - scores["FlipLR"]``, for information only.
        brain_only: whether the brain-extracted atlas was fitted.
        second_pass: whether the fits were tried again from the start pitches (no
            orientation fitted well from the centres of mass).
        seconds: wall time of the check (0 for :func:`decide` alone).
        params: the settings used, as a dict.
    """

    scores: Mapping[str, float]
    header_codes: str
    best: str
    margin: float
    threshold: float
    flagged: bool
    apparent: tuple[str, ...] = ()
    left_right_margin: float = 0.0
    brain_only: bool = False
    second_pass: bool = False
    seconds: float = 0.0
    params: Mapping[str, Any] = field(default_factory=dict)

    def reversed_axes(self) -> tuple[bool, bool, bool]:
        """World axes (R, A, S) the best group reverses (L-R is always False: unknown)."""
        _, ap, si = CANDIDATES[self.best]
        return (False, ap, si)

    def message(self) -> str:
        """One paragraph for the QC flag and the log: what is wrong and how to fix it."""
        if not self.flagged:
            return f"the header's orientation ({self.header_codes}) fits the atlas best"
        axes = self.reversed_axes()
        what = " and ".join(w for w, r in zip(_AXIS_WORDS, axes) if r)
        voxel_axes = [i for i, code in enumerate(self.header_codes)
                      if any(r and code in _AXIS_LETTERS[a] for a, r in enumerate(axes))]
        flip_text = ("axis " if len(voxel_axes) == 1 else "axes ") + " and ".join(
            str(i) for i in voxel_axes)
        given = _group_score(self.scores, (False, False))
        return (
            f"the voxels look like {self.apparent[0]} (or {self.apparent[1]}: left and right "
            f"cannot be told apart from the anatomy) while the header says "
            f"{self.header_codes}: {what} are swapped (the atlas fits {given + self.margin:.2f} "
            f"that way against {given:.2f} as the header has it), so these labels are wrong. "
            f"Fix the header: reconvert the image from its DICOMs (e.g. with dcm2niix), or "
            f"reverse voxel {flip_text} in its affine "
            f"(bids_cadiff.registration.orientation.corrected_affine), check it against an "
            f"atlas in a viewer, then rerun with --overwrite"
        )

    def as_json(self) -> dict[str, Any]:
        """The sidecar's ``Orientation`` entry."""
        return {
            "HeaderCodes": self.header_codes,
            "Scores": {k: round(float(v), 4) for k, v in self.scores.items()},
            "Best": self.best,
            "Margin": round(float(self.margin), 4),
            "Threshold": self.threshold,
            "Flagged": self.flagged,
            "Apparent": list(self.apparent),
            "LeftRightMargin": round(float(self.left_right_margin), 4),
            "LeftRightDetected": False,
            "BrainOnlyAtlas": self.brain_only,
            "SecondPass": self.second_pass,
            "Seconds": round(float(self.seconds), 2),
            "Params": dict(self.params),
        }


def _group_score(scores: Mapping[str, float], ap_si: tuple[bool, bool]) -> float:
    """The better fit of an L-R pair of candidates with these A-P/S-I reversals."""
    return max(float(scores[name]) for name, flips in CANDIDATES.items()
               if flips[1:] == ap_si)


def apparent_codes(header_codes: str, reversed_axes: Sequence[bool]) -> str:
    """The header's axis codes with the letters of the reversed world axes swapped.

    Args:
        header_codes: e.g. ``"LPS"`` (as :func:`nibabel.aff2axcodes` writes them).
        reversed_axes: ``(R-L, A-P, S-I)`` reversed or not.

    Example:
        >>> apparent_codes("LPS", (False, True, False))
        'LAS'
        >>> apparent_codes("LIA", (True, False, True))
        'RSA'
    """
    swap = {}
    for (a, b), rev in zip(_AXIS_LETTERS, reversed_axes):
        if rev:
            swap.update({a: b, b: a})
    return "".join(swap.get(c, c) for c in header_codes)


def decide(
    scores: Mapping[str, float],
    header_codes: str,
    *,
    margin: float = DEFAULT_MARGIN,
) -> OrientationCheck:
    """The decision from the candidates' fits (pure; see the module docstring).

    Args:
        scores: ``{candidate name: NCC}`` for every name of :data:`CANDIDATES`.
        header_codes: the header's axis codes, e.g. ``"RAS"``.
        margin: flag when another A-P/S-I group fits better than the header's by more.

    Returns:
        :class:`OrientationCheck` (``seconds`` 0, no params).
    """
    missing = [name for name in CANDIDATES if name not in scores]
    if missing:
        raise ValueError(f"scores lack the candidates {missing}")
    if len(header_codes) != 3:
        raise ValueError(f"header_codes must have 3 letters, got {header_codes!r}")
    groups = {ap_si: _group_score(scores, ap_si)
              for ap_si in itertools.product((False, True), repeat=2)}
    header_group = (False, False)
    other = max((g for g in groups if g != header_group), key=lambda g: groups[g])
    difference = groups[other] - groups[header_group]
    best_group = other if difference > 0 else header_group
    pair = [name for name, flips in CANDIDATES.items() if flips[1:] == best_group]
    best = max(pair, key=lambda name: (float(scores[name]), not CANDIDATES[name][0]))
    flagged = difference > margin
    apparent: tuple[str, ...] = ()
    if flagged:
        first = apparent_codes(header_codes, (False, *best_group))
        apparent = (first, apparent_codes(first, (True, False, False)))
    return OrientationCheck(
        scores={name: float(scores[name]) for name in CANDIDATES},
        header_codes=header_codes, best=best, margin=float(difference), threshold=margin,
        flagged=flagged, apparent=apparent,
        left_right_margin=float(scores["AsGiven"]) - float(scores["FlipLR"]),
    )


def _smooth_resample(img: nib.Nifti1Image, resolution_mm: float) -> nib.Nifti1Image:
    """Gaussian anti-aliasing to ``resolution_mm``, then linear resampling (float32)."""
    data = np.asanyarray(img.dataobj).astype(np.float32)
    zooms = np.sqrt((np.asarray(img.affine)[:3, :3] ** 2).sum(axis=0))
    fwhm = np.sqrt(np.maximum((resolution_mm / zooms) ** 2 - 1.0, 0.0))
    if np.any(fwhm > 0):
        data = ndimage.gaussian_filter(data, fwhm / 2.355)
    return resample_to_spacing(nib.Nifti1Image(data, img.affine), resolution_mm, order=1)


def _crop_to_foreground(img: nib.Nifti1Image, margin: int = 3) -> nib.Nifti1Image:
    """The image cut to its :func:`foreground_mask`'s bounding box plus ``margin`` voxels."""
    data = np.asanyarray(img.dataobj)
    found = np.argwhere(foreground_mask(data))
    if len(found) == 0:
        return img
    lo = np.maximum(found.min(axis=0) - margin, 0)
    hi = np.minimum(found.max(axis=0) + margin + 1, data.shape)
    affine = np.array(img.affine, dtype=float)
    affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    return nib.Nifti1Image(np.ascontiguousarray(data[box]), affine)


@functools.lru_cache(maxsize=8)
def _atlas_images(
    spec: AtlasSpec, brain_only: bool, resolution_mm: float
) -> tuple["ants.ANTsImage", "ants.ANTsImage"]:
    """The atlas (brain-extracted or with skull) and its brain mask at ``resolution_mm``."""
    images = load_atlas(spec)
    moving = images.brain_image() if brain_only else images.t1
    mask = nib.Nifti1Image(images.brain_mask.astype(np.float32), images.t1.affine)
    return (nib_to_ants(_crop_to_foreground(_smooth_resample(moving, resolution_mm))),
            nib_to_ants(_smooth_resample(mask, resolution_mm)))


def _start(fixed: "ants.ANTsImage", moving: "ants.ANTsImage", pitch_deg: float,
           path: Path) -> Path:
    """An initial transform: centres of mass aligned, rotated ``pitch_deg`` about L-R."""
    import ants

    a = np.deg2rad(pitch_deg)
    rotation = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(a), -np.sin(a)],
                         [0.0, np.sin(a), np.cos(a)]])
    centre_f = np.asarray(ants.get_center_of_mass(fixed), dtype=float)
    centre_m = np.asarray(ants.get_center_of_mass(moving), dtype=float)
    transform = ants.create_ants_transform(
        transform_type="AffineTransform", dimension=3, matrix=rotation,
        center=tuple(centre_f), translation=tuple(centre_m - centre_f),
    )
    ants.write_transform(transform, str(path))
    return path


def _affine(
    fixed: "ants.ANTsImage",
    moving: "ants.ANTsImage",
    initial: str,
    levels: slice,
    params: OrientationParams,
    prefix: Path,
) -> str:
    """One seeded affine ANTs registration over the given levels of ``params``; returns the
    transform file (the initial transform composed in)."""
    import ants

    with _seeded(ants, params.random_seed):
        out = ants.registration(
            fixed, moving, type_of_transform="Affine", aff_metric="mattes",
            initial_transform=initial,
            aff_iterations=params.iterations[levels],
            aff_shrink_factors=params.shrink_factors[levels],
            aff_smoothing_sigmas=params.smoothing_sigmas[levels],
            aff_random_sampling_rate=params.sampling_rate,
            outprefix=str(prefix),
        )
    return str(out["fwdtransforms"][0])


def _score(fixed: "ants.ANTsImage", moving: "ants.ANTsImage", mask: "ants.ANTsImage",
           transform: str) -> float:
    """NCC between image and warped atlas inside the warped atlas brain."""
    import ants

    warped = ants.apply_transforms(fixed, moving, [transform], interpolator="linear").numpy()
    brain = ants.apply_transforms(fixed, mask, [transform], interpolator="linear").numpy() > 0.5
    return _ncc(fixed.numpy(), warped, brain)


def _fit(
    fixed: "ants.ANTsImage",
    moving: "ants.ANTsImage",
    mask: "ants.ANTsImage",
    params: OrientationParams,
    workdir: Path,
    pitches: Sequence[float],
) -> float:
    """The atlas's fit to ``fixed``: the best NCC of short affine registrations from each
    start transform (centres of mass aligned, rotated about L-R by each of ``pitches``)."""
    fits = []
    for k, pitch in enumerate(pitches):
        start = str(_start(fixed, moving, pitch, workdir / f"start{k}.mat"))
        transform = _affine(fixed, moving, start, slice(None), params, workdir / f"fit{k}_")
        fits.append(_score(fixed, moving, mask, transform))
    return max(fits)


def check_orientation(
    image: nib.Nifti1Image,
    atlas: AtlasSpec,
    *,
    header_codes: str | None = None,
    params: OrientationParams | None = None,
    brain_only: bool | None = None,
) -> OrientationCheck:
    """Fit the atlas to the image in each orientation of :data:`CANDIDATES` and decide whether
    the header's is wrong (module docstring).

    Args:
        image: a T1w ``(X, Y, Z)`` with or without skull, any orientation and voxel size (the
            app passes its N4-corrected 2 mm RAS grid).
        atlas: the atlas the app registers (:func:`~bids_cadiff.registration.atlas.resolve_atlas`).
        header_codes: axis codes of the image as stored, for the message (the app passes the
            T1w file's; default: ``nibabel.aff2axcodes(image.affine)``).
        params: settings (default :class:`OrientationParams`).
        brain_only: fit the brain-extracted atlas (the app passes what its registration used;
            default: when the image looks skull-stripped or the atlas has no skull).

    Returns:
        :class:`OrientationCheck` with the 8 fits and the decision.

    Raises:
        ValueError: the image is not 3-D or has no positive voxel.
    """
    import ants  # noqa: F401  (fail early when antspyx is missing)

    params = params or OrientationParams()
    start = time.perf_counter()
    if header_codes is None:
        header_codes = "".join(str(c) for c in nib.aff2axcodes(image.affine))
    ras = to_ras(image)
    data = np.nan_to_num(np.asanyarray(ras.dataobj).astype(np.float32))
    if not np.any(data > 0):
        raise ValueError("the image has no positive voxel")
    if brain_only is None:
        brain_only = looks_skull_stripped(data, ras.affine) or not atlas.has_skull
    small = _crop_to_foreground(_smooth_resample(nib.Nifti1Image(data, ras.affine),
                                                 params.resolution_mm))
    moving, mask = _atlas_images(atlas, brain_only, float(params.resolution_mm))
    array = np.asanyarray(small.dataobj)
    candidates = {}
    for name, flips in CANDIDATES.items():
        axes = tuple(i for i, f in enumerate(flips) if f)
        flipped = np.flip(array, axes) if axes else array
        candidates[name] = nib_to_ants(small, np.ascontiguousarray(flipped))
    with tempfile.TemporaryDirectory(prefix="cadiff-orientation-") as tmp:
        scores = {name: _fit(fixed, moving, mask, params, Path(tmp), (0.0,))
                  for name, fixed in candidates.items()}
        retried = max(scores.values()) < params.retry_below and bool(params.start_pitches_deg)
        if retried:
            logger.info("no orientation fits well (best NCC %.3f < %.2f): fitting again from "
                        "start pitches %s", max(scores.values()), params.retry_below,
                        params.start_pitches_deg)
            for name, fixed in candidates.items():
                again = _fit(fixed, moving, mask, params, Path(tmp), params.start_pitches_deg)
                scores[name] = max(scores[name], again)
    result = decide(scores, header_codes, margin=params.margin)
    seconds = time.perf_counter() - start
    logger.info(
        "orientation check (%s, %s atlas): %s; %.1f s", header_codes,
        "brain-only" if brain_only else "with-skull",
        ", ".join(f"{k} {v:.3f}" for k, v in scores.items()), seconds,
    )
    return replace(result, brain_only=brain_only, second_pass=retried, seconds=seconds,
                   params=asdict(params))


def _voxel_flip(
    affine: np.ndarray, shape: Sequence[int], world_axes: Sequence[bool]
) -> np.ndarray:
    """``(4, 4)`` voxel-index map reversing the voxel axes closest to the given world axes."""
    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=float))
    flip = np.column_stack([np.arange(3), np.ones(3)])
    for voxel_axis, (world_axis, _) in enumerate(ornt):
        if world_axes[int(world_axis)]:
            flip[voxel_axis, 1] = -1
    return nib.orientations.inv_ornt_aff(flip, tuple(int(s) for s in shape[:3]))


def flip_header(
    affine: np.ndarray, shape: Sequence[int], world_axes: Sequence[bool]
) -> np.ndarray:
    """A lying header for tests and benchmarks: the same voxels mirrored in world space.

    Args:
        affine: the true ``(4, 4)`` voxel-to-world affine.
        shape: the image shape.
        world_axes: ``(R-L, A-P, S-I)``: which world axes to mirror (two of them: the image
            rotated 180° about the third).

    Returns:
        ``(4, 4)`` affine that places voxel axes closest to those world axes backwards, over
        the same field of view.
    """
    return np.asarray(affine, dtype=float) @ _voxel_flip(affine, shape, world_axes)


def corrected_affine(
    affine: np.ndarray, shape: Sequence[int], check: OrientationCheck
) -> np.ndarray:
    """The affine that undoes what ``check`` found (the voxel axes it saw reversed, keeping
    the header's left-right reading, which the check cannot judge).

    Example (fix a flagged file)::

        img = nib.load(path)
        fixed = corrected_affine(img.affine, img.shape, check)
        nib.Nifti1Image(np.asanyarray(img.dataobj), fixed, img.header).to_filename(out)
    """
    if not check.flagged:
        return np.asarray(affine, dtype=float).copy()
    return flip_header(affine, shape, check.reversed_axes())
