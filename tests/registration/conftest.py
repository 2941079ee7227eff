"""Fixtures for registration tests: a tiny synthetic head phantom used as atlas and subject."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_cadiff.registration.atlas import AtlasSpec

#: Phantom grid: 4 mm voxels, world (0, 0, 0) at the grid centre (the phantom's "AC"). The
#: phantom has real-head size (brain ~1.3 L, head ~3.2 L) so the skull-stripped test works.
PHANTOM_SHAPE = (47, 57, 49)
PHANTOM_SPACING = 4.0
_S = 1.45  # phantom geometry scale (mm)

SHARED_DATA = Path(__file__).parents[2] / ".." / "shared" / "data"


def phantom_affine(shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """RAS affine of the phantom grid, centre at world ``-shift_mm``."""
    affine = np.diag([PHANTOM_SPACING] * 3 + [1.0])
    centre = (np.asarray(PHANTOM_SHAPE) - 1) / 2.0
    affine[:3, 3] = -centre * PHANTOM_SPACING - np.asarray(shift_mm)
    return affine


def make_phantom(
    *, skull: bool = True, shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    scale: float = 1.0, intensity_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A head phantom: brain ellipsoid with asymmetric 'ventricles', skull shell and scalp.

    The phantom's world geometry is the atlas one moved by ``shift_mm`` and scaled by ``scale``
    about its centre, so registration has a known answer.

    Returns:
        ``(data (X, Y, Z) float32, brain_mask (X, Y, Z) bool, affine (4, 4))``; the affine is the
        plain phantom grid (the shift and scale are in the data).
    """
    affine = phantom_affine()
    idx = np.indices(PHANTOM_SHAPE, dtype=np.float64).reshape(3, -1)
    world = (affine[:3, :3] @ idx + affine[:3, 3:4]).reshape(3, *PHANTOM_SHAPE)
    x, y, z = [(world[i] - shift_mm[i]) / (scale * _S) for i in range(3)]
    r_brain = (x / 45.0) ** 2 + (y / 58.0) ** 2 + (z / 45.0) ** 2
    r_head = (x / 56.0) ** 2 + (y / 68.0) ** 2 + (z / 56.0) ** 2
    brain = r_brain <= 1.0
    data = np.where(brain, 80.0, 0.0)
    data += np.where(brain & (np.abs(x) > 12) & (r_brain < 0.5), 40.0, 0.0)  # "white matter"
    vent_left = ((x + 8) / 5) ** 2 + ((y - 8) / 16) ** 2 + ((z - 6) / 7) ** 2 <= 1
    vent_right = ((x - 8) / 5) ** 2 + ((y - 2) / 12) ** 2 + ((z - 6) / 7) ** 2 <= 1
    data[vent_left | vent_right] = 20.0
    data[brain & (np.abs(x) < 2.5) & (z > 5)] = 30.0  # interhemispheric fissure, top only
    data[brain & (((x - 20) / 8) ** 2 + ((y + 30) / 8) ** 2 + ((z + 10) / 8) ** 2 <= 1)] = 150.0
    if skull:
        shell = (r_head <= 1.0) & ~brain
        data = np.where(shell, 40.0, data)
        data = np.where(shell & (r_head > 0.85), 110.0, data)  # scalp
    return (data * intensity_scale).astype(np.float32), brain, affine


@pytest.fixture(scope="session")
def phantom_atlas(tmp_path_factory: pytest.TempPathFactory) -> AtlasSpec:
    """A custom :class:`AtlasSpec` over phantom files (with skull, plus a ``_brain`` sibling)."""
    folder = tmp_path_factory.mktemp("phantom_atlas")
    data, brain, affine = make_phantom(skull=True)
    t1 = folder / "phantom.nii.gz"
    mask = folder / "phantom_brain.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), t1)
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), mask)
    return AtlasSpec(
        name="custom", t1_path=t1, brain_mask_path=mask,
        brain_mask_source=f"nonzero voxels of {mask.name}", has_skull=True,
        description="synthetic phantom atlas",
    )
