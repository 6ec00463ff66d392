"""Run planned contractions on tensors."""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Tuple

from torch import Tensor

from .legs import Part, part, target
from .planner import Contraction, Step
from .semantics import Network
from .steps import Side, reindex, run_conv, run_matmul, run_pattern

Named = Tuple[Tensor, str]


def _to_side(tensor: Tensor, letters: str, legs: Mapping, side: Side) -> Named:
    """Sum letters ``side`` lacks, move legs to ``side``'s, in any order."""
    drop = [i for i, c in enumerate(letters) if c not in side.letters]
    if drop:
        tensor = tensor.sum(drop)
        letters = "".join(c for c in letters if c in side.letters)
    wanted = dict(side.legs)
    for c, leg in legs.items():
        if c in wanted and wanted[c] != leg:
            tensor = reindex(tensor, letters.index(c), leg, wanted[c])
    return tensor, letters


def leaf(network: Network, node: int, tensor: Tensor, out: Part) -> Named:
    """A node's tensor in the coordinates of ``out`` (a part of one node)."""
    return _to_side(
        tensor, network.subscripts[node], dict(network.legs[node]), Side.of(out)
    )


#: Samples with at most this many output positions keep every intermediate in
#: the caller's ``nchw`` order and run channel products as 1×1 convolutions
#: (the stage sequence's kernels) instead of channels-last matrix products:
#: the products are then small per sample, and the ``nchw`` input and output
#: would otherwise be transposed around them. Measured (batch 32, one thread,
#: forward + backward, HANDOFF-p12.md): 512-channel 7² layers 1–19% faster
#: (CP most), 14² and larger layers 7–26% slower, a 16-channel 8² layer 2–5%
#: slower; hence 7².
NCHW_MAX_POSITIONS = 49


def onednn_layout(network: Network) -> bool:
    """Whether the network's output has few enough positions per sample."""
    legs = network.legs[network.output_node]
    return bool(legs) and math.prod(leg.size for _, leg in legs) <= NCHW_MAX_POSITIONS


def run_step(
    step: Step,
    a: Named,
    b: Named,
    legs_a,
    legs_b,
    top: bool = False,
    onednn: bool = False,
) -> Named:
    """One step on tensors in the coordinates of their parts."""
    (ta, la), (tb, lb) = _to_side(*a, legs_a, step.a), _to_side(*b, legs_b, step.b)
    for letter, start, length in step.cuts[0]:
        ta = ta.narrow(la.index(letter), start, length)
    for letter, start, length in step.cuts[1]:
        tb = tb.narrow(lb.index(letter), start, length)
    if step.method == "einsum":
        return run_matmul(ta, la, tb, lb, step.out.letters, not (top or onednn), onednn)
    if step.method == "pattern":
        return run_pattern(
            ta, la, dict(step.a.legs), tb, lb, dict(step.b.legs), step.out
        )
    return run_conv(step.layout, ta, la, tb, lb)


def execute(
    network: Network,
    plan: Contraction,
    tensors: Mapping[int, Tensor],
    store: Dict[int, Named],
    nchw: Optional[bool] = None,
) -> Tensor:
    """Contract all nodes but ``plan.node`` into it; result in its layout.

    Args:
        network: The network.
        plan: The steps.
        tensors: Tensor of every node taking part.
        store: Intermediates by node set: read where the plan reuses them,
            written by every step.
        nchw: Keep the caller's ``nchw`` order and run channel products as
            1×1 convolutions (``None``: by :func:`onednn_layout`).
    """
    node = plan.node
    everyone = (1 << len(network.subscripts)) - 1
    full = everyone & ~(1 << node)
    if not plan.steps:
        (only,) = [i for i in range(len(network.subscripts)) if full >> i & 1]
        result = leaf(network, only, tensors[only], target(network, node, full))
    else:
        onednn = onednn_layout(network) if nchw is None else nchw
        for step in plan.steps:
            operands = []
            for mask in (step.left, step.right):
                if mask not in store:
                    (i,) = [j for j in range(len(network.subscripts)) if mask == 1 << j]
                    store[mask] = leaf(network, i, tensors[i], part(network, mask))
                operands.append(store[mask])
            store[step.result] = run_step(
                step, operands[0], operands[1],
                dict(part(network, step.left).legs),
                dict(part(network, step.right).legs),
                step.result == full, onednn,
            )  # fmt: skip
        result = store.pop(full)
    return _finish(network, node, *result)


def _finish(network: Network, node: int, tensor: Tensor, letters: str) -> Tensor:
    """Permute to the node's subscripts; expand over letters the rest lacks."""
    subs = network.subscripts[node]
    shape = network.shape(node)
    missing = [c for c in subs if c not in letters]
    for c in missing:
        tensor, letters = tensor.unsqueeze(-1), letters + c
    tensor = tensor.permute([letters.index(c) for c in subs])
    return tensor.expand(shape) if missing else tensor
