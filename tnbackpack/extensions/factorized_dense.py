"""Per-sample factor gradients of a factorized conv through its dense kernel.

A second route for BatchGrad besides the stage walk of :mod:`.factorized`:
the engine computes the per-sample gradient of the equivalent DENSE kernel
``W = einsum(factors)`` from the layer input and the output gradient, and the
chain rule projects it onto each factor by contracting it with the other
factors::

    grad_n F_k = einsum("n[g]oc<spatial>, <other factors> -> n[g]<F_k>", grad_n W, …)

The equation comes from the layer's factor subscripts (:attr:`equation`), so
one implementation serves CP, Tucker, TT and TR, groups included (every factor
then carries the group letter). The projections share their common
intermediates (``opt_einsum.shared_intermediates``).

:func:`choose` picks the route by a cost count of both (FLOPs, and the walk's
memory traffic) (:data:`ROUTE` forces
one). Measured on the benchmark's rows (HANDOFF-p13b.md) the dense route
pays little there (BatchGrad step, 64 channels at 32², N=32, one thread:
CP rank 64 walk 80-93 vs dense 80-81 ms, TR 8x8x8x4 83-87 vs 94-100 ms;
the other rows' walk is 1.6-5x faster): the dense per-sample gradient alone
costs about what the whole walk does. It pays when
the ranks are large relative to the channels, where the walk's stages grow
(CP rank 256: walk 430 vs dense 119 ms; CP rank 64 on 16 channels 40 vs 15 ms;
full-rank Tucker 160 vs 107 ms).
"""

from __future__ import annotations

from math import prod
from typing import Dict, Hashable, List, Tuple

import opt_einsum
from torch import Tensor

from ..nn.factorized_conv import FactorizedConvNd
from ..tn import functional

#: The route of first-order extensions (BatchGrad, BatchL2Grad,
#: SumGradSquared, Variance) on factorized layers: ``"auto"`` takes the
#: per-sample gradients the layer's own backward makes (``"backward"``, see
#: :func:`.factorized.wants_per_sample_gradients`) and, where it made none
#: (``create_graph=True``), the cheaper of ``"walk"`` and ``"dense"`` by the
#: counts below. ``"walk"`` and ``"dense"`` force those (``"dense"`` is for
#: BatchGrad; the others then walk).
ROUTE = "auto"
ROUTES = ("auto", "backward", "walk", "dense")

_CHOICES: Dict[Hashable, str] = {}

#: FLOP-equivalents charged per element of a stage's input and output in the
#: walk. Its stages are thin (depthwise, few-channel) convolutions whose time
#: is memory traffic, not FLOPs, while the dense route is one BLAS-bound
#: product. Fitted on 11 layers (64 channels at 32², 128 at 16², N=32, one
#: thread; ``python -m tnbackpack.benchmark.factorized_routes``): weights
#: between 5 and 180 pick the measured-faster route on the ten clear ones
#: (CP rank 256 needs > 4: walk 408 vs dense 114 ms; TR 8x8x8x4 needs < 180:
#: 83 vs 94 ms); above 111 CP rank 64 (walk 80-93 vs dense 80-81 ms in two
#: runs) goes dense too.
TRAFFIC_WEIGHT = 128


def _projection_equations(module: FactorizedConvNd) -> List[str]:
    """One einsum per factor: dense gradient and the other factors to that factor."""
    group, spatial, factors = module._letters()
    subscripts = factors.split(",")
    dense = f"n{group}oc{spatial}"
    equations = []
    for k, target in enumerate(subscripts):
        others = [s for j, s in enumerate(subscripts) if j != k]
        equations.append(f"{','.join([dense, *others])}->n{target}")
    return equations


def dense_cost(module: FactorizedConvNd, batch: int, out_size: Tuple[int, ...]) -> int:
    """FLOPs of the dense route: dense per-sample gradient and the projections."""
    spec = module.dense_spec()
    cost = 2 * batch * prod(spec.weight_shape()) * prod(out_size)
    group = module.groups
    dense_shape = (batch, *((group,) if group > 1 else ()))
    dense_shape += (spec.out_channels // group, spec.in_channels // group)
    dense_shape += tuple(spec.kernel_size)
    shapes = [f.shape for f in module.factor_plan()]
    if group > 1:
        shapes = [(group, s[0] // group, *s[1:]) for s in shapes]
    for k, equation in enumerate(_projection_equations(module)):
        others = [s for j, s in enumerate(shapes) if j != k]
        _, info = opt_einsum.contract_path(
            equation, dense_shape, *others, shapes=True, optimize="auto"
        )
        cost += int(info.opt_cost)
    return cost


def walk_cost(module: FactorizedConvNd, batch: int, x_shape: Tuple[int, ...]) -> int:
    """Cost of the stage walk in FLOP-equivalents.

    FLOPs of the stage inputs, per-sample VJPs and pull-backs, plus
    :data:`TRAFFIC_WEIGHT` per stage input and output element.
    """
    cost = 0
    plan = module.factor_plan()
    size = tuple(x_shape[2:])
    for position, factor in enumerate(plan):
        stage = factor.stage
        stage_size = ((factor.ring,) if factor.ring else ()) + size
        out_size = stage.output_size(stage_size)
        one_pass = 2 * batch * prod(stage.weight_shape()) * prod(out_size)
        # forward (all but the last stage), per-sample VJP, pull-back (all but
        # the first)
        passes = 1 + (position < len(plan) - 1) + (position > 0)
        cost += passes * one_pass
        traffic = stage.in_channels * prod(stage_size) + stage.out_channels * prod(
            out_size
        )
        cost += TRAFFIC_WEIGHT * batch * traffic
        size = tuple(out_size[1:] if factor.ring else out_size)
    return cost


def check_route() -> None:
    """Raise for a :data:`ROUTE` that is not one of :data:`ROUTES`."""
    if ROUTE not in ROUTES:
        raise ValueError(
            f"tnbackpack.extensions.factorized_dense.ROUTE must be one of {ROUTES}, "
            f"got {ROUTE!r}"
        )


def choose(module: FactorizedConvNd, x: Tensor, grad_output: Tensor) -> str:
    """``"dense"`` or ``"walk"``: :data:`ROUTE`, or the cheaper one by the counts."""
    check_route()
    if ROUTE in ("walk", "dense"):
        return ROUTE
    # the counts call opt_einsum's path search (about 0.3-0.8 ms): once per
    # layer structure and shapes
    key = (module.factor_plan(), module.dense_spec(), x.shape, grad_output.shape)
    if key not in _CHOICES:
        batch = x.shape[0]
        dense = dense_cost(module, batch, tuple(grad_output.shape[2:]))
        walk = walk_cost(module, batch, tuple(x.shape))
        _CHOICES[key] = "dense" if dense < walk else "walk"
    return _CHOICES[key]


def per_sample_factor_gradients(
    module: FactorizedConvNd, tensors: List[Tensor], x: Tensor, grad_output: Tensor
) -> List[Tensor]:
    """Per-sample gradients ``[N, *factor]`` of every factor, in equation order.

    Args:
        module: The layer.
        tensors: Its factor tensors (possibly detached), in equation order.
        x: Layer input ``[N, C_in, *I]``.
        grad_output: Output gradient ``[N, C_out, *O]``.
    """
    spec = module.dense_spec()
    dense = functional.per_sample_weight_vjp(spec, x, grad_output)
    grouped = module._grouped_factors(tensors)
    if module.groups > 1:
        dense = dense.unflatten(1, (module.groups, -1))
    batch = x.shape[0]
    results = []
    with opt_einsum.shared_intermediates():
        for k, equation in enumerate(_projection_equations(module)):
            others = [t for j, t in enumerate(grouped) if j != k]
            results.append(opt_einsum.contract(equation, dense, *others))
    plan = module.factor_plan()
    return [r.reshape(batch, *f.shape) for r, f in zip(results, plan)]


__all__ = ["ROUTE", "choose", "per_sample_factor_gradients"]
