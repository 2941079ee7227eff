"""The 1 mm refiner: a small 3D U-Net that corrects coarse class probabilities with the image.

CA-Diff reasons on a coarse grid (2 mm for the bundled model); its probabilities cannot place a
boundary more finely than that grid, and a perfect 2 mm model scores only 0.92-0.94 Dice
against 1 mm labels. The refiner sees the coarse probabilities upsampled to 1 mm together with
the 1 mm image and predicts a correction of their logits:

    logits = log(max(coarse, floor)) + f(image, coarse)

The last layer starts at zero, so an untrained refiner returns the coarse labels unchanged.
No normalisation layers: the network runs in sliding windows at inference and on patches in
training, and no statistic of a window enters its output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
from torch import nn

__all__ = ["RefinerConfig", "Refiner"]


@dataclass(frozen=True)
class RefinerConfig:
    """Architecture of :class:`Refiner`.

    Attributes:
        num_classes: C, background included.
        squeeze: width the coarse probabilities are projected to (1×1×1) before the U-Net.
        channels: widths of the three levels (1, 2 and 4 voxels).
        prob_floor: coarse probabilities are clipped below at this before the logarithm.
        voxel_size: the refiner's grid in mm (isotropic).
    """

    num_classes: int
    squeeze: int = 8
    channels: tuple[int, int, int] = (16, 32, 64)
    prob_floor: float = 1e-4
    voxel_size: float = 1.0

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if len(self.channels) != 3 or min(self.channels) < 1:
            raise ValueError(f"channels must be three positive widths, got {self.channels}")
        if not 0 < self.prob_floor < 1:
            raise ValueError(f"prob_floor must be in (0, 1), got {self.prob_floor}")
        if not self.voxel_size > 0:
            raise ValueError(f"voxel_size must be > 0, got {self.voxel_size}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RefinerConfig":
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        if "channels" in values:
            values["channels"] = tuple(int(c) for c in values["channels"])
        return cls(**values)


def _double_conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nn.LeakyReLU(0.1, inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1), nn.LeakyReLU(0.1, inplace=True),
    )


class Refiner(nn.Module):
    """Coarse probabilities + image at 1 mm → refined class logits at 1 mm.

    Input ``(B, 1 + C, X, Y, Z)``: channel 0 the normalised image
    (:func:`~bids_cadiff.inference.refiner.refiner_image`), channels 1… the coarse class
    probabilities on the same grid. ``X, Y, Z`` divisible by 4.

    Output ``(B, C, X, Y, Z)`` logits.
    """

    def __init__(self, config: RefinerConfig) -> None:
        super().__init__()
        self.config = config
        c0, c1, c2 = config.channels
        self.squeeze = nn.Conv3d(config.num_classes, config.squeeze, 1)
        self.enc0 = _double_conv(1 + config.squeeze, c0)
        self.enc1 = _double_conv(c0, c1, stride=2)
        self.enc2 = _double_conv(c1, c2, stride=2)
        self.up1 = nn.ConvTranspose3d(c2, c1, 2, stride=2)
        self.dec1 = _double_conv(2 * c1, c1)
        self.up0 = nn.ConvTranspose3d(c1, c0, 2, stride=2)
        self.dec0 = _double_conv(2 * c0, c0)
        self.head = nn.Conv3d(c0, config.num_classes, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 1 + self.config.num_classes:
            raise ValueError(
                f"the refiner expects 1 + {self.config.num_classes} channels, got {x.shape[1]}"
            )
        if any(s % 4 for s in x.shape[2:]):
            raise ValueError(f"spatial sizes must be divisible by 4, got {tuple(x.shape[2:])}")
        image, coarse = x[:, :1], x[:, 1:]
        h0 = self.enc0(torch.cat([image, self.squeeze(coarse)], dim=1))
        h1 = self.enc1(h0)
        h2 = self.enc2(h1)
        d1 = self.dec1(torch.cat([self.up1(h2), h1], dim=1))
        d0 = self.dec0(torch.cat([self.up0(d1), h0], dim=1))
        return torch.log(coarse.clamp_min(self.config.prob_floor)) + self.head(d0)
