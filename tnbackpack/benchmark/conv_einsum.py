"""``python -m tnbackpack.benchmark --conv-einsum``: factorized 3×3 convolutions.

CP, Tucker-2 and TT layers on ResNet-34's 3×3 shapes (64 ch @ 56², 128 @ 28²,
256 @ 14², 512 @ 7²), forward + backward (gradients of the input and every
factor), one thread, interleaved rounds, medians. Variants per row:

- ``conv_einsum``: :func:`tnbackpack.conv_einsum` on the layer's string;
- ``rebuilt``: the kernel rebuilt by ``torch.einsum``, then one ``F.conv2d``;
- ``sequence``: the stage sequence tensorly-torch runs (1×1 to the rank,
  one convolution per spatial letter, 1×1 back), written with ``F.conv2d``;
- ``tltorch``: tensorly-torch's ``FactorizedConv`` itself (its default
  ``factorized`` implementation; for CP also ``mobilenet``, which merges the
  spatial factors into one depthwise 3×3 kernel), holding the same factors.

Every variant's output is checked against ``rebuilt`` before timing. FLOPs:
``est_gflop`` is conv_einsum's own estimate (forward + backward, from
:func:`tnbackpack.conv_einsum_path`), ``counted_gflop`` what PyTorch's
``FlopCounterMode`` counts for the same run.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def time_both(
    variants: Dict[str, Callable[[], None]],
    cleanup: Callable[[], None],
    repeats: int,
    max_seconds: float,
) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Median CPU and wall milliseconds per variant, interleaved round-robin.

    One warm-up round, then rounds with the order rotated, until ``repeats``
    rounds or ``max_seconds`` (at least 3 rounds). The process's CPU time is
    the headline: with one thread it is the work done, which other processes
    time-slicing the machine do not inflate (they still share caches and
    memory bandwidth); wall time is recorded beside it.
    """
    names = list(variants)
    cpu: Dict[str, List[float]] = {n: [] for n in names}
    wall: Dict[str, List[float]] = {n: [] for n in names}
    for name in names:
        variants[name]()
        cleanup()
    start = time.perf_counter()
    for index in range(repeats):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            c0, w0 = time.process_time(), time.perf_counter()
            variants[name]()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
            cleanup()
        if index >= 2 and time.perf_counter() - start > max_seconds:
            break
    return (
        {n: 1e3 * statistics.median(v) for n, v in cpu.items()},
        {n: 1e3 * statistics.median(v) for n, v in wall.items()},
    )


#: ResNet-34's 3×3 layers: (channels, spatial size).
SHAPES = ((64, 56), (128, 28), (256, 14), (512, 7))
QUICK_SHAPES = ((16, 14),)

#: Factorization -> (conv_einsum string, kernel rebuild string, ranks as
#: fractions of the channel count).
FACTORIZATIONS = {
    "cp": ("nchw,rc,rh,rw,or->nohw|hw", "rc,rh,rw,or->ochw", (0.25, 1.0)),
    "tucker2": ("nchw,ca,abhw,ob->nohw|hw", "ca,abhw,ob->ochw", (0.25, 0.5)),
    "tt": ("nchw,ca,ahb,bwd,do->nohw|hw", "ca,ahb,bwd,do->ochw", (0.25, 0.5)),
}


def factor_shapes(name: str, channels: int, rank: int) -> List[Tuple[int, ...]]:
    """Shapes of the factors (input channels = output channels = ``channels``)."""
    c, r = channels, rank
    return {
        "cp": [(r, c), (r, 3), (r, 3), (c, r)],
        "tucker2": [(c, r), (r, r, 3, 3), (c, r)],
        "tt": [(c, r), (r, 3, r), (r, 3, r), (r, c)],
    }[name]


def sequence(name: str, x: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """tensorly-torch's stage sequence, with plain ``F.conv2d`` calls."""
    if name == "cp":
        a, kh, kw, b = factors
        r = a.shape[0]
        z = F.conv2d(x, a[:, :, None, None])
        z = F.conv2d(z, kh[:, None, :, None], padding=(1, 0), groups=r)
        z = F.conv2d(z, kw[:, None, None, :], padding=(0, 1), groups=r)
        return F.conv2d(z, b[:, :, None, None])
    if name == "tucker2":
        a, core, b = factors
        z = F.conv2d(x, a.t()[:, :, None, None])
        z = F.conv2d(z, core.transpose(0, 1), padding=1)
        return F.conv2d(z, b[:, :, None, None])
    a, gh, gw, b = factors
    z = F.conv2d(x, a.t()[:, :, None, None])
    z = F.conv2d(z, gh.permute(2, 0, 1)[:, :, :, None], padding=(1, 0))
    z = F.conv2d(z, gw.permute(2, 0, 1)[:, :, None, :], padding=(0, 1))
    return F.conv2d(z, b.t()[:, :, None, None])


def tltorch_layer(name: str, channels: int, rank: int, factors, implementation: str):
    """tensorly-torch's FactorizedConv holding ``factors`` (None if not installed)."""
    try:
        import tltorch
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "cp":
            layer = tltorch.FactorizedConv(
                channels, channels, 3, order=2, factorization="cp", rank=rank,
                padding=1, implementation=implementation,
            )  # fmt: skip
            a, kh, kw, b = factors
            values = {"weights": torch.ones(rank), "factor_0": b, "factor_1": a.t(),
                      "factor_2": kh.t(), "factor_3": kw.t()}  # fmt: skip
        elif name == "tucker2":
            layer = tltorch.FactorizedConv(
                channels, channels, 3, order=2, factorization="tucker",
                rank=(rank, rank, 3, 3), fixed_rank_modes="spatial", padding=1,
            )  # fmt: skip
            a, core, b = factors
            values = {"core": core.transpose(0, 1), "factor_0": b, "factor_1": a,
                      "factor_2": torch.eye(3), "factor_3": torch.eye(3)}  # fmt: skip
        else:
            layer = tltorch.FactorizedConv(
                channels, channels, 3, order=2, factorization="tt",
                rank=(1, rank, rank, rank, 1), padding=1,
            )  # fmt: skip
            a, gh, gw, b = factors
            values = {"factor_0": a[None], "factor_1": gh, "factor_2": gw,
                      "factor_3": b[:, :, None]}  # fmt: skip
    with torch.no_grad():
        for pname, param in layer.named_parameters():
            param.copy_(values[pname.split(".")[-1]].reshape(param.shape))
    return layer


@dataclass
class Row:
    """One benchmark row."""

    layer: str
    factorization: str
    rank: int
    ms: Dict[str, Optional[float]]
    est_gflop: float
    counted_gflop: Dict[str, float]
    plan: str
    check: str
    wall_ms: Dict[str, float]

    @property
    def best_baseline(self) -> Tuple[str, float]:
        """Fastest baseline (name, ms)."""
        options = [(k, v) for k, v in self.ms.items() if k != "conv_einsum" and v]
        return min(options, key=lambda kv: kv[1])

    @property
    def speedup(self) -> float:
        """Best baseline's time over conv_einsum's."""
        return self.best_baseline[1] / self.ms["conv_einsum"]


def _convolution_backward_flops(
    grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
    transposed, _output_padding, _groups, output_mask, out_shape=None, **_kwargs,
) -> int:  # fmt: skip
    """FLOPs of ``aten.convolution_backward``, groups included.

    PyTorch's own formula counts a grouped weight gradient as if the
    convolution were dense (a depthwise 3×3 weight gradient of a
    ``32×64×56×56`` input: 7.4 GFLOP instead of 0.12). Each requested gradient
    costs what the forward costs: ``2·N·w[0]·w[1]·K·positions``, positions of
    the output (of the input for a transposed convolution).
    """
    positions = math.prod((x_shape if transposed else grad_out_shape)[2:])
    forward = 2 * x_shape[0] * math.prod(w_shape) * positions
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def _counted_gflop(function: Callable[[], None]) -> float:
    """GFLOP counted by ``FlopCounterMode`` (grouped weight gradients fixed)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(
        display=False,
        custom_mapping={
            torch.ops.aten.convolution_backward: _convolution_backward_flops
        },
    )
    with counter:
        function()
    return counter.get_total_flops() / 1e9


def _backward_route(equation: str, x: Tensor, factors: Sequence[Tensor]) -> str:
    """The gradient route conv_einsum took here (measured on its first call)."""
    from ..tn.conv_einsum import function
    from ..tn.conv_einsum.api import _prepare

    shapes = [tuple(t.shape) for t in (x, *factors)]
    network, _ = _prepare(equation, shapes, 1, 1, 1, "zeros", "auto")
    return function.backward_route(network, [x, *factors])


def measure_row(
    name: str, channels: int, size: int, rank: int, batch: int, repeats: int,
    max_seconds: float, log: Callable[[str], None],
) -> Row:  # fmt: skip
    """Check and time every variant of one layer."""
    from ..tn.conv_einsum import conv_einsum, conv_einsum_path

    equation, rebuild, _ = FACTORIZATIONS[name]
    generator = torch.Generator().manual_seed(0)
    shapes = factor_shapes(name, channels, rank)
    # factors scaled so that the rebuilt kernel has He-like variance
    scale = (2.0 / (9 * channels)) ** (1 / (2 * len(shapes))) / max(rank, 1) ** (
        1 / (2 * len(shapes))
    )
    factors = [
        (torch.randn(s, generator=generator) * scale).requires_grad_(True)
        for s in shapes
    ]
    x = torch.randn(batch, channels, size, size, generator=generator).requires_grad_(
        True
    )
    grad = torch.randn(batch, channels, size, size, generator=generator)
    variants: Dict[str, Callable[[], Tensor]] = {
        "conv_einsum": lambda: conv_einsum(equation, x, *factors, padding=1),
        "rebuilt": lambda: F.conv2d(x, torch.einsum(rebuild, *factors), padding=1),
        "sequence": lambda: sequence(name, x, factors),
    }
    implementations = ("factorized", "mobilenet") if name == "cp" else ("factorized",)
    layers = []
    for implementation in implementations:
        layer = tltorch_layer(
            name, channels, rank, [f.detach() for f in factors], implementation
        )
        if layer is not None:
            layers.append(layer)
            suffix = "" if implementation == "factorized" else f"({implementation})"
            variants[f"tltorch{suffix}"] = lambda layer=layer: layer(x)
    reference = variants["rebuilt"]().detach()
    problems = []
    for vname, function in variants.items():
        with torch.no_grad():
            error = (function() - reference).abs().max() / reference.abs().max()
        if error > 1e-4:
            problems.append(f"{vname} {error:.1e}")
    check = "ok" if not problems else "; ".join(problems)

    def step(function):
        def run():
            function().backward(grad)

        return run

    def cleanup():
        x.grad = None
        for f in factors:
            f.grad = None
        for layer in layers:
            layer.zero_grad(set_to_none=True)

    for function in variants.values():  # first calls plan and measure routes
        step(function)()
        cleanup()
    counted = {
        vname: _counted_gflop(step(function)) for vname, function in variants.items()
    }
    cleanup()
    cpu, wall = time_both(
        {vname: step(function) for vname, function in variants.items()},
        cleanup, repeats, max_seconds,
    )  # fmt: skip
    _, info = conv_einsum_path(equation, tuple(x.shape), *map(tuple, shapes), padding=1)
    estimated = (info.flops + info.backward_flops) / 1e9
    plan = " / ".join(
        "+".join(step.operands) + ":" + step.method for step in info.forward
    )
    plan += f"; backward: {_backward_route(equation, x, factors)}"
    row = Row(
        f"{channels}@{size}²", name, rank, cpu, estimated, counted, plan, check, wall
    )
    ms = cpu
    log(
        f"{row.layer:>8} {name:>8} R={rank:<4} "
        + " ".join(f"{k}={v:.1f}" for k, v in ms.items() if v)
        + f"  speedup {row.speedup:.2f}x vs {row.best_baseline[0]}  [{check}]"
    )
    return row


COLUMNS = ("conv_einsum", "rebuilt", "sequence", "tltorch", "tltorch(mobilenet)")


def write(rows: List[Row], output: Path, batch: int, threads: int) -> None:
    """CSV and markdown table."""
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["layer", "factorization", "rank"] + [f"{c}_ms" for c in COLUMNS]
            + ["best_baseline", "speedup", "est_gflop"]
            + [f"{c}_counted_gflop" for c in COLUMNS] + ["plan", "check"]
            + [f"{c}_wall_ms" for c in COLUMNS]
        )  # fmt: skip
        for row in rows:
            writer.writerow(
                [row.layer, row.factorization, row.rank]
                + [_fmt(row.ms.get(c)) for c in COLUMNS]
                + [row.best_baseline[0], f"{row.speedup:.3f}", f"{row.est_gflop:.3f}"]
                + [_fmt(row.counted_gflop.get(c)) for c in COLUMNS]
                + [row.plan, row.check]
                + [_fmt(row.wall_ms.get(c)) for c in COLUMNS]
            )  # fmt: skip
    speedups = [row.speedup for row in rows]
    geo = math.exp(statistics.mean(math.log(s) for s in speedups))
    lines = [
        f"Forward + backward (input and all factors), batch {batch}, {threads} "
        f"thread(s), float32; medians of interleaved rounds of the process's CPU "
        f"time in ms (wall times in results.csv). "
        f"Speedup = best baseline / conv_einsum. GFLOP of forward + backward: "
        f"conv_einsum's estimate (est), PyTorch's FlopCounterMode count of the "
        f"same run (counted; grouped weight gradients counted with their groups) "
        f"and the count of the best baseline's run (best).",
        "",
        "| layer | factorization | rank | conv_einsum | rebuilt | sequence | tltorch "
        "| tltorch (mobilenet) | speedup | GFLOP est / counted / best | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [_fmt(row.ms.get(c), 1) or "–" for c in COLUMNS]
        lines.append(
            f"| {row.layer} | {row.factorization} | {row.rank} | "
            + " | ".join(cells)
            + f" | **{row.speedup:.2f}×** vs {row.best_baseline[0]} | "
            f"{row.est_gflop:.2f} / {row.counted_gflop['conv_einsum']:.2f} / "
            f"{row.counted_gflop[row.best_baseline[0]]:.2f} | {row.check} |"
        )
    lines += [
        "",
        f"Geometric mean speedup over the best baseline per row: **{geo:.2f}×**; "
        f"slowest row {min(speedups):.2f}×, fastest {max(speedups):.2f}×.",
        "",
        "Plans (forward steps; operands 0 = x, then the factors in string order; "
        "the gradient route, planned or recorded, measured on the first call):",
        "",
    ]
    for row in rows:
        lines.append(f"- {row.layer} {row.factorization} R={row.rank}: `{row.plan}`")
    (output / "table.md").write_text("\n".join(lines) + "\n")


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def run_conv_einsum(
    quick: bool = False,
    batch: int = 32,
    threads: int = 1,
    repeats: int = 5,
    max_seconds: float = 6.0,
    output: Optional[Path] = None,
    factorizations: Sequence[str] = tuple(FACTORIZATIONS),
    log: Callable[[str], None] = print,
) -> List[Row]:
    """Run the benchmark; write ``results.csv`` and ``table.md``."""
    torch.set_num_threads(threads)
    shapes = QUICK_SHAPES if quick else SHAPES
    rows = []
    for channels, size in shapes:
        for name in factorizations:
            for fraction in FACTORIZATIONS[name][2]:
                rank = max(1, int(channels * fraction))
                rows.append(
                    measure_row(
                        name, channels, size, rank, batch, repeats, max_seconds, log
                    )
                )
    output = output or Path("docs/benchmarks/conv_einsum" + ("/quick" if quick else ""))
    write(rows, output, batch, threads)
    log(f"wrote {output}/results.csv and table.md")
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m tnbackpack.benchmark --conv-einsum [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m tnbackpack.benchmark --conv-einsum"
    )
    parser.add_argument(
        "--quick", action="store_true", help="one small layer (16 ch @ 14²)"
    )
    parser.add_argument("--batch", type=int, default=32, help="batch size (32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--repeats", type=int, default=7, help="measured rounds (7)")
    parser.add_argument(
        "--max-seconds", type=float, default=8.0,
        help="stop a row's rounds after this many seconds, at least 3 rounds (8)",
    )  # fmt: skip
    parser.add_argument(
        "--factorizations", default=",".join(FACTORIZATIONS),
        help=f"comma list of: {','.join(FACTORIZATIONS)}",
    )  # fmt: skip
    parser.add_argument(
        "--output",
        type=Path,
        help="output directory (docs/benchmarks/conv_einsum[/quick])",
    )
    args = parser.parse_args(argv)
    names = tuple(n.strip() for n in args.factorizations.split(",") if n.strip())
    unknown = [n for n in names if n not in FACTORIZATIONS]
    if unknown:
        raise SystemExit(
            f"unknown factorizations {unknown}; choose from {list(FACTORIZATIONS)}"
        )
    run_conv_einsum(
        quick=args.quick, batch=args.batch, threads=args.threads, repeats=args.repeats,
        max_seconds=args.max_seconds, output=args.output, factorizations=names,
    )  # fmt: skip
