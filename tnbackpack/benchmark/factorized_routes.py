"""BatchGrad of factorized layers by each route.

``python -m tnbackpack.benchmark.factorized_routes [--repeats 7]``. For the
rows of :mod:`.factorized` and four layers whose ranks are large relative to
their channels (batch 32, one thread), interleaved medians of the BatchGrad
step with :data:`..extensions.factorized_dense.ROUTE` forced to ``backward``
(per-sample gradients from the layer's own backward, the default), ``walk``
and ``dense``, beside ``torch.func`` on the rebuilt kernel, and the route the
cost count picks between walk and dense where the backward makes none
(``create_graph=True``).
"""

from __future__ import annotations

import argparse
from typing import Callable, List, Optional

import torch

from ..extensions import BatchGrad, factorized_dense
from .factorized import CASES, FactorizedCase, Setup
from .timing import time_interleaved

#: Ranks large relative to the channels, where the walk's stages grow.
LARGE_RANK_CASES = (
    FactorizedCase(64, 32, "tucker", (64, 64)),
    FactorizedCase(64, 32, "cp", 256),
    FactorizedCase(16, 32, "cp", 64),
    FactorizedCase(64, 32, "tr", (16, 16, 16, 8)),
)


def _forced(setup: Setup, route: str) -> Callable[[], None]:
    def step() -> None:
        previous, factorized_dense.ROUTE = factorized_dense.ROUTE, route
        try:
            setup.step(setup.model, BatchGrad())
        finally:
            factorized_dense.ROUTE = previous

    return step


def row(case: FactorizedCase, batch: int, repeats: int) -> str:
    """One line: the case, the walk/dense count's choice and the four medians."""
    setup = Setup(case, batch)
    auto = factorized_dense.choose(setup.model[0], setup.x, setup.x)
    variants = {
        "backward": _forced(setup, "backward"),
        "walk": _forced(setup, "walk"),
        "dense": _forced(setup, "dense"),
        "torch.func": setup.per_sample_gradients,
    }
    timings = time_interleaved(variants, setup.clear, repeats)
    cells = "  ".join(f"{name} {timings.median_ms(name):6.1f} ms" for name in variants)
    return f"{case.name:22s} count={auto:5s}  {cells}"


def main(argv: Optional[List[str]] = None) -> None:
    """Print one line per case."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"BatchGrad step, batch {args.batch}, one thread, medians:")
    for case in (*CASES, *LARGE_RANK_CASES):
        print(row(case, args.batch, args.repeats), flush=True)


if __name__ == "__main__":
    main()
