import numpy as np
import pytest

from bids_cadiff.training.synth import (
    BRAIN_VALUES,
    CSF_VALUE,
    augment_intensity,
    bias_field,
    deform,
    extracerebral_csf_to_background,
    mean_t1_image,
    smooth_deformation,
    synthesize,
)


def label_map(shape=(24, 20, 16)):
    """Background, a 'skull' (value 165, not brain), white matter (2) and cortex (3) shells."""
    labels = np.zeros(shape, np.int32)
    labels[2:-2, 2:-2, 2:-2] = 165
    labels[4:-4, 4:-4, 4:-4] = 3
    labels[7:-7, 7:-7, 6:-6] = 2
    return labels


def test_mean_t1_image_follows_t1_contrast():
    labels = label_map()
    image = mean_t1_image(labels)
    assert image[labels == 2].mean() > image[labels == 3].mean() > 0
    assert image[labels == 0].max() == 0


@pytest.mark.parametrize("skull", [True, False])
def test_synthesize_draws_per_label_intensities(skull):
    labels = label_map()
    rng = np.random.default_rng(0)
    image = synthesize(labels, rng, skull=skull)
    assert image.shape == labels.shape and image.dtype == np.float32
    assert np.isfinite(image).all() and image.min() >= 0
    if not skull:  # non-brain labels are dropped (up to the blur at their border)
        assert 165 not in BRAIN_VALUES
        inner_skull = np.zeros_like(labels, bool)
        inner_skull[2:3, 2:-2, 2:-2] = True
        assert image[inner_skull].mean() < 0.5 * image[labels == 2].mean()
    # a new draw is a new image
    assert not np.allclose(image, synthesize(labels, np.random.default_rng(1), skull=skull))


def test_bias_field_is_smooth_and_positive():
    field = bias_field((20, 20, 20), np.random.default_rng(0), 0.3)
    assert field.shape == (20, 20, 20) and field.min() > 0
    # smooth: neighbours differ by a small part of the field's range (white noise: ~the range)
    assert np.abs(np.diff(field, axis=0)).max() < 0.35 * (field.max() - field.min())


def test_augment_intensity_keeps_shape_and_sign():
    image = mean_t1_image(label_map())
    out = augment_intensity(image, np.random.default_rng(0))
    assert out.shape == image.shape and out.min() >= 0 and np.isfinite(out).all()


def test_smooth_deformation_is_smooth_and_bounded():
    disp = smooth_deformation((30, 28, 26), np.random.default_rng(0), max_voxels=3.0)
    assert disp.shape == (3, 30, 28, 26) and disp.dtype == np.float32
    assert np.abs(disp).max() < 4 * 1.5 + 1e-6  # 4 std of the largest draw
    # neighbours move together: steps are a small part of the displacements' range
    assert np.abs(np.diff(disp, axis=1)).max() < 0.35 * (disp.max() - disp.min())


def test_deform_identity_shift_and_joint_labels():
    rng = np.random.default_rng(0)
    arrays = {"image": rng.random((1, 12, 10, 8)).astype(np.float32),
              "distance": rng.random((3, 12, 10, 8)).astype(np.float32),
              "labels": rng.integers(0, 5, (1, 12, 10, 8)).astype(np.float32)}
    same = deform(arrays, np.zeros((3, 12, 10, 8), np.float32), nearest=("labels",))
    for k in arrays:
        np.testing.assert_allclose(same[k], arrays[k], atol=1e-5)
    shift = np.zeros((3, 12, 10, 8), np.float32)
    shift[2] = 2.0  # sample two voxels further along the last axis
    moved = deform(arrays, shift, nearest=("labels",))
    np.testing.assert_allclose(moved["image"][..., :6], arrays["image"][..., 2:], atol=1e-5)
    assert (moved["image"][..., 6:] == 0).all()
    # labels stay labels (nearest) and move with the image
    np.testing.assert_array_equal(moved["labels"][..., :6], arrays["labels"][..., 2:])
    half = shift * 0.25
    warped = deform(arrays, half, nearest=("labels",))
    assert set(np.unique(warped["labels"])) <= set(np.unique(arrays["labels"])) | {0.0}


def test_extracerebral_csf_to_background_changes_only_csf():
    values = np.array([[0, 24, 2], [24, 41, 14]], dtype=np.int16)
    out = extracerebral_csf_to_background(values)
    assert CSF_VALUE == 24 and out.dtype == values.dtype
    np.testing.assert_array_equal(out, [[0, 0, 2], [0, 41, 14]])
    assert (values == 24).sum() == 2  # the input is left alone
