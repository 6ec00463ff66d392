"""What the client tests share: the switch fixture, the small CNN, the data."""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Tuple

import pytest
import torch
from torch import Tensor, nn

import tnbackpack

DTYPE = torch.float64
CLASSES = 3


@pytest.fixture(autouse=True)
def switched_off():
    """Every test starts and ends with BackPACK's own rules."""
    tnbackpack.disable()
    yield
    tnbackpack.disable()


def switch(on: bool) -> ContextManager:
    """``tnbackpack.enabled()`` or nothing."""
    return tnbackpack.enabled() if on else nullcontext()


def cnn(padding_mode: str, groups: int, size: int) -> nn.Sequential:
    """conv -> ReLU -> conv -> ReLU -> linear on ``1 x size x size`` inputs, seeded."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, padding_mode=padding_mode),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=groups),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * size * size, CLASSES),
    ).to(DTYPE)


def data(batch: int, size: int, seed: int = 1) -> Tuple[Tensor, Tensor]:
    """Inputs ``[batch, 1, size, size]`` and labels, seeded."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, size, size, generator=gen, dtype=DTYPE)
    return x, torch.randint(0, CLASSES, (batch,), generator=gen)
