"""A factorized layer's contraction that stays differentiable under ``create_graph``.

``conv_einsum``'s backward is a hand-planned sequence of contractions marked
once-differentiable: after ``loss.backward(create_graph=True)`` the gradients
it returns carry no graph to the factors or the input (autograd silently
treats them as constants). A factorized layer is also its sequence of stage
convolutions (:mod:`.stages`), whose PyTorch kernels are twice
differentiable. This function runs the forward by ``conv_einsum`` and its
usual backward by ``conv_einsum``'s own; only when autograd records the
backward (``create_graph=True``) are the gradients taken through the stages
instead, with a graph.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.graph import get_gradient_edge

Contraction = Callable[[Tensor, Sequence[Tensor]], Tensor]


class _TwiceDifferentiable(torch.autograd.Function):
    """``(by_einsum, by_stages, x, *factors)`` -> the layer output without bias."""

    @staticmethod
    def forward(  # noqa: D102
        ctx,
        by_einsum: Contraction,
        by_stages: Contraction,
        x: Tensor,
        *factors: Tensor,
    ) -> Tensor:
        wanted = ctx.needs_input_grad[2:]
        leaves = [
            t.detach().requires_grad_(need) for t, need in zip((x, *factors), wanted)
        ]
        # conv_einsum's own graph, kept for the usual (not recorded) backward
        # by its gradient edge: holding the output tensor would keep it alive
        # until the backward pass (measured +8 MB peak per 64x32² layer, N=32)
        with torch.enable_grad():
            out = by_einsum(leaves[0], leaves[1:])
        ctx.inner = (get_gradient_edge(out), leaves)
        ctx.by_stages = by_stages
        ctx.save_for_backward(x, *factors)
        return out.detach()

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tuple[Optional[Tensor], ...]:  # noqa: D102
        wanted = ctx.needs_input_grad[2:]
        if torch.is_grad_enabled():  # create_graph=True: through the stage convs
            operands = ctx.saved_tensors
            with torch.enable_grad():
                out = ctx.by_stages(operands[0], operands[1:])
            create_graph = True
        else:
            out, operands = ctx.inner
            create_graph = False
        chosen = [t for t, need in zip(operands, wanted) if need]
        grads = iter(
            torch.autograd.grad(
                out, chosen, grad_output, retain_graph=True, create_graph=create_graph
            )
        )
        result: List[Optional[Tensor]] = [
            next(grads) if need else None for need in wanted
        ]
        return (None, None, *result)


def contract(
    by_einsum: Contraction, by_stages: Contraction, x: Tensor, factors: Sequence[Tensor]
) -> Tensor:
    """``by_einsum(x, factors)``, twice differentiable through ``by_stages``.

    Without anything to differentiate, ``by_einsum`` runs alone.
    """
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *factors))):
        return by_einsum(x, factors)
    return _TwiceDifferentiable.apply(by_einsum, by_stages, x, *factors)
