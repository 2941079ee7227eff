import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_cadiff.errors import InputError
from bids_cadiff.io.nifti import load_label_map, load_t1w


def _save(path, data, zooms=(1.0, 1.0, 1.0)):
    affine = np.diag([*zooms[:3], 1.0])
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), path)
    return path


def _head(shape=(64, 70, 66)):
    data = np.zeros(shape, np.float32)
    data[10:-10, 10:-10, 10:-10] = np.random.default_rng(0).uniform(50, 100, (shape[0] - 20, shape[1] - 20, shape[2] - 20))
    return data


def test_good_3d_and_single_volume_4d(tmp_path):
    img = load_t1w(_save(tmp_path / "a.nii.gz", _head()))
    assert img.shape == (64, 70, 66) and img.get_data_dtype() == np.float32
    img4 = load_t1w(_save(tmp_path / "b.nii.gz", _head()[..., None]))
    assert img4.shape == (64, 70, 66)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_text("not an image"), "cannot be read"),
        (lambda p: p.write_bytes(gzip.compress(nib.Nifti1Image(_head(), np.eye(4)).to_bytes())[:5000]), "truncated"),
        (lambda p: _save(p, np.ones((64, 64))), "2D"),
        (lambda p: _save(p, np.stack([_head(), _head()], -1)), "2 volumes"),
        (lambda p: _save(p, np.full((64, 70, 66), np.nan)), "NaN"),
        (lambda p: _save(p, np.where(_head() > 0, np.nan, 1.0)), "NaN or infinite"),
        (lambda p: _save(p, np.zeros((64, 70, 66))), "no positive voxels"),
        (lambda p: _save(p, -_head()), "no positive voxels"),
        (lambda p: _save(p, np.full((64, 70, 66), 5.0)), "same value"),
        (lambda p: _save(p, _head((30, 70, 66))[:12]), "too small"),
        (lambda p: _save(p, _head(), zooms=(1.0, 1.0, 9.0)), "voxel size"),
    ],
)
def test_bad_images_name_the_file_and_the_problem(tmp_path, make, message):
    _fails_naming_file_and_problem(load_t1w, tmp_path / "sub-01_T1w.nii.gz", make, message)


def _fails_naming_file_and_problem(load, path, make, message):
    """``make(path)`` writes a bad file; ``load(path)`` must raise an InputError naming it."""
    make(path)
    with pytest.raises(InputError, match=message) as info:
        load(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- label maps

#: RAS grid of the label tests: 2 x 3 x 4 mm voxels, odd shape, off-centre origin.
LABEL_SHAPE = (7, 8, 9)
LABEL_AFFINE = np.array([[2.0, 0, 0, -7.0], [0, 3.0, 0, 5.0], [0, 0, 4.0, -11.0], [0, 0, 0, 1]])


def _labels() -> np.ndarray:
    """Distinct integer values, so that any misplaced voxel shows."""
    return (np.arange(np.prod(LABEL_SHAPE)) % 251).reshape(LABEL_SHAPE).astype(np.int16)


def _save_labels(path, data, affine=LABEL_AFFINE):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_label_map_on_its_own_grid(tmp_path):
    path = _save_labels(tmp_path / "sub-01_dseg.nii.gz", _labels())
    loaded = load_label_map(path)
    assert loaded.values.dtype == np.int32 and np.array_equal(loaded.values, _labels())
    assert np.array_equal(loaded.affine, LABEL_AFFINE) and loaded.spacing == (2.0, 3.0, 4.0)
    squeezed = load_label_map(_save_labels(tmp_path / "four_d.nii.gz", _labels()[..., None]))
    assert np.array_equal(squeezed.values, _labels())
    # Whole numbers stored as floats are labels; they come back as int32.
    floats = load_label_map(_save_labels(tmp_path / "float.nii.gz", _labels().astype(np.float32)))
    assert floats.values.dtype == np.int32 and np.array_equal(floats.values, _labels())


def test_non_ras_label_map_keeps_its_orientation_and_lands_right_on_a_ras_grid(tmp_path):
    ras = nib.Nifti1Image(_labels(), LABEL_AFFINE)
    to_lia = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(("R", "A", "S")), nib.orientations.axcodes2ornt(("L", "I", "A"))
    )
    lia = ras.as_reoriented(to_lia)
    assert nib.aff2axcodes(lia.affine) == ("L", "I", "A")
    path = _save_labels(tmp_path / "lia_dseg.nii.gz", np.asanyarray(lia.dataobj), lia.affine)
    native = load_label_map(path)
    assert native.values.shape == (7, 9, 8) and np.allclose(native.affine, lia.affine)
    on_ras = load_label_map(path, ref_shape=LABEL_SHAPE, ref_affine=LABEL_AFFINE)
    assert np.array_equal(on_ras.values, _labels())
    assert np.array_equal(on_ras.affine, LABEL_AFFINE) and on_ras.spacing == (2.0, 3.0, 4.0)


def test_label_map_resampled_onto_another_grid_by_nearest_neighbour(tmp_path):
    path = _save_labels(tmp_path / "sub-01_dseg.nii.gz", _labels())
    # Coarser, shifted, and reaching past the label map on every axis: no voxel centre of the
    # reference falls half-way between two source voxels.
    ref_shape = (5, 6, 7)
    ref_affine = np.array([[3.0, 0, 0, -9.4], [0, 4.5, 0, 1.3], [0, 0, 5.0, -16.2], [0, 0, 0, 1]])
    out = load_label_map(path, ref_shape=ref_shape, ref_affine=ref_affine)
    ijk = np.indices(ref_shape).reshape(3, -1)
    world = ref_affine[:3, :3] @ ijk + ref_affine[:3, 3:]
    src = np.linalg.inv(LABEL_AFFINE)[:3, :3] @ world + np.linalg.inv(LABEL_AFFINE)[:3, 3:]
    nearest = np.rint(src).astype(int)
    inside = np.all((nearest >= 0) & (nearest < np.array(LABEL_SHAPE)[:, None]), axis=0)
    expected = np.zeros(ijk.shape[1], np.int32)
    expected[inside] = _labels()[tuple(nearest[:, inside])]
    assert not inside.all() and inside.any()
    assert out.values.dtype == np.int32
    assert np.array_equal(out.values, expected.reshape(ref_shape))
    assert out.spacing == (3.0, 4.5, 5.0) and np.array_equal(out.affine, ref_affine)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: p.write_text("not an image"), "cannot be read"),
        (lambda p: _save_labels(p, np.zeros((7, 8), np.int16)), "must be 3D"),
        (lambda p: _save_labels(p, np.zeros((7, 8, 9, 2), np.int16)), "must be 3D"),
        (lambda p: _save_labels(p, _labels().astype(np.float32) + 0.4), "non-integer"),
    ],
)
def test_bad_label_maps_name_the_file_and_the_problem(tmp_path, make, message):
    _fails_naming_file_and_problem(load_label_map, tmp_path / "sub-01_dseg.nii.gz", make, message)


def test_label_map_reference_grid_needs_shape_and_affine(tmp_path):
    path = _save_labels(tmp_path / "sub-01_dseg.nii.gz", _labels())
    with pytest.raises(ValueError, match="both ref_shape and ref_affine"):
        load_label_map(path, ref_shape=LABEL_SHAPE)


@pytest.mark.parametrize("dtype, scale, suffix", [
    (np.uint8, 1.0, ".nii.gz"), (np.int16, 16.0, ".nii.gz"), (np.float64, 1.0, ".nii.gz"),
    (np.float32, 1e-3, ".nii.gz"), (np.float32, 1e4, ".nii.gz"), (np.uint8, 1.0, ".nii"),
])
def test_data_types_and_scalings_read_to_the_same_normalised_image(
        tmp_path: Path, dtype, scale, suffix) -> None:
    """uint8, int16, float64 data, intensities × 1e-3 or × 1e4, an uncompressed ``.nii``: the
    T1w reads as float32 and normalises to the same image (issue #15, item 4)."""
    from bids_cadiff.imaging.preprocess import normalise_intensity

    rng = np.random.default_rng(1)
    base = np.clip(rng.normal(100, 30, (20, 22, 24)), 0, 255).round()
    path = tmp_path / f"t1w{suffix}"
    nib.save(nib.Nifti1Image((base * scale).astype(dtype), np.diag([3.5, 3.5, 3.5, 1])), path)
    img = load_t1w(path)
    assert img.get_data_dtype() == np.float32
    data = np.asanyarray(img.dataobj)
    assert data.dtype == np.float32
    np.testing.assert_allclose(data, base * scale, rtol=1e-6)
    np.testing.assert_allclose(normalise_intensity(data), normalise_intensity(base), atol=1e-5)
