"""``python -m tnbackpack.benchmark.conv_einsum_floor``: how fast could a row be?

For the rows of ``python -m tnbackpack.benchmark --conv-einsum``, this times,
side by side and interleaved (CPU-time medians, one thread):

- ``conv_einsum`` and ``sequence`` (tensorly-torch's stage sequence written
  with ``F.conv2d``, the best baseline on the small-spatial rows), forward +
  backward as in the main benchmark;
- ``channels_last``: conv_einsum with its ``nchw`` layout policy switched off
  (``evaluate.NCHW_MAX_POSITIONS = 0``: channels-last intermediates and
  matrix-product routes on every layer, the behaviour before that policy);
- ``floor``: only the products no evaluation order avoids, each group by
  the faster of two of PyTorch's kernels for it (:func:`floor_parts`): for
  each channel map (``C→R`` and ``R→C``) its forward, input-gradient and
  weight-gradient products as contiguous ``torch.mm`` or as a 1×1
  convolution with its fused backward; for the middle (Tucker-2 core, each
  TT core) the same three products of its unfolded (``im2col``) form,
  without building the unfolding, or the convolution with its fused
  backward; for CP the depthwise 3×3 convolution and its backward. No layout
  change, no copy, no Python: a floor for any plan with the planner's FLOPs
  (which equal the best baseline's, see ``GFLOP`` in the main table).

``sequence / floor`` bounds the speedup over the stage sequence that any
evaluation order with these FLOPs could reach on this machine's kernels, and
its geometric mean over the rows bounds the main table's geometric-mean
speedup (whose per-row baseline is at most as slow as the sequence).
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .conv_einsum import (
    FACTORIZATIONS,
    QUICK_SHAPES,
    SHAPES,
    factor_shapes,
    sequence,
    time_both,
)

#: The four ResNet-34 shapes of the main table.
DEFAULT_SHAPES = SHAPES
#: Timed columns of the table (``floor`` from the ``*_mm``/``*_conv`` parts).
COLUMNS = ("conv_einsum", "channels_last", "sequence", "maps_mm", "maps_conv",
           "middle_mm", "middle_conv", "floor")  # fmt: skip


def floor_parts(
    name: str, channels: int, size: int, rank: int, batch: int
) -> Dict[str, Callable[[], None]]:
    """The unavoidable products of one forward + backward, two kernels each.

    ``maps_mm`` / ``maps_conv``: the two channel maps (``C→R``, ``R→C``),
    each its forward, input-gradient and weight-gradient product, as
    contiguous ``torch.mm`` or as PyTorch's 1×1 convolution and its fused
    backward (``nchw``). ``middle_mm`` / ``middle_conv``: the Tucker-2 core
    or the two TT cores as products of their unfolded (``im2col``) form
    (without building it) or as the convolution and its fused backward; CP's
    depthwise 3×3 convolution and backward (one kernel, in both). No layout
    change, no copy, no Python glue.
    """
    positions = batch * size * size
    signal = torch.randn(positions, channels)
    maps = torch.randn(channels, rank)
    reduced = torch.randn(positions, rank)
    x = torch.randn(batch, channels, size, size)
    z = torch.randn(batch, rank, size, size)
    one_by_one = torch.randn(rank, channels, 1, 1)
    back = torch.randn(channels, rank, 1, 1)

    def conv_step(inp, weight, grad, padding, groups=1):
        F.conv2d(inp, weight, padding=padding, groups=groups)
        torch.ops.aten.convolution_backward(
            grad, inp, weight, None, [1, 1], list(padding), [1, 1], False,
            [0, 0], groups, [True, True, False],
        )  # fmt: skip

    def maps_mm() -> None:
        for _ in range(2):  # C→R first, R→C last: same shapes, roles swapped
            signal @ maps  # forward
            reduced @ maps.t()  # input gradient
            signal.t() @ reduced  # weight gradient

    def maps_conv() -> None:
        conv_step(x, one_by_one, z, (0, 0))
        conv_step(z, back, x, (0, 0))

    parts = {"maps_mm": maps_mm, "maps_conv": maps_conv}
    if name == "cp":
        kernel = torch.randn(rank, 1, 3, 3)

        def depthwise() -> None:
            conv_step(z, kernel, z, (1, 1), groups=rank)

        parts.update(middle_mm=depthwise, middle_conv=depthwise)
        return parts
    taps, cores = (9, 1) if name == "tucker2" else (3, 2)
    unfolded = torch.randn(positions, taps * rank)
    core = torch.randn(taps * rank, rank)
    kernels = (
        [(torch.randn(rank, rank, 3, 3), (1, 1))]
        if name == "tucker2"
        else [(torch.randn(rank, rank, 3, 1), (1, 0)),
              (torch.randn(rank, rank, 1, 3), (0, 1))]
    )  # fmt: skip

    def middle_mm() -> None:
        for _ in range(cores):
            unfolded @ core
            reduced @ core.t()
            unfolded.t() @ reduced

    def middle_conv() -> None:
        for weight, padding in kernels:
            conv_step(z, weight, z, padding)

    parts.update(middle_mm=middle_mm, middle_conv=middle_conv)
    return parts


def floor_of(ms: Dict[str, float]) -> float:
    """The floor: per product group the faster kernel, summed."""
    return min(ms["maps_mm"], ms["maps_conv"]) + min(ms["middle_mm"], ms["middle_conv"])


def measure(
    name: str, channels: int, size: int, rank: int, batch: int, repeats: int,
    max_seconds: float,
) -> Dict[str, float]:  # fmt: skip
    """CPU milliseconds of ``conv_einsum``, ``sequence`` and ``floor`` for one row."""
    from ..tn.conv_einsum import conv_einsum, evaluate

    equation = FACTORIZATIONS[name][0]
    generator = torch.Generator().manual_seed(0)
    factors = [
        (0.3 * torch.randn(s, generator=generator)).requires_grad_()
        for s in factor_shapes(name, channels, rank)
    ]
    x = torch.randn(batch, channels, size, size, generator=generator)
    x.requires_grad_(True)
    grad = torch.randn(batch, channels, size, size, generator=generator)

    def cleanup() -> None:
        x.grad = None
        for factor in factors:
            factor.grad = None

    default = evaluate.NCHW_MAX_POSITIONS

    def einsum(limit: int) -> Callable[[], None]:
        def run() -> None:
            evaluate.NCHW_MAX_POSITIONS = limit
            try:
                conv_einsum(equation, x, *factors, padding=1).backward(grad)
            finally:
                evaluate.NCHW_MAX_POSITIONS = default

        return run

    variants = {
        "conv_einsum": einsum(default),
        "channels_last": einsum(0),
        "sequence": lambda: sequence(name, x, factors).backward(grad),
        **floor_parts(name, channels, size, rank, batch),
    }
    for variant in ("conv_einsum", "channels_last"):  # plan, measure routes
        variants[variant]()
        cleanup()
    cpu, _ = time_both(variants, cleanup, repeats, max_seconds)
    cpu["floor"] = floor_of(cpu)
    return cpu


def run_floor(
    shapes: Sequence[Tuple[int, int]] = DEFAULT_SHAPES,
    factorizations: Sequence[str] = tuple(FACTORIZATIONS),
    batch: int = 32,
    repeats: int = 21,
    max_seconds: float = 20.0,
    output: Optional[Path] = None,
    log: Callable[[str], None] = print,
) -> List[Dict[str, object]]:
    """Measure every row; write ``floor.csv`` and ``floor.md`` to ``output``."""
    torch.set_num_threads(1)
    rows = []
    for channels, size in shapes:
        for name in factorizations:
            for fraction in FACTORIZATIONS[name][2]:
                rank = max(1, int(channels * fraction))
                ms = measure(name, channels, size, rank, batch, repeats, max_seconds)
                row = {"layer": f"{channels}@{size}²", "factorization": name,
                       "rank": rank, **ms}  # fmt: skip
                rows.append(row)
                log(
                    f"{row['layer']:>8} {name:>8} R={rank:<4} "
                    + " ".join(f"{k}={v:.1f}" for k, v in ms.items() if k in COLUMNS)
                    + f"  sequence/floor {ms['sequence'] / ms['floor']:.2f}x"
                    + f"  sequence/ce {ms['sequence'] / ms['conv_einsum']:.2f}x"
                )
    log(bound_sentence(rows))
    if output is not None:
        _write(rows, output, batch)
        log(f"wrote {output}/floor.csv and floor.md")
    return rows


def _write(rows: List[Dict[str, object]], output: Path, batch: int) -> None:
    output.mkdir(parents=True, exist_ok=True)
    columns = ["layer", "factorization", "rank", *COLUMNS]
    with open(output / "floor.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row[c] for c in columns])
    lines = [
        f"Forward + backward, batch {batch}, 1 thread, float32; medians of "
        f"interleaved rounds of the process's CPU time in ms. `floor`: the "
        f"unavoidable products alone, each group (channel maps, middle) by the "
        f"faster of `torch.mm` and PyTorch's convolution kernels (parts in "
        f"floor.csv); "
        f"`channels_last`: conv_einsum without its nchw layout policy "
        f"(module docstring of `tnbackpack.benchmark.conv_einsum_floor`).",
        "",
        "| layer | factorization | rank | conv_einsum | channels_last | sequence "
        "| floor | sequence / floor | sequence / conv_einsum "
        "| sequence / channels_last |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['layer']} | {row['factorization']} | {row['rank']} | "
            f"{row['conv_einsum']:.1f} | {row['channels_last']:.1f} | "
            f"{row['sequence']:.1f} | {row['floor']:.1f} "
            f"| {row['sequence'] / row['floor']:.2f}× "
            f"| {row['sequence'] / row['conv_einsum']:.2f}× "
            f"| {row['sequence'] / row['channels_last']:.2f}× |"
        )
    lines += ["", bound_sentence(rows)]
    (output / "floor.md").write_text("\n".join(lines) + "\n")


def geometric_mean(values: Sequence[float]) -> float:
    """``(Π v)^(1/n)``."""
    return math.exp(sum(math.log(v) for v in values) / len(values))


def bound_sentence(rows: List[Dict[str, object]]) -> str:
    """The geometric mean of ``sequence / floor``: a bound on any plan's mean speedup.

    A row's best baseline is at most as slow as the sequence, and no plan
    with these FLOPs runs faster than the floor, so no evaluation can beat
    the best baselines by more than this on average. The floor is measured
    too: the sentence adds the bound with each row's floor replaced by
    conv_einsum's own time where that came out lower, and with every floor
    10% lower.
    """
    bound = geometric_mean([r["sequence"] / r["floor"] for r in rows])
    lowest = geometric_mean(
        [
            r["sequence"] / min(r["floor"], r["conv_einsum"], r["channels_last"])
            for r in rows
        ]
    )
    lower = geometric_mean([r["sequence"] / (0.9 * r["floor"]) for r in rows])
    return (
        f"Geometric mean of sequence / floor over these {len(rows)} rows: "
        f"**{bound:.2f}×** ({lowest:.2f}× with a row's floor replaced by "
        f"conv_einsum's time where that was lower; {lower:.2f}× with every "
        f"floor 10% lower). The best baseline of a row is at most as slow as the "
        f"sequence and no plan with the planner's FLOPs runs below the floor, so "
        f"this bounds the geometric-mean speedup over the best baselines any "
        f"evaluation order could reach here."
    )


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m tnbackpack.benchmark.conv_einsum_floor [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m tnbackpack.benchmark.conv_einsum_floor"
    )
    parser.add_argument("--quick", action="store_true", help="16 ch @ 14², batch 4")
    parser.add_argument("--repeats", type=int, default=21, help="rounds (21)")
    parser.add_argument("--max-seconds", type=float, default=20.0)
    parser.add_argument(
        "--output", type=Path, default=Path("docs/benchmarks/conv_einsum"),
        help="directory for floor.csv and floor.md (docs/benchmarks/conv_einsum)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else DEFAULT_SHAPES
    run_floor(
        shapes, batch=4 if args.quick else 32, repeats=args.repeats,
        max_seconds=args.max_seconds, output=args.output,
    )  # fmt: skip


if __name__ == "__main__":
    main()
