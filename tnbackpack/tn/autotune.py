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

#: Candidates whose first run took at most this multiple of the best one's are
#: timed once more (the minimum counts).
RETIME_WITHIN = 1.5

_CHOICES: Dict[Hashable, str] = {}


def fastest(
    key: Hashable, candidates: Dict[str, Callable[[], Tensor]]
) -> Tuple[str, Tensor]:
    """Run the remembered route for ``key``, or time the candidates.

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
    preferred = list(candidates)[-1]
    times: Dict[str, float] = {}
    best_name, best_result = "", None

    def trial(name: str) -> None:
        nonlocal best_name, best_result
        start = time.process_time()
        result = candidates[name]()
        elapsed = time.process_time() - start
        if name == preferred:
            elapsed *= 1 - MARGIN
        times[name] = min(elapsed, times.get(name, float("inf")))
        if best_name in ("", name) or times[name] <= times[best_name]:
            best_name, best_result = name, result
        del result

    for name in candidates:
        trial(name)
    # A first run also pays one-time costs (page faults of fresh buffers,
    # kernel set-up); runs close to the best get a second, warm timing.
    close = [n for n in candidates if times[n] <= RETIME_WITHIN * times[best_name]]
    if len(close) > 1:
        for name in close:
            trial(name)
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
