"""Building blocks of the CA-Diff denoiser: time embeddings, residual blocks, TACA.

Shapes use ``B`` for batch, ``C`` for channels and ``*S`` for the 2 or 3 spatial sizes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def conv_nd(spatial_dims: int, *args: object, **kwargs: object) -> nn.Module:
    """``nn.Conv2d`` or ``nn.Conv3d`` by ``spatial_dims``."""
    return (nn.Conv2d, nn.Conv3d)[spatial_dims - 2](*args, **kwargs)  # type: ignore[arg-type]


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 8 groups where the width allows, else fewer."""
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of diffusion timesteps.

    Args:
        t: ``(B,)`` integer or float timesteps.
        dim: embedding width.

    Returns:
        ``(B, dim)`` float32.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal features followed by a two-layer MLP.

    Args:
        dim: output width E.

    Shapes: ``t (B,)`` → ``(B, E)``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t, self.dim))


class DualTimeResBlock(nn.Module):
    """Residual block with separate embeddings of the two timesteps (paper II.C, Fig. 2).

    Two linear layers embed ``t_d`` and ``t_m`` separately; the two embeddings are concatenated
    along channels (``C_out // 2`` + the rest) and added to the feature map between the two
    convolutions.

    Args:
        spatial_dims: 2 or 3.
        in_channels: C_in.
        out_channels: C_out.
        time_embed_dim: E, width of ``emb_d`` and ``emb_m``.

    Shapes: ``x (B, C_in, *S)``, ``emb_d (B, E)``, ``emb_m (B, E)`` → ``(B, C_out, *S)``.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, time_embed_dim: int
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.norm1 = group_norm(in_channels)
        self.conv1 = conv_nd(spatial_dims, in_channels, out_channels, 3, padding=1)
        d_width = out_channels // 2
        self.time_d = nn.Linear(time_embed_dim, d_width)
        self.time_m = nn.Linear(time_embed_dim, out_channels - d_width)
        self.norm2 = group_norm(out_channels)
        self.conv2 = conv_nd(spatial_dims, out_channels, out_channels, 3, padding=1)
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else conv_nd(spatial_dims, in_channels, out_channels, 1)
        )

    def forward(
        self, x: torch.Tensor, emb_d: torch.Tensor, emb_m: torch.Tensor
    ) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        t = torch.cat([self.time_d(F.silu(emb_d)), self.time_m(F.silu(emb_m))], dim=1)
        h = h + t.reshape(*t.shape, *([1] * self.spatial_dims))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class DynamicConv1d(nn.Module):
    """A 1D convolution whose kernel is a timestep-dependent mixture of K kernels (Eq. 11).

    ``pi = Softmax(Linear(t_emb))``, ``W = sum_k pi_k W_k``, ``b = sum_k pi_k b_k``; the
    convolution runs along the channel axis of a pooled feature (as in ECA-Net), one input and
    one output channel, so the result has the input's length.

    Args:
        kernel_size: odd kernel length.
        num_kernels: K.
        embed_dim: width of ``t_emb``.

    Shapes: ``x (B, 1, L)``, ``t_emb (B, embed_dim)`` → ``(B, 1, L)``.
    """

    def __init__(self, kernel_size: int, num_kernels: int, embed_dim: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(num_kernels, kernel_size))
        self.bias = nn.Parameter(torch.zeros(num_kernels))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.attention = nn.Linear(embed_dim, num_kernels)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        pi = torch.softmax(self.attention(t_emb), dim=1)  # (B, K)
        weight = (pi @ self.weight).reshape(batch, 1, self.kernel_size)  # (B, 1, k)
        bias = pi @ self.bias  # (B,)
        out = F.conv1d(
            x.reshape(1, batch, -1), weight, bias, padding=self.kernel_size // 2, groups=batch
        )
        return out.reshape(batch, 1, -1)


class TACA(nn.Module):
    """Time Adapted Channel Attention in a skip connection (paper II.E, Eqs. 9-12).

    ``f_cat = Cat(f_E, f_D)``; ``f_pool = GAP(f_cat)``; ``t_emb = Linear(Cat(emb_d, emb_m))``;
    one :class:`DynamicConv1d` per kernel size over ``f_pool``; their outputs concatenated and
    fused by a convolution; ``mask = Sigmoid(fused)``; ``f_out = f_cat + f_cat * mask``.

    Args:
        time_embed_dim: E, width of ``emb_d`` and ``emb_m``.
        kernel_sizes: one dynamic convolution group per size (paper: 7, 11, 15).
        num_kernels: K kernels per dynamic convolution.

    Shapes: ``f_enc (B, C1, *S)``, ``f_dec (B, C2, *S)``, ``emb_d, emb_m (B, E)`` →
    ``(B, C1 + C2, *S)``.
    """

    def __init__(
        self,
        time_embed_dim: int,
        kernel_sizes: tuple[int, ...] = (7, 11, 15),
        num_kernels: int = 4,
    ) -> None:
        super().__init__()
        self.time_proj = nn.Linear(2 * time_embed_dim, time_embed_dim)
        self.convs = nn.ModuleList(
            DynamicConv1d(k, num_kernels, time_embed_dim) for k in kernel_sizes
        )
        self.fuse = nn.Conv1d(len(kernel_sizes), 1, kernel_size=1)

    def forward(
        self,
        f_enc: torch.Tensor,
        f_dec: torch.Tensor,
        emb_d: torch.Tensor,
        emb_m: torch.Tensor,
    ) -> torch.Tensor:
        f_cat = torch.cat([f_enc, f_dec], dim=1)
        batch, channels = f_cat.shape[:2]
        f_pool = f_cat.mean(dim=tuple(range(2, f_cat.ndim))).reshape(batch, 1, channels)
        t_emb = self.time_proj(torch.cat([emb_d, emb_m], dim=1))
        multi = torch.cat([conv(f_pool, t_emb) for conv in self.convs], dim=1)  # (B, S, C)
        mask = torch.sigmoid(self.fuse(multi)).reshape(batch, channels)
        mask = mask.reshape(batch, channels, *([1] * (f_cat.ndim - 2)))
        return f_cat + f_cat * mask
