"""``python -m tnbackpack.benchmark --randomized``: TN dropout vs exact and masked.

Times the backward pass of a *first* layer (the input needs no gradient, so
the backward pass is the weight gradient, plus the bias's) on reference
layers, one thread, interleaved, medians:

- ``exact``: PyTorch's own convolution backward;
- ``sampled``: :class:`tnbackpack.randomized.SampledConv` with ``sample="spatial"``
  (keep ``1`` is the plain layer);
- ``masked``: the same estimator as randomized-autodiff code computes it: the
  forward pass stores the whole input multiplied by the 0/1 mask (over the
  keep probability), the backward pass runs PyTorch's weight-gradient kernel
  on it. Same distribution of kept positions, same result, no saving.

Besides time, it records the bytes autograd saves for backward (through
``torch.autograd.graph.saved_tensors_hooks``) relative to the plain layer.
Outputs ``results.csv`` and ``table.md`` in the output directory.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..randomized import SampledConv
from ..randomized.sampling import draw
from ..tn import functional
from ..tn.spec import ConvSpec

KEEPS = (1.0, 0.5, 0.25, 0.1)

#: name -> (description, layer builder, input shape of one sample)
LAYERS: Dict[str, Tuple[str, Callable[[], nn.Module], Tuple[int, ...]]] = {
    "resnet18_3x3": (
        "ResNet-18 conv 3x3 64->64, pad 1, no bias (32x32)",
        lambda: nn.Conv2d(64, 64, 3, padding=1, bias=False),
        (64, 32, 32),
    ),
    "allcnnc_conv1": (
        "All-CNN-C conv1 3x3 3->96, pad 1 (32x32)",
        lambda: nn.Conv2d(3, 96, 3, padding=1),
        (3, 32, 32),
    ),
    "allcnnc_conv2": (
        "All-CNN-C conv2 3x3 96->96, pad 1 (32x32)",
        lambda: nn.Conv2d(96, 96, 3, padding=1),
        (96, 32, 32),
    ),
    "allcnnc_conv3": (
        "All-CNN-C conv3 3x3/2 96->96, pad 1 (32x32)",
        lambda: nn.Conv2d(96, 96, 3, stride=2, padding=1),
        (96, 32, 32),
    ),
    "allcnnc_conv5": (
        "All-CNN-C conv5 3x3 192->192, pad 1 (8x8)",
        lambda: nn.Conv2d(192, 192, 3, padding=1),
        (192, 8, 8),
    ),
}


class MaskedConvolution(torch.autograd.Function):
    """The masking baseline: stores ``mask · x / p`` in full, exact kernel on it."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor], conv, mask, p
    ) -> Tensor:
        """The layer's output; saves the whole masked input."""
        ctx.spec, ctx.has_bias = ConvSpec.from_module(conv), bias is not None
        ctx.save_for_backward(x * mask / p)
        return conv._conv_forward(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor):
        """PyTorch's weight-gradient kernel on the masked input."""
        (masked,) = ctx.saved_tensors
        grad_weight = functional.weight_vjp(
            ctx.spec, masked, grad_output, route="torch"
        )
        grad_bias = None
        if ctx.has_bias:
            grad_bias = grad_output.sum(dim=(0, *range(2, grad_output.ndim)))
        return None, grad_weight, grad_bias, None, None, None


class MaskedConv(nn.Module):
    """``conv`` whose backward pass is the masking implementation of the estimator."""

    def __init__(self, conv: nn.Module, keep: float, generator: torch.Generator):
        super().__init__()
        self.conv, self.keep, self.generator = conv, keep, generator
        self.spec = ConvSpec.from_module(conv)

    def forward(self, x: Tensor) -> Tensor:
        """Same draws as :class:`SampledConv`, applied as a dense mask."""
        sample = draw(
            self.spec, x.shape, self.keep, "spatial", self.generator, x.device
        )
        mask = torch.ones((), dtype=x.dtype, device=x.device)
        for d, kept in enumerate(sample.kept):
            axis = torch.zeros(x.shape[2 + d], dtype=x.dtype, device=x.device)
            axis[kept] = 1
            mask = mask * axis.view(-1, *([1] * (self.spec.ndim - 1 - d)))
        conv = self.conv
        return MaskedConvolution.apply(
            x, conv.weight, conv.bias, conv, mask, sample.probability
        )


@dataclass
class Measurement:
    """One (layer, variant, keep) result."""

    layer: str
    variant: str
    keep: float
    backward_ms: float
    exact_ms: float
    stored_fraction: float

    @property
    def ratio(self) -> float:
        """Backward time over the exact backward's (same rounds)."""
        return self.backward_ms / self.exact_ms


def saved_bytes(module: nn.Module, x: Tensor) -> int:
    """Bytes of the non-parameter tensors autograd saves in ``module(x)``."""
    params = {p.data_ptr() for p in module.parameters()}
    total = 0

    def pack(tensor: Tensor) -> Tensor:
        nonlocal total
        if tensor.data_ptr() not in params:
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return total


def measure_layer(
    name: str, batch: int, keeps: Sequence[float], repeats: int, seed: int = 0
) -> List[Measurement]:
    """Interleaved backward times and stored bytes of every variant on one layer."""
    _, build, shape = LAYERS[name]
    torch.manual_seed(seed)
    conv = build()
    x = torch.randn(batch, *shape)  # a first layer: no gradient for the input
    grad_output = torch.randn_like(conv(x))
    generator = torch.Generator().manual_seed(seed)
    variants: Dict[Tuple[str, float], nn.Module] = {("exact", 1.0): conv}
    for keep in keeps:
        if keep < 1:
            variants[("sampled", keep)] = SampledConv(conv, keep, "spatial", generator)
        variants[("masked", keep)] = MaskedConv(conv, keep, generator)
    exact_bytes = saved_bytes(conv, x)
    # stored bytes vary with the draw: average a few
    stored = {
        key: statistics.mean(saved_bytes(module, x) for _ in range(5)) / exact_bytes
        for key, module in variants.items()
    }
    seconds: Dict[Tuple[str, float], List[float]] = {key: [] for key in variants}
    order = list(variants)
    for round_index in range(repeats + 1):  # the first round warms up
        shift = round_index % len(order)
        for key in order[shift:] + order[:shift]:
            output = variants[key](x)
            start = time.perf_counter()
            output.backward(grad_output)
            elapsed = time.perf_counter() - start
            conv.zero_grad(set_to_none=True)
            if round_index:
                seconds[key].append(elapsed)
    exact_ms = 1e3 * statistics.median(seconds[("exact", 1.0)])
    results = [Measurement(name, "exact", 1.0, exact_ms, exact_ms, 1.0)]
    for keep in keeps:
        for variant in ("sampled", "masked"):
            key = (variant, keep) if (variant, keep) in variants else ("exact", 1.0)
            results.append(
                Measurement(
                    name, variant, keep, 1e3 * statistics.median(seconds[key]),
                    exact_ms, stored[key],
                )
            )  # fmt: skip
    return results


def markdown(results: List[Measurement], keeps: Sequence[float], preamble: str) -> str:
    """One row per layer: backward time and stored fraction relative to exact."""
    head = "| layer | exact backward (ms) | " + " | ".join(
        f"sampled / masked, keep {k:g}" for k in keeps
    )
    lines = [head + " |", "|---" * (2 + len(keeps)) + "|"]
    for name in dict.fromkeys(r.layer for r in results):
        rows = {(r.variant, r.keep): r for r in results if r.layer == name}
        cells = [name, f"{rows[('exact', 1.0)].backward_ms:.2f}"]
        for keep in keeps:
            s, m = rows[("sampled", keep)], rows[("masked", keep)]
            cells.append(
                f"{s.ratio:.2f}× / {m.ratio:.2f}× (stored {s.stored_fraction:.2f} / "
                f"{m.stored_fraction:.2f})"
            )
        lines.append("| " + " | ".join(cells) + " |")
    legend = (
        "Backward time relative to PyTorch's exact backward (same process, "
        "interleaved, medians); stored = bytes saved for backward relative to "
        "the plain layer. Sampling: spatial; keep 1 is the plain layer."
    )
    return f"{preamble}\n\n{legend}\n\n" + "\n".join(lines) + "\n"


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command-line options of the randomized benchmark."""
    parser = argparse.ArgumentParser(
        prog="python -m tnbackpack.benchmark --randomized",
        description="Backward time and stored memory of sampled convolutions.",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="one small layer, batch 2, 1 round (a smoke test)",
    )  # fmt: skip
    parser.add_argument("--layers", help=f"comma list of: {','.join(LAYERS)}")
    parser.add_argument("--batch", type=int, default=32, help="batch size (32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--repeats", type=int, default=15, help="rounds (15)")
    parser.add_argument(
        "--output", type=Path, help="output directory (docs/benchmarks/randomized)"
    )
    args = parser.parse_args(argv)
    if args.layers:
        args.layers = [n.strip() for n in args.layers.split(",") if n.strip()]
        unknown = [n for n in args.layers if n not in LAYERS]
        if unknown:
            raise SystemExit(
                f"unknown layers {unknown}; choose from: {', '.join(LAYERS)}"
            )
    elif args.quick:
        args.layers = ["allcnnc_conv5"]
    else:
        args.layers = list(LAYERS)
    if args.quick:
        args.batch, args.repeats = 2, 1
    args.output = args.output or Path(
        "docs/benchmarks/randomized" + ("/quick" if args.quick else "")
    )
    return args


def main(argv: Optional[List[str]] = None) -> List[Measurement]:
    """Run the benchmark, print and write the table; returns the measurements."""
    args = parse(argv)
    torch.set_num_threads(args.threads)
    results: List[Measurement] = []
    for name in args.layers:
        results += measure_layer(name, args.batch, KEEPS, args.repeats)
    preamble = (
        f"# TN dropout: backward of a first layer\n\n"
        f"`python -m tnbackpack.benchmark --randomized --batch={args.batch} "
        f"--repeats={args.repeats} --threads={args.threads}`; torch "
        f"{torch.__version__}, {platform.machine()}."
    )
    text = markdown(results, KEEPS, preamble)
    print(text)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "table.md").write_text(text)
    with open(args.output / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["layer", "variant", "keep", "backward_ms", "exact_ms", "ratio", "stored"]
        )
        for r in results:
            times = (r.backward_ms, r.exact_ms, r.ratio, r.stored_fraction)
            writer.writerow([r.layer, r.variant, r.keep, *(f"{t:.4f}" for t in times)])
    return results
