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
from typing import Callable, Dict, Hashable, Optional, Tuple

from torch import Tensor

#: ``"measure"`` (time the candidates once per key) or ``"model"`` (use the
#: cost model's choice without measuring).
POLICY = "measure"

#: The preferred (cost-model) route is kept unless another one measures faster
#: by more than this fraction: one timed run is noisy, the model is not.
MARGIN = 0.1

_CHOICES: Dict[Hashable, str] = {}


def fastest(
    key: Hashable, candidates: Dict[str, Callable[[], Tensor]]
) -> Tuple[str, Tensor]:
    """Run the remembered route for ``key``, or time all candidates once.

    Args:
        key: Identifies the computation up to its operands' values.
        candidates: Route name to a function computing the result. The last
            one is the preferred (cost-model) route: it runs on a warmed-up
            allocator and is kept unless another is faster by :data:`MARGIN`.
            Timing uses the process's CPU time, which other processes on the
            machine do not inflate.

    Returns:
        The route that ran (or won) and its result.
    """
    choice = _CHOICES.get(key)
    if choice is not None:
        return choice, candidates[choice]()
    best_name, best_time, best_result = "", float("inf"), None
    preferred = list(candidates)[-1]
    for name, run in candidates.items():
        start = time.process_time()
        result = run()
        elapsed = time.process_time() - start
        if name == preferred:
            elapsed *= 1 - MARGIN
        if elapsed <= best_time:
            best_name, best_time, best_result = name, elapsed, result
        del result
    _CHOICES[key] = best_name
    return best_name, best_result


def remembered(key: Hashable) -> Optional[str]:
    """The route measured fastest for ``key``, or ``None`` before the first call."""
    return _CHOICES.get(key)


def choices() -> Dict[Hashable, str]:
    """The routes chosen so far, by key (for inspection and benchmarks)."""
    return dict(_CHOICES)


def clear() -> None:
    """Forget every measurement (e.g. after changing the thread count)."""
    _CHOICES.clear()
