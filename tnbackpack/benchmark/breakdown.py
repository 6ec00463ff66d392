"""Where the time of one backward goes: a ``torch.profiler`` table for one pair.

    python -m tnbackpack.benchmark.breakdown --case inceptionv3_7x7
        --extension DiagGGNExact [--implementation backpack] [--stack] [--shapes]

Runs two warm-up steps (plans, caches), then profiles one forward + backward
and prints the operators sorted by their own CPU time; ``--stack`` groups them
by the calling source lines (which tnbackpack or BackPACK function spent it),
``--shapes`` by the operands' shapes.
"""

from __future__ import annotations

import argparse
from typing import List, Optional

import torch
from torch.profiler import ProfilerActivity, profile

from .cases import CASES
from .extensions import ALL_EXTENSIONS, extension_pairs
from .workload import Workload


def breakdown(
    case: str,
    extension: str,
    implementation: str = "tnbackpack",
    batch: int = 32,
    rows: int = 15,
    stack: bool = False,
    shapes: bool = False,
) -> str:
    """The profiler table of one steady-state step of ``extension`` on ``case``."""
    (pair,), _ = extension_pairs((extension,))
    workload = Workload(CASES[case], batch)
    ext = pair.tnbackpack() if implementation == "tnbackpack" else pair.backpack()
    for _ in range(2):
        workload.step(ext)
        workload.clear()
    with profile(
        activities=[ProfilerActivity.CPU], with_stack=stack, record_shapes=shapes
    ) as prof:
        workload.step(ext)
    workload.clear()
    averages = prof.key_averages(
        group_by_input_shape=shapes, group_by_stack_n=6 if stack else 0
    )
    return averages.table(
        sort_by="self_cpu_time_total",
        row_limit=rows,
        max_shapes_column_width=100 if shapes else None,
    )


def main(argv: Optional[List[str]] = None) -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", required=True, choices=sorted(CASES))
    parser.add_argument("--extension", required=True, choices=ALL_EXTENSIONS)
    parser.add_argument(
        "--implementation", default="tnbackpack", choices=("tnbackpack", "backpack")
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--stack", action="store_true", help="group by source lines")
    parser.add_argument("--shapes", action="store_true", help="group by operand shapes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        breakdown(
            args.case,
            args.extension,
            args.implementation,
            args.batch,
            args.rows,
            args.stack,
            args.shapes,
        )
    )


if __name__ == "__main__":
    main()
