"""Cost of the first engine call (patterns + opt_einsum planning) vs cached calls.

A training loop pays for planning once per layer and shape; every later call
reuses the cached index patterns and contraction plans. Run:

    python examples/plan_cache.py
"""

import time

import torch
from torch import nn

from tnbackpack.tn import ConvSpec, functional, network, pattern


def _clear_caches() -> None:
    for cached in (
        network.plan,
        network._path_cost,
        pattern.index_pattern,
        pattern.summed_index_pattern,
    ):
        cached.cache_clear()


def _seconds(function, repeats: int = 1) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    """Print first-call and cached-call times for a 3×3 Conv2d."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 64, 3, padding=1)
    spec = ConvSpec.from_module(conv)
    x = torch.randn(32, 32, 32, 32)
    grad_output = torch.randn(32, 64, 32, 32)
    quantities = {
        "forward": lambda: functional.forward(spec, x, conv.weight.detach()),
        "per-sample weight VJP": lambda: functional.per_sample_weight_vjp(
            spec, x, grad_output
        ),
        "KFAC-reduce input factor": lambda: functional.kfac_input_factor(
            spec, x, "reduce"
        ),
        "KFAC-expand input factor": lambda: functional.kfac_input_factor(
            spec, x, "expand"
        ),
    }
    print("3x3 Conv2d, N=32, 32->64 channels, 32x32, one thread")
    header = ("quantity", "first call", "cached call", "planning")
    print(f"{header[0]:28s} {header[1]:>12s} {header[2]:>12s} {header[3]:>10s}")
    for name, compute in quantities.items():
        _clear_caches()
        first = _seconds(compute)
        cached = _seconds(compute, repeats=7)
        print(
            f"{name:28s} {first * 1e3:10.1f}ms {cached * 1e3:10.1f}ms "
            f"{(first - cached) * 1e3:8.1f}ms"
        )


if __name__ == "__main__":
    main()
