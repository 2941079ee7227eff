import math

import pytest
import torch

from bids_cadiff.models.losses import (
    EPS,
    DiffusionLoss,
    consistency_loss,
    pair_similarities,
)


def test_consistency_loss_matches_hand_computation():
    # two samples, two voxels (1D spatial), three distance channels, two classes
    d = torch.tensor(
        [
            [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
            [[0.3, 0.0], [0.0, 0.6], [0.0, 0.0]],
        ]
    )
    p = torch.tensor([[[1.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 1.0]]])
    # Sim_D = 1 - mean(sqrt(0.09/3), sqrt(0.36/3))
    sim_d = 1 - (math.sqrt(0.09 / 3) + math.sqrt(0.36 / 3)) / 2
    # voxel 0: (1,0)·(1,1) / (1 * sqrt2); voxel 1: (1,1)·(0,1) / (sqrt2 * 1)
    sim_m = (1 / math.sqrt(2) + 1 / math.sqrt(2)) / 2
    expected = -sim_m * math.log(sim_d) - (1 - sim_m) * math.log(1 - sim_d)
    got_d, got_m = pair_similarities(d, p)
    assert math.isclose(float(got_d[0]), sim_d, rel_tol=1e-5)
    assert math.isclose(float(got_m[0]), sim_m, rel_tol=1e-6)
    assert math.isclose(float(consistency_loss(d, p)), expected, rel_tol=1e-5)


def test_consistency_loss_averages_over_all_pairs():
    torch.manual_seed(0)
    d, p = torch.rand(3, 3, 4, 4), torch.randn(3, 5, 4, 4)
    pairs = [consistency_loss(d[[i, j]], p[[i, j]]) for i, j in [(0, 1), (0, 2), (1, 2)]]
    torch.testing.assert_close(consistency_loss(d, p), torch.stack(pairs).mean())


def test_consistency_loss_finite_at_similarity_extremes():
    same = torch.full((2, 3, 4, 4), 0.5, requires_grad=True)
    logits = torch.ones(2, 4, 4, 4, requires_grad=True)  # Sim_M = 1
    loss = consistency_loss(same, logits)  # Sim_D = 1
    assert torch.isfinite(loss)
    assert math.isclose(float(loss.detach()), -math.log(1 - EPS), abs_tol=1e-4)
    loss.backward()
    assert torch.isfinite(same.grad).all()
    assert logits.grad is None  # Sim_M is the target: no gradient reaches the label branch

    far = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4) * 5]).requires_grad_()
    opposite = torch.stack([torch.ones(4, 4, 4), -torch.ones(4, 4, 4)])  # Sim_M = -1 -> 0
    loss = consistency_loss(far, opposite)  # Sim_D <= 0 -> EPS
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(far.grad).all()


def test_consistency_loss_single_sample_is_zero():
    assert float(consistency_loss(torch.rand(1, 3, 4, 4), torch.rand(1, 2, 4, 4))) == 0.0


def test_dice_similarity_variant_in_unit_range():
    d, p = torch.rand(2, 3, 5, 5), torch.randn(2, 4, 5, 5)
    assert 0 <= float(consistency_loss(d, p, "dice")) < 20


def test_diffusion_loss_terms():
    loss = DiffusionLoss()
    labels = torch.randint(0, 3, (2, 1, 6, 6))
    perfect = torch.nn.functional.one_hot(labels[:, 0], 3).movedim(-1, 1).float() * 50
    d0 = torch.rand(2, 3, 6, 6)
    out = loss(d0, d0, perfect, labels)
    assert float(out["mse"]) == 0.0
    assert float(out["dice_ce"]) < 1e-3
    assert "mse" not in loss(None, None, perfect, labels)


def test_batch_dice_scores_the_batch_as_one_volume():
    labels = torch.randint(0, 3, (2, 1, 6, 6))
    logits = torch.randn(2, 3, 6, 6)
    batch = DiffusionLoss(batch_dice=True).dice_ce.dice(logits, labels)
    # the same voxels side by side in one sample, scored per sample
    joined = DiffusionLoss().dice_ce.dice(torch.cat(list(logits), -1)[None], torch.cat(list(labels), -1)[None])
    torch.testing.assert_close(batch, joined)
    assert not torch.allclose(batch, DiffusionLoss().dice_ce.dice(logits, labels))


def test_batch_dice_is_perfect_for_perfect_prediction():
    labels = torch.randint(0, 2, (2, 1, 6, 6))  # class 2 absent and not predicted
    perfect = torch.nn.functional.one_hot(labels[:, 0], 3).movedim(-1, 1).float() * 50
    out = DiffusionLoss(batch_dice=True)(None, None, perfect, labels)
    assert float(out["dice_ce"]) < 1e-3


def test_pair_similarities_match_each_pair_alone():
    torch.manual_seed(1)
    d, p = torch.rand(4, 3, 3, 5), torch.randn(4, 6, 3, 5)
    sim_d, sim_m = pair_similarities(d, p)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    assert sim_d.shape == sim_m.shape == (len(pairs),)
    for k, (i, j) in enumerate(pairs):
        shift = torch.sqrt(((d[i] - d[j]) ** 2).sum(0) / 3).mean()
        cos = torch.nn.functional.cosine_similarity(p[i], p[j], dim=0).mean()
        assert math.isclose(float(sim_d[k]), 1 - float(shift), rel_tol=1e-5)
        assert math.isclose(float(sim_m[k]), float(cos), rel_tol=1e-5)
    dice_d, dice_m = pair_similarities(d, p, "dice")
    torch.testing.assert_close(dice_d, sim_d)
    assert ((dice_m > 0) & (dice_m <= 1)).all()
    with pytest.raises(ValueError, match="similarity"):
        pair_similarities(d, p, "euclid")


def test_consistency_loss_fits_sim_d_to_sim_m():
    # the loss is smallest where Sim_D equals the (fixed) Sim_M target
    p = torch.stack([torch.tensor([1.0, 0.0]), torch.tensor([0.6, 0.8])])[..., None]  # Sim_M 0.6
    shifts = torch.linspace(0.05, 0.95, 19)
    losses = [float(consistency_loss(torch.stack([torch.zeros(3, 1), torch.full((3, 1), float(s))]), p))
              for s in shifts]
    best = float(1 - shifts[int(torch.tensor(losses).argmin())])  # Sim_D = 1 - shift
    assert math.isclose(best, 0.6, abs_tol=0.05)
