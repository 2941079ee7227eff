"""The 1 mm refiner network: shapes, identity at initialisation, input checks."""

from __future__ import annotations

import pytest
import torch

from bids_cadiff.models.refiner import Refiner, RefinerConfig


def _coarse(classes: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn((1, classes, *shape), generator=g), dim=1)


def test_an_untrained_refiner_returns_the_coarse_log_probabilities() -> None:
    torch.manual_seed(0)
    model = Refiner(RefinerConfig(num_classes=4, channels=(4, 8, 8), squeeze=2))
    coarse = _coarse(4, (8, 12, 16))
    x = torch.cat([torch.rand(1, 1, 8, 12, 16), coarse], dim=1)
    logits = model(x)
    assert logits.shape == (1, 4, 8, 12, 16)
    floored = torch.softmax(torch.log(coarse.clamp_min(model.config.prob_floor)), dim=1)
    assert torch.allclose(torch.softmax(logits, dim=1), floored, atol=1e-6)
    assert torch.equal(logits.argmax(dim=1), coarse.argmax(dim=1))


def test_the_correction_depends_on_the_image() -> None:
    torch.manual_seed(0)
    model = Refiner(RefinerConfig(num_classes=3, channels=(4, 8, 8), squeeze=2))
    torch.nn.init.normal_(model.head.weight, std=0.5)
    coarse = _coarse(3, (8, 8, 8))
    a = model(torch.cat([torch.zeros(1, 1, 8, 8, 8), coarse], dim=1))
    b = model(torch.cat([torch.ones(1, 1, 8, 8, 8), coarse], dim=1))
    assert not torch.allclose(a, b)


def test_wrong_channels_or_sizes_are_errors() -> None:
    model = Refiner(RefinerConfig(num_classes=3, channels=(4, 8, 8)))
    with pytest.raises(ValueError, match="1 \\+ 3 channels"):
        model(torch.zeros(1, 3, 8, 8, 8))
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.zeros(1, 4, 8, 8, 6))


def test_config_round_trips_through_a_dict() -> None:
    config = RefinerConfig(num_classes=5, channels=(8, 16, 24), squeeze=4)
    assert RefinerConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="channels"):
        RefinerConfig(num_classes=5, channels=(8, 16))  # type: ignore[arg-type]
