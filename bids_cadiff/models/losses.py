"""Losses of CA-Diff: L_diff (Eq. 4) and the spatial-anatomical consistency loss L_sac (Eqs. 5-7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

#: Sim_D is clamped into [EPS, 1 - EPS] before the logarithms of the BCE.
EPS = 1e-6


def pair_similarities(
    d0_hat: torch.Tensor, logits: torch.Tensor, similarity: str = "cosine"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sim_D (Eq. 5) and Sim_M (Eq. 6, or the Dice variant) of every pair (i, j), i < j, of
    the batch.

    Sim_M is the target of L_sac, so it is computed without gradient, from the batch's Gram
    matrix (memory ``O(B² + B C N)``, not per pair). Sim_D keeps its gradient.

    Args:
        d0_hat: ``(B, 3, *S)`` predicted distance fields, [0, 1] scale.
        logits: ``(B, C, *S)`` the network's own label logits (without any prior offset: a
            shared offset makes unrelated patches look alike).
        similarity: ``"cosine"`` (paper) or ``"dice"``.

    Returns:
        ``(sim_d, sim_m)``, each ``(P,)`` with ``P = B (B - 1) / 2`` in the order of
        ``torch.triu_indices(B, B, 1)``; empty for a single sample. ``sim_m`` is detached.
    """
    if similarity not in ("cosine", "dice"):
        raise ValueError(f"similarity must be 'cosine' or 'dice', got {similarity!r}")
    batch = d0_hat.shape[0]
    i, j = torch.triu_indices(batch, batch, 1, device=d0_hat.device)
    d = d0_hat.flatten(2)  # (B, 3, N)
    shift = torch.sqrt(((d[i] - d[j]) ** 2).sum(dim=1) / 3.0 + 1e-12)  # (P, N)
    sim_d = 1.0 - shift.mean(dim=1)
    with torch.no_grad():
        p = logits.detach().flatten(2).float()  # (B, C, N)
        if similarity == "cosine":
            unit = p / p.norm(dim=1, keepdim=True).clamp_min(1e-8)
            gram = torch.einsum("bcn,dcn->bd", unit, unit) / unit.shape[-1]  # mean cosine
            sim_m = gram[i, j]
        else:
            soft = torch.softmax(p, dim=1)
            sq = (soft * soft).sum(dim=(1, 2))
            cross = torch.einsum("bcn,dcn->bd", soft, soft)
            sim_m = 2.0 * cross[i, j] / (sq[i] + sq[j] + 1e-8)
    return sim_d, sim_m


def sac_from_similarities(sim_d: torch.Tensor, sim_m: torch.Tensor) -> torch.Tensor:
    """L_sac of Eq. 7 from :func:`pair_similarities`, averaged over the pairs.

    ``L_sac(i, j) = -Sim_M log Sim_D - (1 - Sim_M) log(1 - Sim_D)``: Sim_D is fitted to Sim_M,
    the BCE target (no gradient; clamped to [0, 1], a cosine of logits may be negative). Sim_D
    is clamped into [EPS, 1 - EPS], so the loss stays finite when the fields are identical
    (Sim_D = 1) or maximally apart (Sim_D <= 0).

    Returns:
        scalar tensor; 0 (with the graph of ``sim_d``) when there is no pair.
    """
    if sim_d.numel() == 0:
        return sim_d.sum() * 0.0
    sim_d = sim_d.clamp(EPS, 1.0 - EPS)
    target = sim_m.detach().clamp(0.0, 1.0)
    return (-target * torch.log(sim_d) - (1.0 - target) * torch.log(1.0 - sim_d)).mean()


def consistency_loss(
    d0_hat: torch.Tensor, logits: torch.Tensor, similarity: str = "cosine"
) -> torch.Tensor:
    """L_sac of Eq. 7, averaged over every pair (i, j), i < j, of the batch
    (:func:`pair_similarities` then :func:`sac_from_similarities`).

    Args:
        d0_hat: ``(B, 3, *S)`` predicted distance fields, [0, 1] scale.
        logits: ``(B, C, *S)`` the network's own label logits (no prior offset).
        similarity: ``"cosine"`` (paper) or ``"dice"``.

    Returns:
        scalar tensor; 0 when the batch has a single sample.
    """
    return sac_from_similarities(*pair_similarities(d0_hat, logits, similarity))


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
