"""Configuration of the CA-Diff network and diffusion process (stdlib only).

Both dataclasses round-trip through plain dicts (``to_dict`` / ``from_dict``) so that a
checkpoint can carry them and rebuild the model without executing code.

The ablations of the paper's Tables II to V are values of these fields, not code copies:

========================  =====================================================
``mode="diffusion"``      image only: the denoiser sees the image and the noisy label map
``mode="dual"``           the distance field is a clean extra condition (t_d = 0), not predicted
``mode="collaborative"``  CA-Diff: distance field and labels noised and denoised together
``consistency_loss``      the spatial-anatomical consistency loss L_sac on or off
``similarity``            ``"cosine"`` (paper) or ``"dice"`` for Sim_M in L_sac
``taca``                  TACA in every skip connection, or plain concatenation
========================  =====================================================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Mapping

Mode = Literal["diffusion", "dual", "collaborative"]
MODES: tuple[str, ...] = ("diffusion", "dual", "collaborative")


def _from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs)


@dataclass(frozen=True)
class ModelConfig:
    """The denoiser's architecture.

    Args:
        spatial_dims: 2 or 3.
        num_classes: label-map channels, background included.
        image_channels: image channels (1 for a T1w).
        channels: feature widths per U-Net level, highest resolution first.
        num_res_blocks: residual blocks per level (encoder and decoder).
        time_embed_dim: width of each timestep embedding (t_d and t_m each get one).
        taca: TACA in the skip connections (``False``: plain concatenation).
        taca_kernel_sizes: one dynamic 1D convolution group per kernel size.
        taca_num_kernels: K, the kernels each dynamic convolution mixes.
        mode: ``"diffusion"``, ``"dual"`` or ``"collaborative"`` (see module docstring).
        label_prior_bins: 0 (paper): none. ``B > 0``: the model carries a distance-field label
            prior on a ``B³`` grid (:mod:`bids_cadiff.models.prior`) and adds its
            log-probabilities to the logits; needs a distance field (not ``diffusion``).
    """

    spatial_dims: int = 3
    num_classes: int = 33
    image_channels: int = 1
    channels: tuple[int, ...] = (16, 32, 64, 128)
    num_res_blocks: int = 1
    time_embed_dim: int = 64
    taca: bool = True
    taca_kernel_sizes: tuple[int, ...] = (7, 11, 15)
    taca_num_kernels: int = 4
    mode: str = "collaborative"
    label_prior_bins: int = 0

    def __post_init__(self) -> None:
        if self.label_prior_bins < 0 or self.label_prior_bins == 1:
            raise ValueError(f"label_prior_bins must be 0 or >= 2, got {self.label_prior_bins}")
        if self.label_prior_bins and self.mode == "diffusion":
            raise ValueError("a label prior needs the distance field: not in mode 'diffusion'")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if len(self.channels) < 2 or any(c < 2 for c in self.channels):
            raise ValueError(f"channels needs >= 2 levels of width >= 2, got {self.channels}")
        if any(k % 2 == 0 for k in self.taca_kernel_sizes):
            raise ValueError(f"TACA kernel sizes must be odd, got {self.taca_kernel_sizes}")

    @property
    def uses_distance_field(self) -> bool:
        """Whether the distance field is an input (``dual`` and ``collaborative``)."""
        return self.mode != "diffusion"

    @property
    def predicts_distance_field(self) -> bool:
        """Whether the network regresses D0 (``collaborative`` only)."""
        return self.mode == "collaborative"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        return _from_dict(cls, data)


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward noising, the losses and the sampler.

    Args:
        timesteps: T; training timesteps are drawn from {0, ..., T} (uniformly unless the
            fractions below say otherwise).
        schedule: ``"linear"`` (DDPM betas 1e-4 to 0.02) or ``"cosine"``.
        sampling_steps: S, DDIM steps at inference (paper: 5).
        consistency_loss: add L_sac (paper Eqs. 5-7); it fits the predicted distance field,
            so it acts in ``collaborative`` mode only (the other modes predict none).
        similarity: Sim_M of L_sac, ``"cosine"`` or ``"dice"``.
        sac_weight: weight of L_sac in L = L_diff + w * L_sac (paper: 1).
        t_m_max_fraction: training only; the fraction of samples whose label timestep t_m is
            T (pure noise, the sampler's first step) instead of uniform (paper: 0, all uniform).
            The prediction from pure noise carries the whole segmentation, so a short training
            run learns faster when it sees that case more often.
        t_d_zero_fraction: training only, ``collaborative`` mode; the fraction of samples whose
            distance field timestep t_d is 0 (the clean field inference uses) instead of
            uniform (paper: 0).
        batch_dice: Dice of L_diff computed over the whole batch (nnU-Net's batch Dice)
            instead of MONAI's default per sample (paper: not specified; default False).
    """

    timesteps: int = 1000
    schedule: str = "linear"
    sampling_steps: int = 5
    consistency_loss: bool = True
    similarity: str = "cosine"
    sac_weight: float = 1.0
    t_m_max_fraction: float = 0.0
    t_d_zero_fraction: float = 0.0
    batch_dice: bool = False

    def __post_init__(self) -> None:
        for name in ("t_m_max_fraction", "t_d_zero_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {self.timesteps}")
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule must be 'linear' or 'cosine', got {self.schedule!r}")
        if self.similarity not in ("cosine", "dice"):
            raise ValueError(f"similarity must be 'cosine' or 'dice', got {self.similarity!r}")
        if self.sampling_steps < 1:
            raise ValueError(f"sampling_steps must be >= 1, got {self.sampling_steps}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DiffusionConfig":
        return _from_dict(cls, data)
