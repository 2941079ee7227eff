import numpy as np
import pytest
import torch
from scipy import ndimage

from bids_cadiff.models.config import DiffusionConfig, ModelConfig
from bids_cadiff.models.diffusion import CADiff
from bids_cadiff.models.prior import LOG_FLOOR, build_label_prior, prior_log_probs


def coordinate_field(shape=(17, 16, 15), margin=1):
    """A field whose channel k is the normalised voxel index along axis k, zero in a margin."""
    grids = np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij")
    field = np.stack(grids).astype(np.float32)
    inside = np.zeros(shape, bool)
    inside[tuple(slice(margin, s - margin) for s in shape)] = True
    field[:, ~inside] = 0
    return field, inside


def halves(field, inside, axis):
    """Class 1 where the field's ``axis`` coordinate is < 0.5, class 2 elsewhere in the brain."""
    labels = np.where(field[axis] < 0.5, 1, 2)
    return np.where(inside, labels, 0)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_prior_recovers_labels_at_the_training_coordinates(axis):
    field, inside = coordinate_field()
    labels = halves(field, inside, axis)
    probs = build_label_prior([(field, labels)], num_classes=3, bins=12, sigma=0.0)
    assert probs.shape == (3, 12, 12, 12)
    np.testing.assert_allclose(probs.sum(0), 1.0, rtol=1e-5)
    log = prior_log_probs(torch.log(torch.as_tensor(probs)), torch.as_tensor(field)[None])
    assert log.shape == (1, 3, *field.shape[1:])
    pred = log[0].argmax(0).numpy()
    # away from the 0.5 boundary and the brain's edge every voxel gets its class back (so the
    # axes are in the right order)
    sure = (np.abs(field[axis] - 0.5) > 0.1) & ndimage.binary_erosion(inside)
    assert (pred[sure] == labels[sure]).all()
    assert (pred[~inside] == 0).all()


def test_outside_voxels_are_background_and_floor():
    field, inside = coordinate_field()
    probs = build_label_prior([(field, halves(field, inside, 0))], 3, bins=8)
    log = prior_log_probs(torch.log(torch.as_tensor(probs)), torch.zeros(2, 3, 4, 4, 4))
    assert torch.all(log[:, 0] == 0) and torch.allclose(log[:, 1:], torch.tensor(LOG_FLOOR))


def test_2d_lookup_matches_3d():
    field, inside = coordinate_field()
    probs = torch.log(torch.as_tensor(build_label_prior([(field, halves(field, inside, 1))], 3, 8)))
    vol = prior_log_probs(probs, torch.as_tensor(field)[None])
    sl = prior_log_probs(probs, torch.as_tensor(field[:, :, :, 7])[None])
    torch.testing.assert_close(sl, vol[..., 7])


def test_build_rejects_bad_input():
    field, inside = coordinate_field()
    with pytest.raises(ValueError, match="labels must be in"):
        build_label_prior([(field, halves(field, inside, 0) + 5)], 3, 8)
    with pytest.raises(ValueError, match="no training voxel"):
        build_label_prior([(np.zeros_like(field), np.zeros(field.shape[1:], int))], 3, 8)
    with pytest.raises(ValueError, match="differ in shape"):
        build_label_prior([(field, np.zeros((2, 2, 2), int))], 3, 8)


def model_with_prior(mode="collaborative"):
    model = CADiff(
        ModelConfig(num_classes=3, channels=(4, 8), time_embed_dim=16, mode=mode, label_prior_bins=8),
        DiffusionConfig(timesteps=50, sampling_steps=2),
    )
    field, inside = coordinate_field()
    model.set_label_prior(torch.as_tensor(build_label_prior([(field, halves(field, inside, 0))], 3, 8)))
    return model, field, inside


def test_model_adds_the_prior_to_its_logits():
    model, field, inside = model_with_prior()
    # silence the network: its logits are all zero, so the prior alone decides
    torch.nn.init.zeros_(model.denoiser.label_head.weight)
    torch.nn.init.zeros_(model.denoiser.label_head.bias)
    image = torch.rand(1, 1, *field.shape[1:])
    probs = model.eval().sample(image, torch.as_tensor(field)[None], generator=torch.Generator().manual_seed(0))
    pred = probs[0].argmax(0).numpy()
    labels = halves(field, inside, 0)
    sure = (np.abs(field[0] - 0.5) > 0.1) & ndimage.binary_erosion(inside)
    assert (pred[sure] == labels[sure]).all()


def test_model_with_prior_trains_and_round_trips():
    model, field, inside = model_with_prior("dual")
    labels = torch.as_tensor(halves(field, inside, 0))[None, None]
    losses = model.training_losses(torch.rand(1, 1, *field.shape[1:]), torch.as_tensor(field)[None], labels)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    state = model.state_dict()
    assert "label_prior" in state
    fresh = CADiff(model.model_config, model.diffusion_config)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.label_prior, model.label_prior)


def test_prior_config_validated():
    with pytest.raises(ValueError, match="needs the distance field"):
        ModelConfig(mode="diffusion", label_prior_bins=8)
    with pytest.raises(ValueError, match="label_prior_bins"):
        ModelConfig(label_prior_bins=-1)
    model = CADiff(ModelConfig(num_classes=3, channels=(4, 8)), DiffusionConfig())
    with pytest.raises(ValueError, match="no label prior"):
        model.set_label_prior(torch.ones(3, 8, 8, 8))


def test_consistency_similarities_ignore_the_prior_offset():
    # Sim_M comes from the network's own logits: a prior (the same log P offset for every
    # patch) changes the label loss but not L_sac, Sim_D or Sim_M
    model, field, inside = model_with_prior()
    plain = CADiff(model.model_config, model.diffusion_config)
    plain.load_state_dict(model.state_dict())
    torch.nn.init.zeros_(plain.label_prior)  # log 1: no offset
    image = torch.rand(2, 1, *field.shape[1:])
    dist = torch.as_tensor(field)[None].repeat(2, 1, 1, 1, 1)
    dist[1] = dist[1].flip(-1)
    labels = torch.as_tensor(halves(field, inside, 0))[None, None].repeat(2, 1, 1, 1, 1)
    with_prior = model.training_losses(image, dist, labels, torch.Generator().manual_seed(2))
    without = plain.training_losses(image, dist, labels, torch.Generator().manual_seed(2))
    for key in ("sac", "sim_d", "sim_m"):
        torch.testing.assert_close(with_prior[key], without[key])
    assert not torch.allclose(with_prior["dice_ce"], without["dice_ce"])
