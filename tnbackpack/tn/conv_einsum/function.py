"""The autograd function: a planned forward, and each gradient planned too.

The forward contracts the operands into the output. The gradient of every
operand that needs one is its own contraction of the same network, with the
output's gradient in place of the output and that operand left out
(:mod:`.planner`); intermediates of the forward that those contractions reuse
are saved, like autograd would save its activations. No index pattern is
built unless a step has no convolution kernel, and no autograd graph is
recorded inside.

Under ``loss.backward(create_graph=True)`` the planned gradients would be
wrong to differentiate again: the intermediates they reuse were computed
without a graph, so their dependence on the operands would be lost (and
autograd would treat the gradients as constants, silently). There the
backward records instead: it runs the forward plan again with autograd on and
differentiates it with ``create_graph=True``, so the gradients are twice
differentiable through PyTorch's own kernels.
"""

from __future__ import annotations

import time
from typing import Dict, Hashable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .evaluate import execute
from .per_sample import gradients, plan_mixed
from .planner import Plan, plan
from .semantics import Network

#: How gradients are computed: ``"planned"`` (:class:`ConvEinsum`: each
#: gradient its own planned contraction), ``"recorded"`` (autograd records the
#: forward plan's kernels and runs their backward kernels: PyTorch's
#: convolution backward computes a stage's input and weight gradients in one
#: call), ``"recorded_nchw"`` (the same with channel products as 1×1
#: convolutions in ``nchw`` order, the stage sequence's kernels), or
#: ``"auto"``: the fastest, measured once per network and set of operands
#: needing gradients (above :data:`MEASURE_ABOVE`; planned below). On the
#: benchmark's ResNet-34 shapes (``python -m tnbackpack.benchmark
#: --conv-einsum``, batch 32, one thread) a recorded route wins on most 7² and
#: 14² layers, the planned one on most CP and Tucker-2 layers at 28² (the plan
#: list of the committed table names each row's route).
BACKWARD = "auto"
BACKWARDS = ("auto", "planned", "recorded", "recorded_nchw")
#: Networks whose planned forward is estimated below this (seconds) are not
#: measured: the planned backward wins or the difference does not matter.
MEASURE_ABOVE = 2e-3
#: A recorded route must be faster than the planned one by this fraction.
MARGIN = 0.03
#: Timed rounds per route (after an untimed one); the fastest counts. Routes
#: within a few percent of each other swap places between single runs on a
#: shared machine (±5%), so one round is not enough.
TIMED = 5

_ROUTES: Dict[Hashable, str] = {}


def evaluate(network: Network, *operands: Tensor) -> Tensor:
    """The forward alone (no gradient wanted: nothing planned or saved for one)."""
    chosen = plan(network, operands[0].element_size())
    return execute(network, chosen.forward, dict(enumerate(operands)), {})


def recorded(
    network: Network, *operands: Tensor, nchw: Optional[bool] = None
) -> Tensor:
    """The forward plan run under autograd (its kernels' backward is the gradient).

    ``nchw`` as for :func:`.evaluate.execute`: ``True`` runs a stage
    sequence's channel products as the sequence does (1×1 convolutions in the
    caller's ``nchw`` order), so autograd runs their fused backward kernels.
    """
    chosen = plan(network, operands[0].element_size())
    return execute(network, chosen.forward, dict(enumerate(operands)), {}, nchw)


def differentiable(network: Network, request, *operands: Tensor) -> Tensor:
    """The output, with gradients by the route :data:`BACKWARD` picks.

    Under ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, …) the
    recorded route runs: the transforms see PyTorch's own operations, which
    they know how to differentiate and batch.
    """
    if _transformed(operands):
        return recorded(network, *operands)
    route = "planned" if request is not None else backward_route(network, operands)
    if route == "recorded":
        return recorded(network, *operands)
    if route == "recorded_nchw":
        return recorded(network, *operands, nchw=True)
    return ConvEinsum.apply(network, request, *operands)


def _transformed(operands: Sequence[Tensor]) -> bool:
    """Whether an operand is a ``torch.func`` transform's wrapper."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(wrapped(op) for op in operands)


def backward_route(network: Network, operands: Sequence[Tensor]) -> str:
    """The gradient route for these operands (see :data:`BACKWARD`)."""
    if BACKWARD not in BACKWARDS:
        raise ValueError(
            f"tnbackpack.tn.conv_einsum.function.BACKWARD must be one of "
            f"{BACKWARDS}, got {BACKWARD!r}"
        )
    if BACKWARD != "auto":
        return BACKWARD
    itemsize = operands[0].element_size()
    chosen = plan(network, itemsize)
    # autograd through a materialized pattern is what the planned gradients avoid
    if chosen.forward.seconds < MEASURE_ABOVE or any(
        step.method == "pattern" for step in chosen.forward.steps
    ):
        return "planned"
    wanted = tuple(op.requires_grad for op in operands)
    key = (network, itemsize, wanted, operands[0].device)
    if key not in _ROUTES:
        try:
            _ROUTES[key] = _measure(network, operands)
        except RuntimeError:  # e.g. inside torch.func transforms: do not measure
            return "planned"
    return _ROUTES[key]


def _measure(network: Network, operands: Sequence[Tensor]) -> str:
    """Time the routes' forward + backward (CPU time, best of :data:`TIMED` each).

    A first untimed run of each settles the routes' own one-time choices
    (the steps' measured kernels, :mod:`..autotune`); the rounds interleave
    the routes. A recorded route must beat the planned one by :data:`MARGIN`.
    """
    copies = [op.detach().requires_grad_(op.requires_grad) for op in operands]
    needing = [op for op in copies if op.requires_grad]
    runs = {
        "planned": lambda: ConvEinsum.apply(network, None, *copies),
        "recorded": lambda: recorded(network, *copies, nchw=False),
        "recorded_nchw": lambda: recorded(network, *copies, nchw=True),
    }
    times = {name: float("inf") for name in runs}
    for repeat in range(TIMED + 1):
        for name, run in runs.items():
            start = time.process_time()
            output = run()
            torch.autograd.grad(output, needing, torch.ones_like(output))
            if repeat:
                times[name] = min(times[name], time.process_time() - start)
    times["planned"] *= 1 - MARGIN
    return min(times, key=times.get)


class ConvEinsum(torch.autograd.Function):
    """``forward(ctx, network, request, *operands)`` -> the output node's tensor.

    ``request`` (a :class:`.per_sample.PerSampleRequest` or ``None``) may ask
    the backward for per-sample gradients of some operands: they replace the
    ordinary gradient contractions of those operands (their sums over the
    batch are returned as the gradients) and are handed to the request.
    """

    @staticmethod
    def forward(ctx, network: Network, request, *operands: Tensor) -> Tensor:  # noqa: D102
        wanted = tuple(i for i, need in enumerate(ctx.needs_input_grad[2:]) if need)
        itemsize = operands[0].element_size()
        chosen = plan(network, itemsize, wanted)
        store = {}
        with torch.no_grad():
            output = execute(network, chosen.forward, dict(enumerate(operands)), store)
        if wanted:
            masks = set(chosen.saved)
            if request is not None:
                masks |= _per_sample_saved(network, itemsize, wanted, request, chosen)
            masks = sorted(masks)
            ctx.masks = masks
            ctx.letters = [store[m][1] for m in masks]
            ctx.network, ctx.plan, ctx.request = network, chosen, request
            ctx.save_for_backward(*operands, *(store[m][0] for m in masks))
            if request is not None:
                kept = {m: store[m] for m in masks}
                request.context = (network, wanted, operands, kept)
                request.ahead = request.gradients = None
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tuple:  # noqa: D102
        network = ctx.network
        count = len(network.subscripts) - 1
        saved = ctx.saved_tensors
        operands, kept = saved[:count], saved[count:]
        needs = ctx.needs_input_grad[2:]
        request = ctx.request
        ahead = {}
        if request is not None:
            request.context = None  # the saved tensors are the graph's again
            ahead = request.take_ahead(grad_output)
            if not ahead:
                request.gradients = None  # never those of an earlier backward
        if torch.is_grad_enabled():  # create_graph=True
            return (None, None, *_recorded_gradients(ctx, operands, needs, grad_output))
        store = {m: (t, c) for m, t, c in zip(ctx.masks, kept, ctx.letters)}
        tensors = dict(enumerate(operands))
        tensors[network.output_node] = grad_output
        grads = [None] * count
        wanted = tuple(i for i, need in enumerate(needs) if need)
        asked = set(ahead) or (set(request.positions()) if request else set())
        per_sample = tuple(i for i in wanted if i in asked and i not in ahead)
        if not asked:
            for contraction in ctx.plan.gradients:
                grads[contraction.node] = execute(network, contraction, tensors, store)
            return (None, None, *grads)
        summed = tuple(i for i in wanted if i not in asked)
        results = gradients(network, summed, per_sample, request.batch, tensors, store)
        if per_sample:
            request.deliver({i: results[i] for i in per_sample})
        results.update(ahead)
        for i, result in results.items():
            grads[i] = result.sum(0) if i in asked else result
        return (None, None, *grads)


def _per_sample_saved(
    network: Network, itemsize: int, wanted: Tuple[int, ...], request, chosen: Plan
) -> set:
    """Forward intermediates a per-sample backward of ``request`` would reuse."""
    candidates = set(request.candidates)
    per_sample = tuple(i for i in wanted if i in candidates)
    if not per_sample:
        return set()
    summed = tuple(i for i in wanted if i not in candidates)
    free = frozenset(step.result for step in chosen.forward.steps)
    _, used = plan_mixed(network, itemsize, summed, per_sample, request.batch, free)
    return set(used)


def _recorded_gradients(
    ctx, operands: Tuple[Tensor, ...], needs: Tuple[bool, ...], grad_output: Tensor
) -> Tuple:
    """Gradients with a graph: the forward plan re-run under autograd."""
    wanted = [i for i, need in enumerate(needs) if need]
    with torch.enable_grad():
        output = recorded(ctx.network, *operands)
        found = torch.autograd.grad(
            output,
            [operands[i] for i in wanted],
            grad_output,
            create_graph=True,
            allow_unused=True,
        )
    grads = [None] * len(operands)
    for i, grad in zip(wanted, found):
        grads[i] = torch.zeros_like(operands[i]) if grad is None else grad
    return tuple(grads)
