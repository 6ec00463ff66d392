"""Input-VJP routes side by side: the network (``tn``) vs PyTorch's kernel.

``python -m tnbackpack.benchmark.input_vjp`` times
:func:`tnbackpack.tn.functional.input_vjp` with ``route="tn"``, ``"torch"`` and
``"auto"`` (the engine's choice) on a grid of 1×1 stride-1 layers and on the
convolutions of the benchmark cases (:mod:`.cases`), one thread, interleaved,
process CPU time, medians. Each row reports both routes, their ratio and the
route ``auto`` takes; ``auto/best`` is 1 where it takes the faster one.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..tn import autotune, functional
from ..tn.spec import ConvSpec
from .cases import CASES
from .timing import time_interleaved

#: 1×1 stride-1 grid: (C_in, C_out, spatial side), channels growing as the
#: resolution falls (as in ResNets and factorized layers' stages).
GRID_1X1 = (
    (64, 16, 56),
    (16, 64, 56),
    (64, 64, 56),
    (128, 32, 28),
    (32, 128, 28),
    (128, 128, 28),
    (256, 64, 14),
    (64, 256, 14),
    (256, 256, 14),
    (512, 128, 7),
    (128, 512, 7),
    (512, 512, 7),
    (16, 16, 28),
)
GRID_GROUPS = (1, 4)


@dataclass
class Layer:
    """One layer to time: its spec, weight and spatial sizes."""

    name: str
    spec: ConvSpec
    weight: Tensor
    input_size: Tuple[int, ...]
    output_size: Tuple[int, ...]


def grid_layers() -> Iterator[Layer]:
    """The 1×1 stride-1 grid, dense, grouped and depthwise (with multiplier)."""
    for c_in, c_out, side in GRID_1X1:
        groups = list(GRID_GROUPS) + [min(c_in, c_out)]
        for g in groups:
            conv = nn.Conv2d(c_in, c_out, 1, groups=g, bias=False)
            yield Layer(
                f"1x1 {c_in}->{c_out} g{g} @{side}²",
                ConvSpec.from_module(conv),
                conv.weight.detach(),
                (side, side),
                (side, side),
            )


def conv_sizes(model: nn.Module, x: Tensor) -> Dict[nn.Module, Tuple[tuple, tuple]]:
    """Spatial input and output sizes of every convolution of ``model`` on ``x``."""
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    sizes: Dict[nn.Module, Tuple[tuple, tuple]] = {}

    def record(module: nn.Module, args: tuple, out: Tensor) -> None:
        sizes[module] = (tuple(args[0].shape[2:]), tuple(out.shape[2:]))

    hooks = [m.register_forward_hook(record) for m in convs]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return sizes


def case_layers() -> Iterator[Layer]:
    """Every convolution of the benchmark cases, with its input and output sizes."""
    for case in CASES.values():
        sizes = conv_sizes(case.model(), case.data(1)[0])
        for index, conv in enumerate(sizes):
            spec = ConvSpec.from_module(conv)
            yield Layer(
                f"{case.name}[{index}] {spec.describe()}",
                spec,
                conv.weight.detach(),
                *sizes[conv],
            )


@dataclass
class Row:
    """Median CPU milliseconds of both routes and of ``auto`` for one layer."""

    name: str
    vectors: int
    tn_ms: float
    torch_ms: float
    auto_ms: float
    auto_route: str

    def line(self) -> str:
        """One line of the report."""
        best = min(self.tn_ms, self.torch_ms)
        return (
            f"{self.name[:60]:60s} V={self.vectors:<3d} tn {self.tn_ms:8.2f} "
            f"torch {self.torch_ms:8.2f}  tn/torch {self.tn_ms / self.torch_ms:5.2f}"
            f"  auto={self.auto_route:5s} {self.auto_ms:8.2f}  "
            f"auto/best {self.auto_ms / best:5.2f}"
        )


def measure(layer: Layer, batch: int, vectors: int, repeats: int) -> Row:
    """Time the routes of one layer on random output gradients."""
    generator = torch.Generator().manual_seed(0)
    spec = layer.spec
    grad_output = torch.randn(
        vectors, batch, spec.out_channels, *layer.output_size, generator=generator
    )

    def run(route: str):
        return lambda: functional.input_vjp(
            spec, grad_output, layer.weight, layer.input_size, True, route=route
        )

    routes = {"tn": run("tn"), "torch": run("torch"), "auto": run("auto")}
    routes["auto"]()  # the first auto call may measure (autotune), untimed
    timings = time_interleaved(
        routes,
        cleanup=lambda: None,
        repeats=repeats,
        warmup=1,
        min_seconds=0.2,
        max_seconds=5.0,
        clock=time.process_time,
    )
    ms = {name: timings.median_ms(name) for name in routes}
    key = functional.input_vjp_key(spec, grad_output, layer.input_size, True)
    auto_route = autotune.remembered(key) or functional.input_vjp_route(spec)
    return Row(layer.name, vectors, ms["tn"], ms["torch"], ms["auto"], auto_route)


def fits(layer: Layer, batch: int, vectors: int, max_elements: int) -> bool:
    """Whether the largest operand stays below ``max_elements``."""
    channels = max(layer.spec.in_channels, layer.spec.out_channels)
    sides = max(
        torch.Size(layer.input_size).numel(), torch.Size(layer.output_size).numel()
    )
    return vectors * batch * channels * sides <= max_elements


def main(argv: Optional[List[str]] = None) -> None:
    """Command line: ``python -m tnbackpack.benchmark.input_vjp [--batch N]``."""
    parser = argparse.ArgumentParser(prog="python -m tnbackpack.benchmark.input_vjp")
    parser.add_argument("--batch", type=int, default=16, help="batch size (16)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (5)")
    parser.add_argument("--vectors", default="1,10", help="vector counts (1,10)")
    parser.add_argument("--only", choices=("grid", "cases"), help="one part only")
    parser.add_argument(
        "--policy",
        choices=("measure", "model"),
        default="measure",
        help="tnbackpack.tn.autotune.POLICY for the auto route (measure)",
    )
    parser.add_argument(
        "--windows-only",
        action="store_true",
        help="cases: only the layers whose auto route is measured (strided windows)",
    )
    parser.add_argument(
        "--max-elements", type=int, default=2**25, help="skip larger operands"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    autotune.POLICY = args.policy
    vector_counts = [int(v) for v in args.vectors.split(",")]
    parts = {"grid": grid_layers, "cases": case_layers}
    rows = []
    for part, layers in parts.items():
        if args.only not in (None, part):
            continue
        print(f"## {part} (batch {args.batch}, one thread, CPU ms, medians)")
        for layer in layers():
            for vectors in vector_counts:
                if not fits(layer, args.batch, vectors, args.max_elements):
                    continue
                if args.windows_only and not functional.input_vjp_measured(layer.spec):
                    continue
                row = measure(layer, args.batch, vectors, args.repeats)
                rows.append(row)
                print(row.line(), flush=True)
    slow = [r for r in rows if r.auto_ms > 1.2 * min(r.tn_ms, r.torch_ms)]
    print(f"auto slower than the best route by >20%: {len(slow)} of {len(rows)}")


if __name__ == "__main__":
    main()
