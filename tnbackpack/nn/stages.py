"""Running a factorized layer as its sequence of stage convolutions.

Activations between stages are ``[N, C, *S]`` with the layer's ``ndim``
spatial axes; a TR kernel core's stage views them as ``[N, C / r_z, r_z, *S]``
(the ring bond as its first spatial axis). Both views share memory.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

from torch import Tensor

from ..tn import functional, torch_routes
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


def stage_forward(
    factor: Factor, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None
) -> Tensor:
    """One stage: PyTorch's kernel for 1-3 spatial axes, the engine beyond.

    ``x`` is already in the stage's layout (:func:`stage_view`).
    """
    spec = factor.stage
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
