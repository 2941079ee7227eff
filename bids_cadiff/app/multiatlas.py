"""Multi-atlas segmentation baseline: register labelled subjects to a target, propagate, vote.

Each atlas subject (a T1w and its label map) is registered to the target T1w with the app's own
registration (:func:`bids_cadiff.registration.ants.register_atlas`, the atlas given as a
``custom`` :class:`~bids_cadiff.registration.atlas.AtlasSpec` whose brain mask is the label map's
nonzero voxels), its labels are carried over with nearest-neighbour interpolation
(:func:`~bids_cadiff.registration.ants.warp_labels`), mapped to label-table channels, and the
channel chosen by most atlases wins in each voxel (ties: the lowest channel;
:func:`bids_cadiff.evaluation.multiatlas.majority_vote`). This is the "Multi-Atlas" reference
row of the paper's Table I, measured on the same folds as the models
(:mod:`bids_cadiff.app.crossval`).

``registration="none"`` maps labels by world coordinates only (for images already aligned, and
for tests). Atlases whose registration fails the app's quality check are skipped (logged).
ANTs is imported lazily.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np

from bids_cadiff.errors import RegistrationError
from bids_cadiff.evaluation.multiatlas import majority_vote
from bids_cadiff.io.nifti import load_label_map
from bids_cadiff.labels import LabelTable

logger = logging.getLogger(__name__)

__all__ = ["multiatlas_segment", "propagate_labels"]


def propagate_labels(
    target: nib.Nifti1Image,
    atlas_t1w: Path,
    atlas_labels: Path,
    *,
    registration: str = "syn",
    cache_dir: Path | None = None,
) -> np.ndarray:
    """One atlas subject's label *values* on the target's grid.

    Args:
        target: the target T1w image ``(X, Y, Z)``.
        atlas_t1w: the atlas subject's T1w.
        atlas_labels: its label map (any grid; its nonzero voxels are the atlas brain).
        registration: ``"syn"``, ``"affine"`` or ``"none"``.
        cache_dir: registration cache.

    Returns:
        int32 ``(X, Y, Z)`` label values on the target grid (0 outside the warped atlas).

    Raises:
        InputError: the label map cannot be read as integer labels.
        RegistrationError: the registration failed its quality check.
    """
    from bids_cadiff.imaging.preprocess import looks_skull_stripped, resample_to_reference

    labels = load_label_map(atlas_labels)
    if registration == "none":
        return resample_to_reference(labels.values, labels.affine, target.shape[:3],
                                     target.affine, order=0)
    from bids_cadiff.registration.ants import register_atlas, warp_labels
    from bids_cadiff.registration.atlas import AtlasSpec, load_atlas

    atlas_img = nib.load(str(atlas_t1w))
    data = np.asanyarray(atlas_img.dataobj).astype(np.float32).squeeze()
    spec = AtlasSpec(
        name="custom", t1_path=Path(atlas_t1w), brain_mask_path=Path(atlas_labels),
        brain_mask_source=f"nonzero voxels of {Path(atlas_labels).name}",
        has_skull=not looks_skull_stripped(data, atlas_img.affine),
        description=f"multi-atlas subject {Path(atlas_t1w).name}",
    )
    reg = register_atlas(
        target, spec, cache_dir=cache_dir,
        type_of_transform="SyN" if registration == "syn" else "Affine",
    )
    atlas = load_atlas(spec)
    on_atlas = resample_to_reference(labels.values, labels.affine, atlas.t1.shape[:3],
                                     atlas.t1.affine, order=0)
    return warp_labels(on_atlas, atlas.t1, reg, target).astype(np.int32)


def multiatlas_segment(
    target_t1w: Path,
    atlases: Sequence[tuple[Path, Path]],
    *,
    table: LabelTable,
    merge: Mapping[int, int] | None,
    registration: str = "syn",
    cache_dir: Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Segment a T1w by majority vote of registered atlas subjects.

    Args:
        target_t1w: the image to segment.
        atlases: ``(T1w, label map)`` of each atlas subject.
        table: label table (channels); merge: value merge applied before mapping.
        registration: ``"syn"``, ``"affine"`` or ``"none"``.
        cache_dir: registration cache.

    Returns:
        ``(channels, affine)``: int16 ``(X, Y, Z)`` channel map on the target T1w's grid and that
        grid's affine.

    Raises:
        RegistrationError: no atlas could be registered.
    """
    from bids_cadiff.training.prepare import labels_to_index

    target = nib.load(str(target_t1w))
    target = nib.Nifti1Image(np.asanyarray(target.dataobj).astype(np.float32).squeeze(), target.affine)
    maps, last_error = [], None
    for t1w, labels in atlases:
        try:
            values = propagate_labels(target, t1w, labels, registration=registration,
                                      cache_dir=cache_dir)
        except RegistrationError as exc:
            logger.warning("multi-atlas: atlas %s skipped for %s: %s", t1w, target_t1w, exc)
            last_error = exc
            continue
        maps.append(labels_to_index(values, table, merge, target.affine))
    logger.info("multi-atlas: %s labelled by %d of %d atlases", target_t1w, len(maps), len(atlases))
    if not maps:
        raise RegistrationError(target_t1w, f"no atlas subject could be registered ({last_error})")
    return majority_vote(maps, table.num_classes), np.asarray(target.affine)
