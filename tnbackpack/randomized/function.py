"""The autograd function of a sampled convolution: exact forward, sampled weight VJP.

The forward pass is the layer's own. It saves for backward only the kept
slices of the input (and their indices), plus the weight when the input
needs a gradient. The backward pass returns the exact input and bias
gradients and the unbiased estimate of the weight gradient from the kept
slices: a contraction of the smaller, sliced network (:mod:`tnbackpack.tn.sliced`
for positions; PyTorch's weight-gradient kernel on the sliced operands for
channels and samples).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..tn import functional
from ..tn.sliced import sliced_weight_vjp
from ..tn.spec import ConvSpec
from .sampling import Sample


def kept_input(spec: ConvSpec, x: Tensor, sample: Sample) -> Tensor:
    """The slices of ``x`` that are stored for backward.

    Positions are stored positions first (``[*kept, N, C_in]`` in memory, a
    ``[N, C_in, *kept]`` view is returned): the sliced weight VJP gathers
    whole rows of that layout.
    """
    if sample.mode == "batch":
        return x.index_select(0, sample.kept[0])
    if sample.mode == "channels":
        return x.index_select(1, _channel_index(spec, sample.kept[0]))
    ndim = spec.ndim
    rows = x.permute(*range(2, 2 + ndim), 0, 1)
    for d, kept in enumerate(sample.kept):
        rows = rows.index_select(d, kept)
    return rows.contiguous().permute(ndim, ndim + 1, *range(ndim))


def _channel_index(spec: ConvSpec, kept: Tensor) -> Tensor:
    """Indices of the kept channels ``ci`` of every group in ``[0, C_in)``."""
    per_group = spec.in_channels // spec.groups
    starts = torch.arange(spec.groups, device=kept.device) * per_group
    return (starts.view(-1, 1) + kept.view(1, -1)).reshape(-1)


def sampled_weight_vjp(
    spec: ConvSpec,
    stored: Tensor,
    sample: Sample,
    input_size: Sequence[int],
    grad_output: Tensor,
) -> Tensor:
    """Unbiased estimate of the weight gradient from the stored slices."""
    kept = sample.kept
    if any(len(k) == 0 for k in kept):
        return grad_output.new_zeros(spec.weight_shape())
    if sample.mode == "spatial":
        total = sliced_weight_vjp(spec, stored, kept, input_size, grad_output)
    elif sample.mode == "batch":
        total = functional.weight_vjp(
            spec, stored, grad_output.index_select(0, kept[0])
        )
    else:
        sliced_spec = dataclasses.replace(spec, in_channels=spec.groups * len(kept[0]))
        partial = functional.weight_vjp(sliced_spec, stored, grad_output)
        total = grad_output.new_zeros(spec.weight_shape())
        total[:, kept[0]] = partial
    return total / sample.probability


class SampledConvolution(torch.autograd.Function):
    """``conv(x)`` with the weight VJP estimated from kept slices of ``x``."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        conv: nn.Module,
        spec: ConvSpec,
        sample: Sample,
    ) -> Tensor:
        """The layer's exact output; saves the kept slices of ``x``."""
        ctx.spec, ctx.mode, ctx.probability = spec, sample.mode, sample.probability
        ctx.input_size = tuple(x.shape[2:])
        ctx.has_bias = bias is not None
        needs_input, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        stored = kept_input(spec, x, sample) if needs_weight else None
        ctx.save_for_backward(stored, weight if needs_input else None, *sample.kept)
        return conv._conv_forward(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tuple[Optional[Tensor], ...]:
        """Exact input and bias gradients, sampled weight gradient."""
        stored, weight, *kept = ctx.saved_tensors
        spec = ctx.spec
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = functional.input_vjp(spec, grad_output, weight, ctx.input_size)
        if ctx.needs_input_grad[1]:
            sample = Sample(ctx.mode, tuple(kept), ctx.probability)
            grad_weight = sampled_weight_vjp(
                spec, stored, sample, ctx.input_size, grad_output
            )
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum(dim=(0, *range(2, grad_output.ndim)))
        return grad_input, grad_weight, grad_bias, None, None, None
