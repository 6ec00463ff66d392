"""Which slices of a convolution's input a sampled backward pass keeps.

Three summed legs of the weight gradient can be sampled (see
``docs/randomized.md``): the input positions (``"spatial"``, independently
per spatial axis), the input channels within a group (``"channels"``, the
same channels in every group), or the samples of the batch (``"batch"``).
Every slice is kept independently with its probability; the estimate is the
sum over kept slices divided by the probability that a slice is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..tn.sliced import read_positions
from ..tn.spec import ConvSpec

SAMPLE_MODES = ("spatial", "channels", "batch")


def check_keep(keep: float) -> float:
    """``keep`` as a float in ``(0, 1]``.

    Raises:
        ValueError: If ``keep`` is not a number in ``(0, 1]``.
    """
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"keep must be a number in (0, 1], got {keep!r}")
    keep = float(keep)
    if not 0.0 < keep <= 1.0:  # also rejects nan
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    return keep


def check_sample(sample: str) -> str:
    """The sampling mode, checked.

    Raises:
        ValueError: If ``sample`` is not one of :data:`SAMPLE_MODES`.
    """
    if sample not in SAMPLE_MODES:
        raise ValueError(f"sample must be one of {SAMPLE_MODES}, got {sample!r}")
    return sample


def check_generator(generator: Optional[torch.Generator]) -> None:
    """Raise ``ValueError`` unless ``generator`` is ``None`` or a generator."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(
            "generator must be a torch.Generator or None, "
            f"got {type(generator).__name__}"
        )


@dataclass(frozen=True)
class Sample:
    """The kept slices of one forward pass.

    Attributes:
        mode: One of :data:`SAMPLE_MODES`.
        kept: The kept indices: per spatial axis the real input positions
            (``"spatial"``), the channels within a group (``"channels"``) or
            the samples (``"batch"``); sorted int64 tensors on the input's
            device.
        probability: Probability that one slice (one position of every axis
            for ``"spatial"``) is kept: the estimate is divided by it.
    """

    mode: str
    kept: Tuple[Tensor, ...]
    probability: float


def _bernoulli(size: int, probability: float, generator, device) -> Tensor:
    uniform = torch.rand(size, generator=generator)
    return (uniform < probability).to(device)


def draw(
    spec: ConvSpec,
    x_shape: Sequence[int],
    keep: float,
    mode: str,
    generator: Optional[torch.Generator],
    device: torch.device,
) -> Sample:
    """Draw the kept slices for an input of shape ``x_shape`` (``[N, C_in, *I]``).

    ``"spatial"`` keeps every input position of axis ``d`` with probability
    ``keep ** (1 / ndim)`` (about a fraction ``keep`` of the positions). Only
    positions that some output reads are candidates: the others (skipped by a
    stride, or past the last window) never enter the gradient and are never
    stored, so a strided layer stores less than ``keep`` of its input.
    """
    if mode == "spatial":
        per_axis = keep ** (1.0 / spec.ndim)
        reads = read_positions(spec, x_shape[2:])
        kept = tuple(
            (read & _bernoulli(len(read), per_axis, generator, "cpu")).nonzero()
            .squeeze(1).to(device)
            for read in reads
        )  # fmt: skip
        return Sample(mode, kept, math.prod([per_axis] * spec.ndim))
    size = x_shape[0] if mode == "batch" else spec.in_channels // spec.groups
    kept_mask = _bernoulli(size, keep, generator, device)
    return Sample(mode, (kept_mask.nonzero().squeeze(1),), keep)
