"""Running a factorized layer as its sequence of stage convolutions.

Activations between stages are ``[N, C, *S]`` with the layer's ``ndim``
spatial axes; a TR kernel core's stage views them as ``[N, C / r_z, r_z, *S]``
(the ring bond as its first spatial axis). Both views share memory.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ..tn import functional, torch_routes
from ..tn.spec import ConvSpec
from .factorizations import Factor


def _ringed(factor: Factor, activation: Tensor, channels: int, lead: int) -> Tensor:
    spatial = factor.stage.ndim - (1 if factor.ring else 0)
    ring = (factor.ring,) if factor.ring else ()
    return activation.reshape(
        *activation.shape[: lead + 1],
        channels,
        *ring,
        *activation.shape[activation.ndim - spatial :],
    )


def stage_view(factor: Factor, activation: Tensor, lead: int = 0) -> Tensor:
    """``activation [*lead, N, C, *S]`` in the layout ``factor``'s stage reads.

    Args:
        factor: The factor whose stage comes next.
        activation: The previous stage's output (or the layer input), with
            ``lead`` extra leading axes (e.g. vectors).
        lead: Number of axes before the batch axis.
    """
    return _ringed(factor, activation, factor.stage.in_channels, lead)


def output_view(factor: Factor, activation: Tensor, lead: int = 0) -> Tensor:
    """``[*lead, N, C, *S]`` in the layout that ``factor``'s stage writes."""
    return _ringed(factor, activation, factor.stage.out_channels, lead)


def flat_view(activation: Tensor, layer_ndim: int, lead: int = 0) -> Tensor:
    """A stage output ``[*lead, N, C, (r_z,) *S]`` as ``[*lead, N, C', *S]``."""
    return activation.reshape(
        *activation.shape[: lead + 1],
        -1,
        *activation.shape[activation.ndim - layer_ndim :],
    )


def stage_weight(factor: Factor, tensor: Tensor) -> Tensor:
    """The stage's conv weight (a view of the factor)."""
    return tensor.reshape(factor.stage.weight_shape())


def is_pointwise(spec: ConvSpec) -> bool:
    """Whether the stage only mixes channels (kernel size 1, no padding, stride 1).

    Such stages (a CP/Tucker/TT/TR layer's first and last) are batched matrix
    products; PyTorch's CPU kernel runs them as general convolutions, measured
    about 2x slower for 64 -> 64 channels at 32², N=32, one thread (19.5 vs
    8.5 ms; HANDOFF-p13.md).
    """
    return (
        not spec.transposed
        and all(k == 1 for k in spec.kernel_size)
        and all(s == 1 for s in spec.stride)
        and not any(p for pair in spec.padding for p in pair)
    )


def _mix_channels(tensor: Tensor, matrices: Tensor, ndim: int) -> Tensor:
    """``[*lead, C, *S]`` times per-group ``matrices [G, C'/G, C/G]``.

    Returns ``[*lead, C', *S]``.
    """
    lead = tensor.shape[: tensor.ndim - ndim - 1]
    groups, rows, columns = matrices.shape
    flat = tensor.reshape(*lead, groups, columns, -1)
    out = torch.matmul(matrices, flat)
    return out.reshape(*lead, groups * rows, *tensor.shape[tensor.ndim - ndim :])


def _matrices(spec: ConvSpec, weight: Tensor) -> Tensor:
    g = spec.groups
    return weight.reshape(g, spec.out_channels // g, spec.in_channels // g)


def pointwise_forward(spec: ConvSpec, x: Tensor, weight: Tensor) -> Tensor:
    """A pointwise stage as one (grouped) matrix product, ``[N, C_out, *S]``."""
    return _mix_channels(x, _matrices(spec, weight), spec.ndim)


def pointwise_input_vjp(spec: ConvSpec, carried: Tensor, weight: Tensor) -> Tensor:
    """``Wᵀ`` applied to ``carried [*lead, N, C_out, *S]`` of a pointwise stage."""
    return _mix_channels(carried, _matrices(spec, weight).transpose(1, 2), spec.ndim)


def stage_forward(
    factor: Factor, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None
) -> Tensor:
    """One stage: a matrix product if pointwise, else PyTorch's kernel or the engine.

    PyTorch's kernel for 1-3 spatial axes, the engine beyond.
    ``x`` is already in the stage's layout (:func:`stage_view`).
    """
    spec = factor.stage
    if is_pointwise(spec):
        out = pointwise_forward(spec, x, weight)
        if bias is not None:
            out = out + bias.reshape(-1, *(1,) * spec.ndim)
        return out
    if torch_routes.supports(spec):
        return torch_routes.forward(spec, x, weight, bias)
    return functional.forward(spec, x, weight, bias)


def run_stages(
    factors: Sequence[Factor],
    tensors: Sequence[Tensor],
    x: Tensor,
    bias: Optional[Tensor] = None,
    keep_inputs: bool = False,
) -> List[Tensor]:
    """The layer output by its stages, or every stage's input.

    Args:
        factors: The layer's factors (stages in order).
        tensors: The factor tensors, stored shapes.
        x: Layer input ``[N, C_in, *I]``.
        bias: Added by the last stage.
        keep_inputs: Return the input of each stage (in its layout) followed
            by the layer output, instead of only ``[output]``.
    """
    layer_ndim = x.ndim - 2
    inputs = []
    activation = x
    for position, (factor, tensor) in enumerate(zip(factors, tensors)):
        stage_input = stage_view(factor, activation)
        if keep_inputs:
            inputs.append(stage_input)
        last = position == len(factors) - 1
        out = stage_forward(
            factor, stage_input, stage_weight(factor, tensor), bias if last else None
        )
        activation = flat_view(out, layer_ndim)
    return inputs + [activation]


def stage_inputs(
    factors: Sequence[Factor], tensors: Sequence[Tensor], x: Tensor
) -> List[Tensor]:
    """Each stage's input (in its layout), recomputed from the layer input.

    Recorded by autograd only when grad mode is on and an operand requires
    grad (a backward pass with ``create_graph=True``); the last stage is not
    run.
    """
    layer_ndim = x.ndim - 2
    inputs = [stage_view(factors[0], x)]
    for factor, tensor, following in zip(factors, tensors, factors[1:]):
        out = stage_forward(factor, inputs[-1], stage_weight(factor, tensor))
        inputs.append(stage_view(following, flat_view(out, layer_ndim)))
    return inputs
