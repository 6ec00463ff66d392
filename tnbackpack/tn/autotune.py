"""Choose between equivalent routes by one measurement, cached per key.

FLOP counts decide only part of a route's speed: memory traffic, matrix shapes
and the BLAS in use decide the rest, and no simple model gets every layer
right (see :func:`.functional.per_sample_weight_vjp_route`). So on the first
call for a key (quantity, spec, shapes, dtype, device) every candidate route
runs once on the real operands and is timed; the fastest is remembered and its
result returned, so the measurement computes nothing in vain. Later calls with
the same key run only the winner.

The routes agree up to floating-point rounding. Set :data:`POLICY` to
``"model"`` for routes that depend on shapes only (bit-for-bit repeatable
across runs), at some cost in speed.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Hashable, Tuple

from torch import Tensor

#: ``"measure"`` (time the candidates once per key) or ``"model"`` (use the
#: cost model's choice without measuring).
POLICY = "measure"

_CHOICES: Dict[Hashable, str] = {}


def fastest(
    key: Hashable, candidates: Dict[str, Callable[[], Tensor]]
) -> Tuple[str, Tensor]:
    """Run the remembered route for ``key``, or time all candidates once.

    Args:
        key: Identifies the computation up to its operands' values.
        candidates: Route name to a function computing the result. The last
            candidate runs on a warmed-up allocator, so put the preferred
            (cost-model) route last: it wins ties.

    Returns:
        The route that ran (or won) and its result.
    """
    choice = _CHOICES.get(key)
    if choice is not None:
        return choice, candidates[choice]()
    best_name, best_time, best_result = "", float("inf"), None
    for name, run in candidates.items():
        start = time.perf_counter()
        result = run()
        elapsed = time.perf_counter() - start
        if elapsed <= best_time:
            best_name, best_time, best_result = name, elapsed, result
        del result
    _CHOICES[key] = best_name
    return best_name, best_result


def choices() -> Dict[Hashable, str]:
    """The routes chosen so far, by key (for inspection and benchmarks)."""
    return dict(_CHOICES)


def clear() -> None:
    """Forget every measurement (e.g. after changing the thread count)."""
    _CHOICES.clear()
