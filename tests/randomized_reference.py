"""Independent references for the sampled weight gradients: masks and autograd.

The estimator keeps slices of a summed leg; its value for given kept slices
equals the weight gradient of the layer applied to the input with every
dropped slice zeroed, divided by the keep probability. The references below
build that masked input and differentiate PyTorch's own convolution, so they
share no code with :mod:`tnbackpack.tn.sliced` or :mod:`tnbackpack.randomized`.
"""

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor


def position_mask(x: Tensor, kept: Sequence[Tensor]) -> Tensor:
    """0/1 tensor like ``x``: one where every spatial index is kept on its axis."""
    mask = torch.ones_like(x)
    for d, rows in enumerate(kept):
        axis = torch.zeros(x.shape[2 + d], dtype=x.dtype)
        axis[rows] = 1
        shape = [1] * x.ndim
        shape[2 + d] = -1
        mask = mask * axis.view(shape)
    return mask


def channel_mask(x: Tensor, groups: int, kept: Tensor) -> Tensor:
    """0/1 tensor like ``x``: channels ``ci`` of ``kept`` in every group."""
    per_group = torch.zeros(x.shape[1] // groups, dtype=x.dtype)
    per_group[kept] = 1
    return per_group.repeat(groups).view(1, -1, *([1] * (x.ndim - 2))).expand_as(x)


def batch_mask(x: Tensor, kept: Tensor) -> Tensor:
    """0/1 tensor like ``x``: the kept samples."""
    rows = torch.zeros(x.shape[0], dtype=x.dtype)
    rows[kept] = 1
    return rows.view(-1, *([1] * (x.ndim - 1))).expand_as(x)


def masked_weight_gradient(
    apply: Callable[[Tensor, Tensor, Optional[Tensor]], Tensor],
    x: Tensor,
    weight: Tensor,
    grad_output: Tensor,
    mask: Tensor,
    probability: float,
) -> Tensor:
    """Weight VJP of ``apply(mask * x, weight)``, divided by ``probability``."""
    w = weight.detach().clone().requires_grad_(True)
    (gw,) = torch.autograd.grad(apply(x * mask, w, None), w, grad_output)
    return gw / probability
