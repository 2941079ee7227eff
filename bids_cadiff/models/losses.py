"""Losses of CA-Diff: L_diff (Eq. 4) and the spatial-anatomical consistency loss L_sac (Eqs. 5-7)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

#: Sim_D is clamped into [EPS, 1 - EPS] before the logarithms of the BCE.
EPS = 1e-6


def distance_similarity(d_i: torch.Tensor, d_j: torch.Tensor) -> torch.Tensor:
    """Sim_D of Eq. 5: one minus the mean per-voxel RMS shift of two distance fields.

    Args:
        d_i, d_j: ``(3, *S)`` predicted distance fields in [0, 1] scale.

    Returns:
        scalar tensor, 1 for identical fields.
    """
    shift = torch.sqrt(((d_i - d_j) ** 2).sum(dim=0) / 3.0 + 1e-12)
    return 1.0 - shift.mean()


def cosine_label_similarity(p_i: torch.Tensor, p_j: torch.Tensor) -> torch.Tensor:
    """Sim_M of Eq. 6: mean over voxels of the cosine similarity of the logit vectors.

    Args:
        p_i, p_j: ``(C, *S)`` predicted logits.

    Returns:
        scalar tensor in [-1, 1].
    """
    return F.cosine_similarity(p_i, p_j, dim=0, eps=1e-8).mean()


def dice_label_similarity(p_i: torch.Tensor, p_j: torch.Tensor) -> torch.Tensor:
    """Soft Dice of the two softmax maps, the alternative Sim_M of the paper's Table IV.

    Args:
        p_i, p_j: ``(C, *S)`` predicted logits.

    Returns:
        scalar tensor in [0, 1].
    """
    a, b = torch.softmax(p_i, dim=0), torch.softmax(p_j, dim=0)
    return 2.0 * (a * b).sum() / ((a * a).sum() + (b * b).sum() + 1e-8)


def consistency_loss(
    d0_hat: torch.Tensor, logits: torch.Tensor, similarity: str = "cosine"
) -> torch.Tensor:
    """L_sac of Eq. 7, averaged over every pair (i, j), i < j, of the batch.

    ``L_sac(i, j) = -Sim_M log Sim_D - (1 - Sim_M) log(1 - Sim_D)``. Sim_M is the BCE target; it
    is clamped to [0, 1] (a cosine of logits may be negative). Sim_D is clamped into
    [EPS, 1 - EPS], so the loss stays finite when the fields are identical (Sim_D = 1) or
    maximally apart (Sim_D <= 0).

    Args:
        d0_hat: ``(B, 3, *S)`` predicted distance fields, [0, 1] scale.
        logits: ``(B, C, *S)`` predicted label logits.
        similarity: ``"cosine"`` (paper) or ``"dice"``.

    Returns:
        scalar tensor; 0 when the batch has a single sample.
    """
    sim_m_fn = cosine_label_similarity if similarity == "cosine" else dice_label_similarity
    losses = []
    for i, j in itertools.combinations(range(d0_hat.shape[0]), 2):
        sim_d = distance_similarity(d0_hat[i], d0_hat[j]).clamp(EPS, 1.0 - EPS)
        sim_m = sim_m_fn(logits[i], logits[j]).clamp(0.0, 1.0)
        losses.append(-sim_m * torch.log(sim_d) - (1.0 - sim_m) * torch.log(1.0 - sim_d))
    if not losses:
        return d0_hat.sum() * 0.0
    return torch.stack(losses).mean()


class DiffusionLoss(nn.Module):
    """L_diff of Eq. 4: MSE(D̂0, D0) + Dice(M̂0, M0) + CE(M̂0, M0), MONAI's Dice and CE.

    Shapes: ``d0_hat, d0 (B, 3, *S)`` or ``None``; ``logits (B, C, *S)``;
    ``labels (B, 1, *S)`` class indices → dict of scalar tensors
    ``{"mse", "dice_ce"}``.

    Args:
        batch_dice: Dice over the whole batch (nnU-Net's batch Dice): a structure with a few
            voxels in one patch is scored together with the other patches, a steadier signal
            for small structures; ``False`` is MONAI's per-sample default.
    """

    def __init__(self, batch_dice: bool = False) -> None:
        super().__init__()
        if batch_dice:
            self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
        else:
            self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)

    def forward(
        self,
        d0_hat: torch.Tensor | None,
        d0: torch.Tensor | None,
        logits: torch.Tensor,
        labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        out = {"dice_ce": self.dice_ce(logits, labels)}
        if d0_hat is not None and d0 is not None:
            out["mse"] = F.mse_loss(d0_hat, d0)
        return out
