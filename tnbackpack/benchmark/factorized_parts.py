"""Where a factorized layer's BatchGrad step spends its time, part by part.

``python -m tnbackpack.benchmark.factorized_parts [--case cp64_64@32] [--repeats 15]``.
For one case of :mod:`.factorized` (batch 32, one thread), interleaved
medians (CPU time) of

- ``step (BatchGrad)``: the benchmark row's tnbackpack step;
- ``step (plain)``: forward + backward of the layer without extension
  (``conv_einsum``; the floor any extension adds to);
- ``torch.func``: the row's baseline, ``vmap(grad)`` on the rebuilt kernel;
- the parts of the extension's stage walk: recomputing the stage inputs,
  then per stage (in walk order) the per-sample weight VJP and the pull-back
  of the gradient to the stage input (the first stage's is skipped when the
  layer input needs no gradient, as in the benchmark).

``floor`` sums the plain step and the walk's parts: with it above
``torch.func``, the row cannot beat torch.func by tuning the walk alone.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List, Optional

import torch

from ..extensions import BatchGrad
from ..extensions.factorized import Stage
from ..nn.stages import output_view, stage_inputs, stage_weight
from .factorized import CASES, Setup
from .timing import time_interleaved


def parts(setup: Setup) -> Dict[str, Callable[[], object]]:
    """The timed callables: whole steps, then the stage walk's parts."""
    layer = setup.model[0]
    plan = layer.factor_plan()
    tensors = [t.detach() for t in layer.factor_tensors()]
    x = setup.x
    inputs = stage_inputs(plan, tensors, x)
    steps: Dict[str, Callable[[], object]] = {
        "step (BatchGrad)": lambda: setup.step(setup.model, BatchGrad()),
        "step (plain)": lambda: setup.step(setup.plain),
        "torch.func": setup.per_sample_gradients,
        "walk: stage inputs": lambda: stage_inputs(plan, tensors, x),
    }
    # a random output gradient (the walk's cost does not depend on its values)
    out = torch.randn(x.shape[0], layer.out_channels, *x.shape[2:])
    for position in reversed(range(len(plan))):
        factor = plan[position]
        stage = Stage(factor, stage_weight(factor, tensors[position]), inputs[position])
        carried = output_view(factor, out)
        steps[f"walk: {factor.name} per-sample"] = lambda s=stage, c=carried: (
            s.per_sample_weight_vjp(c, vectors=False)
        )
        if position > 0:
            steps[f"walk: {factor.name} pull-back"] = lambda s=stage, c=carried: (
                s.pull_back(c, vectors=False)
            )
        out = stage.pull_back(carried, vectors=False).reshape(
            x.shape[0], -1, *x.shape[2:]
        )
    return steps


def main(argv: Optional[List[str]] = None) -> None:
    """Print the medians (ms) of every part for one case."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="cp64_64@32", help="a factorized case name")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cases = {c.name: c for c in CASES}
    if args.case not in cases:
        raise ValueError(f"--case must be one of {sorted(cases)}, got {args.case!r}")
    setup = Setup(cases[args.case], args.batch)
    steps = parts(setup)
    timings = time_interleaved(
        steps, setup.clear, args.repeats, warmup=2, clock=time.process_time
    )
    ms = {name: timings.median_ms(name) for name in steps}
    walk = sum(v for k, v in ms.items() if k.startswith("walk:"))
    print(f"{args.case}, batch {args.batch}, one thread, CPU-time medians:")
    for name, value in ms.items():
        print(f"  {name:40s} {value:8.1f} ms")
    print(f"  {'walk total':40s} {walk:8.1f} ms")
    print(f"  {'floor = plain + walk':40s} {ms['step (plain)'] + walk:8.1f} ms")


if __name__ == "__main__":
    main()
