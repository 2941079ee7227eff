"""Collaborative diffusion: forward noising, training losses and the few-step DDIM sampler.

Scaling for diffusion (paper II.A, II.C):

* the label map ``M0`` (class indices) becomes one-hot and is rescaled to ``2 * onehot - 1``,
  i.e. values in {-1, 1}; the distance field ``D0`` (3 channels in [0, 1], see
  :mod:`bids_cadiff.imaging.distance_field`) is rescaled to ``2 * D0 - 1``, in [-1, 1];
* forward process (Eq. 1): ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` with ``a_t`` the
  cumulative product of ``1 - beta`` and ``a_0 = 1`` (t = 0 is the clean input), t in {0..T};
* the network predicts the clean signals: ``D̂0`` directly in [0, 1] scale (a regression,
  Eq. 4's MSE is computed there) and logits of ``M̂0``; ``2 * softmax(logits) - 1`` is the
  label estimate in diffusion scale that the sampler uses.

Training draws ``t_d`` and ``t_m`` uniformly and independently from {0..T} in
``collaborative`` mode (the paper; ``DiffusionConfig.t_m_max_fraction`` and
``t_d_zero_fraction`` put extra weight on t_m = T and t_d = 0, the cases inference meets); ``dual`` mode keeps ``t_d = 0`` with the clean field as condition;
``diffusion`` mode has no field at all. Sampling (II.C, "Inference") sets ``t_d = 0`` and
refines the label map from Gaussian noise in S deterministic DDIM steps (eta = 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bids_cadiff.models.config import DiffusionConfig, ModelConfig
from bids_cadiff.models.denoiser import CADiffDenoiser
from bids_cadiff.models.losses import DiffusionLoss, pair_similarities, sac_from_similarities
from bids_cadiff.models.prior import prior_log_probs


def alpha_bar_schedule(schedule: str, timesteps: int) -> torch.Tensor:
    """Cumulative signal fractions ``a_t`` for t in {0..T}; ``a_0 = 1``.

    Returns:
        ``(T + 1,)`` float64, decreasing from 1.
    """
    if schedule == "linear":
        betas = torch.linspace(1e-4, 0.02, timesteps, dtype=torch.float64)
        betas = betas * (1000.0 / timesteps) if timesteps < 1000 else betas
        alphas = torch.cumprod(1.0 - betas.clamp(max=0.999), dim=0)
    elif schedule == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1.0 - f[1:] / f[:-1]).clamp(max=0.999)
        alphas = torch.cumprod(1.0 - betas, dim=0)
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return torch.cat([torch.ones(1, dtype=torch.float64), alphas])


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """The S + 1 timesteps a sampler visits, from T down to 0, e.g. T=1000, S=5 →
    ``[1000, 800, 600, 400, 200, 0]``."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be in 1..{timesteps}, got {steps}")
    return [round(timesteps * (1 - i / steps)) for i in range(steps + 1)]


class CADiff(nn.Module):
    """The denoiser together with its diffusion process.

    Args:
        model_config: architecture, incl. the ablation ``mode`` and ``taca`` switches.
        diffusion_config: schedule, sampler steps and consistency-loss switches.
    """

    def __init__(self, model_config: ModelConfig, diffusion_config: DiffusionConfig) -> None:
        super().__init__()
        self.model_config = model_config
        self.diffusion_config = diffusion_config
        self.denoiser = CADiffDenoiser(model_config)
        self.loss_fn = DiffusionLoss(batch_dice=diffusion_config.batch_dice)
        ab = alpha_bar_schedule(diffusion_config.schedule, diffusion_config.timesteps)
        self.register_buffer("alpha_bar", ab.float(), persistent=False)
        bins = model_config.label_prior_bins
        if bins:
            # log P(label | D0) (models/prior.py); saved with the weights, set before training
            self.register_buffer(
                "label_prior", torch.zeros(model_config.num_classes, bins, bins, bins)
            )

    def set_label_prior(self, probs: torch.Tensor) -> None:
        """Store a prior from :func:`~bids_cadiff.models.prior.build_label_prior`:
        ``(C, B, B, B)`` probabilities (their logarithm is kept)."""
        if not self.model_config.label_prior_bins:
            raise ValueError("this model has no label prior (ModelConfig.label_prior_bins = 0)")
        if tuple(probs.shape) != tuple(self.label_prior.shape):
            raise ValueError(f"prior shape {tuple(probs.shape)} != {tuple(self.label_prior.shape)}")
        self.label_prior.copy_(torch.log(probs.to(self.label_prior)))

    def _prior_offset(self, clean_distance: torch.Tensor | None) -> torch.Tensor | None:
        """``log P(label | D0)`` of the clean field, ``(B, C, *S)``; None without a prior."""
        if not self.model_config.label_prior_bins or clean_distance is None:
            return None
        return prior_log_probs(self.label_prior, clean_distance)

    def _logits(
        self,
        image: torch.Tensor,
        d_in: torch.Tensor | None,
        m_t: torch.Tensor,
        t_d: torch.Tensor,
        t_m: torch.Tensor,
        offset: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """The denoiser: ``(d0_hat, logits, own)``, ``own`` the network's logits and
        ``logits`` those plus the prior's ``offset`` (:meth:`_prior_offset`) when there is
        one."""
        d0_hat, own = self.denoiser(image, d_in, m_t, t_d, t_m)
        logits = own + offset.to(own.dtype) if offset is not None else own
        return d0_hat, logits, own

    @property
    def num_classes(self) -> int:
        return self.model_config.num_classes

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward noising (Eq. 1).

        Args:
            x0: ``(B, C, *S)`` clean signal in diffusion scale.
            t: ``(B,)`` timesteps in {0..T}.
            noise: like ``x0``, standard normal.
        """
        ab = self.alpha_bar[t].reshape(-1, *([1] * (x0.ndim - 1)))
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise

    def _distance_input(
        self, distance: torch.Tensor | None, t_d: torch.Tensor, noise: torch.Tensor | None
    ) -> torch.Tensor | None:
        if not self.model_config.uses_distance_field:
            return None
        if distance is None:
            raise ValueError(f"mode {self.model_config.mode!r} needs a distance field")
        scaled = 2.0 * distance - 1.0
        if noise is None:
            return scaled
        return self.q_sample(scaled, t_d, noise)

    def _draw_timesteps(
        self,
        batch: int,
        special: int,
        fraction: float,
        device: torch.device,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """``(batch,)`` timesteps uniform in {0..T}; each is ``special`` with prob. ``fraction``.

        With ``fraction == 0`` exactly one draw is made (the paper's uniform sampling, and the
        random stream of earlier recipes is unchanged).
        """
        T = self.diffusion_config.timesteps
        t = torch.randint(0, T + 1, (batch,), device=device, generator=generator)
        if fraction > 0:
            pick = torch.rand((batch,), device=device, generator=generator) < fraction
            t = torch.where(pick, torch.full_like(t, special), t)
        return t

    def training_losses(
        self,
        image: torch.Tensor,
        distance: torch.Tensor | None,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """One training objective evaluation, L = L_diff + w · L_sac (Eq. 8).

        Args:
            image: ``(B, 1, *S)`` normalised image.
            distance: ``(B, 3, *S)`` clean distance field in [0, 1] (``None`` allowed only in
                ``diffusion`` mode).
            labels: ``(B, 1, *S)`` integer class indices in [0, num_classes).
            generator: optional RNG for timesteps and noise (on the tensors' device).

        Returns:
            dict of scalar tensors: ``loss`` (to backpropagate), ``dice_ce``, ``mse`` (when D0
            is predicted) and, when the consistency loss is on and D0 is predicted
            (``collaborative`` mode: L_sac fits the predicted field, Eq. 5; in the other modes
            there is nothing for it to train), ``sac`` and, for a batch of two or more, the
            mean pair similarities ``sim_d`` and ``sim_m`` (logged, not trained).
        """
        batch, device = image.shape[0], image.device
        T = self.diffusion_config.timesteps
        t_m = self._draw_timesteps(batch, T, self.diffusion_config.t_m_max_fraction, device, generator)
        m0 = 2.0 * F.one_hot(labels[:, 0].long(), self.num_classes).movedim(-1, 1).float() - 1.0
        m_noise = torch.randn(m0.shape, device=device, generator=generator)
        m_t = self.q_sample(m0, t_m, m_noise)
        if self.model_config.mode == "collaborative":
            t_d = self._draw_timesteps(
                batch, 0, self.diffusion_config.t_d_zero_fraction, device, generator
            )
            assert distance is not None  # checked by _distance_input
            d_noise = torch.randn(distance.shape, device=device, generator=generator)
        else:
            t_d = torch.zeros(batch, dtype=torch.long, device=device)
            d_noise = None
        d_t = self._distance_input(distance, t_d, d_noise)
        d0_hat, logits, own = self._logits(
            image, d_t, m_t, t_d, t_m, self._prior_offset(distance)
        )
        losses = self.loss_fn(d0_hat, distance, logits, labels)
        total = sum(losses.values())
        if self.diffusion_config.consistency_loss and d0_hat is not None:
            # L_sac fits the *predicted* field's Sim_D to Sim_M (Eqs. 5-7): only the
            # collaborative mode predicts D0; Sim_M from the network's own logits, since the
            # prior's offset is shared by every patch
            sim_d, sim_m = pair_similarities(d0_hat, own, self.diffusion_config.similarity)
            losses["sac"] = sac_from_similarities(sim_d, sim_m)
            total = total + self.diffusion_config.sac_weight * losses["sac"]
            if batch > 1:
                losses["sim_d"], losses["sim_m"] = sim_d.detach().mean(), sim_m.mean()
        losses["loss"] = total
        return losses

    @torch.no_grad()
    def sample(
        self,
        image: torch.Tensor,
        distance: torch.Tensor | None,
        *,
        steps: int | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Generate the label map in S DDIM steps with ``t_d = 0`` (clean field as condition).

        Args:
            image: ``(B, 1, *S)`` normalised image.
            distance: ``(B, 3, *S)`` distance field in [0, 1], ``None`` in ``diffusion`` mode.
            steps: S (default: ``diffusion_config.sampling_steps``); the denoiser runs S times.
            noise: ``(B, num_classes, *S)`` starting noise M_T; drawn from ``generator`` if
                not given. Same noise (or same seeded generator) → same result.
            generator: RNG for the starting noise.

        Returns:
            ``(B, num_classes, *S)`` class probabilities (softmax of the last prediction).
        """
        steps = steps or self.diffusion_config.sampling_steps
        shape = (image.shape[0], self.num_classes, *image.shape[2:])
        if noise is None:
            noise = torch.randn(shape, generator=generator, device="cpu").to(image.device)
        x = noise.to(image.dtype)
        t_d = torch.zeros(image.shape[0], dtype=torch.long, device=image.device)
        d_in = self._distance_input(distance, t_d, None)
        offset = self._prior_offset(distance)  # the same at every step
        schedule = ddim_timesteps(self.diffusion_config.timesteps, steps)
        probs = x
        for t, t_next in zip(schedule[:-1], schedule[1:]):
            t_m = torch.full_like(t_d, t)
            _, logits, _ = self._logits(image, d_in, x, t_d, t_m, offset)
            probs = torch.softmax(logits.float(), dim=1)
            x0 = 2.0 * probs - 1.0
            ab, ab_next = self.alpha_bar[t], self.alpha_bar[t_next]
            eps = (x.float() - ab.sqrt() * x0) / (1.0 - ab).sqrt()
            x = (ab_next.sqrt() * x0 + (1.0 - ab_next).sqrt() * eps).to(image.dtype)
        return probs
