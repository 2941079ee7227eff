"""Small synthetic volumes with labels and a matching coordinate field, for model tests."""

from __future__ import annotations

import torch


def nested_shapes(
    batch: int, size: int = 24, *, spatial_dims: int = 3, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ball (label 1) holding a smaller cube (label 2), jittered, with noise.

    Returns:
        ``image (B, 1, *S)``, ``distance (B, 3, *S)`` (each voxel's coordinates relative to the
        ball's centre, rescaled to [0, 1]; channel 3 is 0.5 in 2D), ``labels (B, 1, *S)``.
    """
    shape = (size,) * spatial_dims
    grids = torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * spatial_dims, indexing="ij")
    images, fields, labels = [], [], []
    for _ in range(batch):
        centre = size / 2 + (torch.rand(spatial_dims, generator=generator) - 0.5) * size / 4
        radius = size * (0.34 + 0.06 * float(torch.rand(1, generator=generator)))
        rel = [g - c for g, c in zip(grids, centre)]
        ball = sum(r**2 for r in rel) <= radius**2
        cube = torch.stack([r.abs() for r in rel]).amax(0) <= radius * 0.5
        lab = torch.zeros(shape, dtype=torch.long)
        lab[ball] = 1
        lab[cube] = 2
        intensity = torch.tensor([0.1, 0.8, 0.45])[lab]
        image = intensity + 0.05 * torch.randn(shape, generator=generator)
        coords = [(0.5 + r / (2 * size)).clamp(0, 1) for r in rel]
        while len(coords) < 3:
            coords.append(torch.full(shape, 0.5))
        images.append(image[None])
        fields.append(torch.stack(coords))
        labels.append(lab[None])
    return torch.stack(images), torch.stack(fields), torch.stack(labels)


def dice(pred: torch.Tensor, ref: torch.Tensor, label: int) -> float:
    a, b = pred == label, ref == label
    return float(2 * (a & b).sum() / (a.sum() + b.sum()).clamp(min=1))
