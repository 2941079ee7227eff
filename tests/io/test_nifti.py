import gzip

import nibabel as nib
import numpy as np
import pytest

from bids_cadiff.errors import InputError
from bids_cadiff.io.nifti import load_t1w


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
    path = tmp_path / "sub-01_T1w.nii.gz"
    make(path)
    with pytest.raises(InputError, match=message) as info:
        load_t1w(path)
    assert str(path) in str(info.value)
