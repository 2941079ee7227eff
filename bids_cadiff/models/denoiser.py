"""The collaborative diffusion U-Net φθ(D_td, M_tm, I, t_d, t_m) → (D̂0, M̂0) (paper Eq. 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bids_cadiff.models.blocks import (
    TACA,
    DualTimeResBlock,
    TimestepEmbedder,
    conv_nd,
    group_norm,
)
from bids_cadiff.models.config import ModelConfig


class CADiffDenoiser(nn.Module):
    """U-Net that denoises a label map, and in ``collaborative`` mode a distance field too.

    The input is the image concatenated with the (noisy) distance field (3 channels, omitted in
    ``diffusion`` mode) and the noisy label map (``num_classes`` channels). Every residual
    block embeds ``t_d`` and ``t_m`` with its own two linear layers; every skip connection goes
    through :class:`~bids_cadiff.models.blocks.TACA` (or plain concatenation when
    ``config.taca`` is off). Two heads: a 3-channel regression of D0 and class logits of M0.

    Any spatial size works (odd ones included): the decoder upsamples to the skip's exact size.

    Args:
        config: the architecture (:class:`~bids_cadiff.models.config.ModelConfig`).

    Example::

        net = CADiffDenoiser(ModelConfig(spatial_dims=3, num_classes=4, channels=(8, 16)))
        d0, logits = net(image, d_t, m_t, t_d, t_m)
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        dims, emb = config.spatial_dims, config.time_embed_dim
        in_channels = (
            config.image_channels + (3 if config.uses_distance_field else 0) + config.num_classes
        )
        widths = config.channels
        self.embed_d = TimestepEmbedder(emb)
        self.embed_m = TimestepEmbedder(emb)
        self.stem = conv_nd(dims, in_channels, widths[0], 3, padding=1)

        self.encoder = nn.ModuleList()
        self.downsample = nn.ModuleList()
        prev = widths[0]
        for level, width in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                blocks.append(DualTimeResBlock(dims, prev, width, emb))
                prev = width
            self.encoder.append(blocks)
            if level < len(widths) - 1:
                self.downsample.append(conv_nd(dims, width, width, 3, stride=2, padding=1))
        self.middle = DualTimeResBlock(dims, prev, prev, emb)

        self.upsample = nn.ModuleList()
        self.skip_fusion = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in range(len(widths) - 2, -1, -1):
            width = widths[level]
            self.upsample.append(conv_nd(dims, prev, width, 3, padding=1))
            self.skip_fusion.append(
                TACA(emb, config.taca_kernel_sizes, config.taca_num_kernels)
                if config.taca
                else nn.Identity()
            )
            blocks = nn.ModuleList()
            in_width = 2 * width
            for _ in range(config.num_res_blocks):
                blocks.append(DualTimeResBlock(dims, in_width, width, emb))
                in_width = width
            self.decoder.append(blocks)
            prev = width

        self.out_norm = group_norm(widths[0])
        self.label_head = conv_nd(dims, widths[0], config.num_classes, 1)
        self.distance_head = (
            conv_nd(dims, widths[0], 3, 1) if config.predicts_distance_field else None
        )

    def forward(
        self,
        image: torch.Tensor,
        distance_t: torch.Tensor | None,
        labels_t: torch.Tensor,
        t_d: torch.Tensor,
        t_m: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Predict the clean distance field and label map.

        Args:
            image: ``(B, image_channels, *S)``, intensities normalised to about [0, 1].
            distance_t: ``(B, 3, *S)`` noisy distance field in diffusion scale (``2 D - 1``
                plus noise), or ``None`` in ``diffusion`` mode.
            labels_t: ``(B, num_classes, *S)`` noisy one-hot label map in diffusion scale.
            t_d: ``(B,)`` distance-field timesteps in {0..T} (0: clean).
            t_m: ``(B,)`` label timesteps in {0..T}.

        Returns:
            ``(d0, logits)``: ``d0`` is ``(B, 3, *S)`` the predicted D0 in [0, 1] scale (``None``
            unless ``mode == "collaborative"``); ``logits`` is ``(B, num_classes, *S)``.
        """
        parts = [image]
        if self.config.uses_distance_field:
            if distance_t is None:
                raise ValueError(f"mode {self.config.mode!r} needs a distance field input")
            parts.append(distance_t)
        parts.append(labels_t)
        x = self.stem(torch.cat(parts, dim=1))
        emb_d, emb_m = self.embed_d(t_d), self.embed_m(t_m)

        skips = []
        for level, blocks in enumerate(self.encoder):
            for block in blocks:
                x = block(x, emb_d, emb_m)
            if level < len(self.downsample):
                skips.append(x)
                x = self.downsample[level](x)
        x = self.middle(x, emb_d, emb_m)

        for up, fusion, blocks in zip(self.upsample, self.skip_fusion, self.decoder):
            skip = skips.pop()
            mode = "bilinear" if self.config.spatial_dims == 2 else "trilinear"
            x = up(F.interpolate(x, size=skip.shape[2:], mode=mode, align_corners=False))
            x = fusion(skip, x, emb_d, emb_m) if self.config.taca else torch.cat([skip, x], 1)
            for block in blocks:
                x = block(x, emb_d, emb_m)

        x = F.silu(self.out_norm(x))
        d0 = self.distance_head(x) if self.distance_head is not None else None
        return d0, self.label_head(x)
