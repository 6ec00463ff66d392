"""The autograd function: a planned forward, and each gradient planned too.

The forward contracts the operands into the output. The gradient of every
operand that needs one is its own contraction of the same network, with the
output's gradient in place of the output and that operand left out
(:mod:`.planner`); intermediates of the forward that those contractions reuse
are saved, like autograd would save its activations. No index pattern is
built unless a step has no convolution kernel, and no autograd graph is
recorded inside.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .evaluate import execute
from .planner import plan
from .semantics import Network


class ConvEinsum(torch.autograd.Function):
    """``forward(ctx, network, *operands)`` -> the output node's tensor."""

    @staticmethod
    def forward(ctx, network: Network, *operands: Tensor) -> Tensor:  # noqa: D102
        wanted = tuple(i for i, need in enumerate(ctx.needs_input_grad[1:]) if need)
        itemsize = operands[0].element_size()
        chosen = plan(network, itemsize, wanted)
        store = {}
        with torch.no_grad():
            output = execute(network, chosen.forward, dict(enumerate(operands)), store)
        if wanted:
            masks = sorted(chosen.saved)
            ctx.masks = masks
            ctx.letters = [store[m][1] for m in masks]
            ctx.network, ctx.plan = network, chosen
            ctx.save_for_backward(*operands, *(store[m][0] for m in masks))
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor) -> Tuple:  # noqa: D102
        network = ctx.network
        count = len(network.subscripts) - 1
        saved = ctx.saved_tensors
        operands, kept = saved[:count], saved[count:]
        store = {m: (t, c) for m, t, c in zip(ctx.masks, kept, ctx.letters)}
        tensors = dict(enumerate(operands))
        tensors[network.output_node] = grad_output
        grads = [None] * count
        for contraction in ctx.plan.gradients:
            grads[contraction.node] = execute(network, contraction, tensors, store)
        return (None, *grads)
