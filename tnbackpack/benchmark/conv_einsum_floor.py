"""``python -m tnbackpack.benchmark.conv_einsum_floor``: how fast could a row be?

For the rows of ``python -m tnbackpack.benchmark --conv-einsum``, this times,
side by side and interleaved (CPU-time medians, one thread):

- ``conv_einsum`` and ``sequence`` (tensorly-torch's stage sequence written
  with ``F.conv2d``, the best baseline on the small-spatial rows), forward +
  backward as in the main benchmark;
- ``channels_last``: conv_einsum with its ``nchw`` layout policy switched off
  (``evaluate.NCHW_MAX_POSITIONS = 0``: channels-last intermediates and
  matrix-product routes on every layer, the behaviour before that policy);
- ``floor``: only the matrix products no evaluation order avoids, each as one
  ``torch.mm`` on contiguous, already channels-last matrices: for each
  channel map (``C→R`` and ``R→C``) its forward, input-gradient and
  weight-gradient products; for the middle (Tucker-2 core, each TT core) the
  same three products of its unfolded (``im2col``) form, without building
  the unfolding; for CP the depthwise 3×3 convolution and its backward. No
  layout change, no copy, no Python: a floor for any plan with the planner's
  FLOPs (which equal the best baseline's, see ``GFLOP`` in the main table).

``sequence / floor`` bounds the speedup over the stage sequence that any
evaluation order with these FLOPs could reach on this machine's BLAS.
"""

from __future__ import annotations

import argparse
import csv
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

#: The rows where conv_einsum lost in the committed table: 14² and 7².
DEFAULT_SHAPES = SHAPES[2:]


def floor_products(
    name: str, channels: int, size: int, rank: int, batch: int
) -> Callable[[], None]:
    """The unavoidable products of one forward + backward, as plain kernels."""
    positions = batch * size * size
    signal = torch.randn(positions, channels)
    maps = torch.randn(channels, rank)
    reduced = torch.randn(positions, rank)

    def channel_maps() -> None:
        for _ in range(2):  # C→R first, R→C last: same shapes, roles swapped
            signal @ maps  # forward
            reduced @ maps.t()  # input gradient
            signal.t() @ reduced  # weight gradient

    if name == "cp":
        z = torch.randn(batch, rank, size, size)
        kernel = torch.randn(rank, 1, 3, 3)

        def middle() -> None:
            F.conv2d(z, kernel, padding=1, groups=rank)
            torch.ops.aten.convolution_backward(
                z, z, kernel, None, [1, 1], [1, 1], [1, 1], False, [0, 0], rank,
                [True, True, False],
            )  # fmt: skip

    else:
        taps, cores = (9, 1) if name == "tucker2" else (3, 2)
        unfolded = torch.randn(positions, taps * rank)
        core = torch.randn(taps * rank, rank)

        def middle() -> None:
            for _ in range(cores):
                unfolded @ core
                reduced @ core.t()
                unfolded.t() @ reduced

    def run() -> None:
        channel_maps()
        middle()

    return run


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
        "floor": floor_products(name, channels, size, rank, batch),
    }
    for variant in ("conv_einsum", "channels_last"):  # plan, measure routes
        variants[variant]()
        cleanup()
    cpu, _ = time_both(variants, cleanup, repeats, max_seconds)
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
                    + " ".join(f"{k}={v:.1f}" for k, v in ms.items())
                    + f"  sequence/floor {ms['sequence'] / ms['floor']:.2f}x"
                    + f"  sequence/ce {ms['sequence'] / ms['conv_einsum']:.2f}x"
                )
    if output is not None:
        _write(rows, output, batch)
        log(f"wrote {output}/floor.csv and floor.md")
    return rows


def _write(rows: List[Dict[str, object]], output: Path, batch: int) -> None:
    output.mkdir(parents=True, exist_ok=True)
    columns = ["layer", "factorization", "rank", "conv_einsum", "channels_last",
               "sequence", "floor"]  # fmt: skip
    with open(output / "floor.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row[c] for c in columns])
    lines = [
        f"Forward + backward, batch {batch}, 1 thread, float32; medians of "
        f"interleaved rounds of the process's CPU time in ms. `floor`: the "
        f"unavoidable matrix products alone as contiguous `torch.mm` calls; "
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
    (output / "floor.md").write_text("\n".join(lines) + "\n")


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m tnbackpack.benchmark.conv_einsum_floor [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m tnbackpack.benchmark.conv_einsum_floor"
    )
    parser.add_argument("--quick", action="store_true", help="16 ch @ 14², batch 4")
    parser.add_argument("--all", action="store_true", help="all four ResNet shapes")
    parser.add_argument("--repeats", type=int, default=21, help="rounds (21)")
    parser.add_argument("--max-seconds", type=float, default=20.0)
    parser.add_argument(
        "--output", type=Path, default=Path("docs/benchmarks/conv_einsum"),
        help="directory for floor.csv and floor.md (docs/benchmarks/conv_einsum)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES if args.all else DEFAULT_SHAPES
    run_floor(
        shapes, batch=4 if args.quick else 32, repeats=args.repeats,
        max_seconds=args.max_seconds, output=args.output,
    )  # fmt: skip


if __name__ == "__main__":
    main()
