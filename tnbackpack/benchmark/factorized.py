"""Factorized convolutions: tnbackpack against what a user has without it.

``python -m tnbackpack.benchmark --factorized [--quick]``. Per case (a
``FactorizedConv2d`` on a ResNet layer's shape, followed by a frozen linear
head) and extension row (``BatchGrad``, ``KFAC(reduce)``, ``DiagGGNExact``),
the same step is timed, interleaved and repeated (medians, one thread), as

- ``tnbackpack``: tnbackpack's extension on the factorized layer;
- ``backpack_stages``: BackPACK 1.7.1's extension on the layer unrolled into
  its ``nn.Sequential`` of stage convolutions (``to_stages``), the only way
  BackPACK can process it. BackPACK has one KFAC (its own factors, not
  ``reduce``) and refuses grouped stages (CP's depthwise convolutions);
- ``torch.func`` (``BatchGrad`` only): per-sample gradients by
  ``vmap(grad(·))`` of the layer with its kernel rebuilt (``full_weight``).

Each also gets its peak extra memory (:func:`.memory.peak_mb`, in process:
only allocations made during the step count). Ratios are the other
variant's time (memory) over tnbackpack's: above 1 means tnbackpack is
faster (leaner). Plain forward+backward steps without extensions are timed
as reference costs: ``plain`` (the factorized layer, evaluated by
``conv_einsum``) and ``plain_stages`` (the stage sequence).
"""

from __future__ import annotations

import argparse
import copy
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from backpack import extend
from backpack.extensions.backprop_extension import BackpropExtension
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ..nn import FactorizedConv2d
from .extensions import extension_pairs
from .memory import peak_mb
from .timing import describe_error, time_interleaved
from .workload import Workload

ROWS = ("BatchGrad", "KFAC(reduce)", "DiagGGNExact")
VARIANTS = ("tnbackpack", "backpack_stages", "torch.func")


@dataclass(frozen=True)
class FactorizedCase:
    """A factorized 3×3 layer (padding 1) on a ``channels × size²`` input."""

    channels: int
    size: int
    factorization: str
    rank: object

    @property
    def name(self) -> str:
        """Row label, e.g. ``cp16_64@32``."""
        rank = (
            "x".join(map(str, self.rank)) if isinstance(self.rank, tuple) else self.rank
        )
        return f"{self.factorization}{rank}_{self.channels}@{self.size}"

    def layer(self) -> FactorizedConv2d:
        """A fresh layer (seeded by the caller)."""
        return FactorizedConv2d(
            self.channels, self.channels, 3, self.rank, self.factorization, padding=1
        )


#: ResNet-18/34 3×3 layer shapes (64 channels at 32², 128 at 16²) at ranks
#: C/4 and C for CP, and similar parameter budgets for the others.
CASES = (
    FactorizedCase(64, 32, "cp", 16),
    FactorizedCase(64, 32, "cp", 64),
    FactorizedCase(128, 16, "cp", 32),
    FactorizedCase(64, 32, "tucker", (16, 16)),
    FactorizedCase(128, 16, "tucker", (32, 32)),
    FactorizedCase(64, 32, "tt", (16, 8, 8)),
    FactorizedCase(64, 32, "tr", (8, 8, 8, 4)),
)
QUICK_CASES = (
    FactorizedCase(8, 8, "cp", 4),
    FactorizedCase(8, 8, "tucker", (4, 4)),
    FactorizedCase(8, 8, "tr", 2),
)


class RebuiltConv(nn.Module):
    """The factorized layer as PyTorch's convolution of its rebuilt kernel."""

    def __init__(self, layer: FactorizedConv2d) -> None:
        super().__init__()
        self.layer = layer
        # hyper-parameters and padding logic only (its weight is unused)
        self.__dict__["dense"] = layer.to_conv()

    def forward(self, x: Tensor) -> Tensor:
        """``conv(x)`` with the kernel ``layer.full_weight()``."""
        return self.dense._conv_forward(x, self.layer.full_weight(), self.layer.bias)


class Setup:
    """The factorized model, its stage sequence, data and loss for one case."""

    def __init__(self, case: FactorizedCase, batch: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        layer = case.layer()
        head = nn.Linear(case.channels * case.size**2, 10).requires_grad_(False)
        # every model has its own copies: BackPACK's hooks on an extended
        # model's modules must not run in the plain or torch.func variants
        self.plain = nn.Sequential(layer, nn.Flatten(), head)
        self.model = extend(copy.deepcopy(self.plain))
        self.stages: Optional[nn.Module] = None
        self.plain_stages: Optional[nn.Module] = None
        self.stages_error = ""
        try:
            stages = nn.Sequential(
                *layer.to_stages(), nn.Flatten(), copy.deepcopy(head)
            )
            self.plain_stages = copy.deepcopy(stages)
            self.stages = extend(stages)
        except ValueError as error:
            self.stages_error = describe_error(error)
        rebuilt = RebuiltConv(copy.deepcopy(layer))
        self.rebuilt = nn.Sequential(rebuilt, nn.Flatten(), copy.deepcopy(head))
        self.loss = extend(nn.CrossEntropyLoss())
        self.x = torch.randn(batch, case.channels, case.size, case.size)
        self.y = torch.randint(0, 10, (batch,))

    def step(self, model: nn.Module, extension: Optional[BackpropExtension] = None):
        """Forward and backward of ``model``, with ``extension`` if given."""
        loss_function = self.loss if extension is not None else nn.CrossEntropyLoss()
        Workload.backward(loss_function(model(self.x), self.y), extension)

    def per_sample_gradients(self) -> Dict[str, Tensor]:
        """``vmap(grad)`` of the rebuilt-kernel model (the mean loss's terms)."""
        model = self.rebuilt
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        batch = self.x.shape[0]

        def loss_of(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            out = functional_call(model, p, (x.unsqueeze(0),))
            return nn.functional.cross_entropy(out, y.unsqueeze(0)) / batch

        return vmap(grad(loss_of), in_dims=(None, 0, 0))(params, self.x, self.y)

    def clear(self) -> None:
        """Drop gradients and savefields."""
        for model in (self.model, self.plain, self.stages, self.plain_stages):
            if model is None:
                continue
            for param in model.parameters():
                param.grad = None
                for name in [n for n in vars(param) if not n.startswith("_")]:
                    delattr(param, name)


def variants(setup: Setup, row: str) -> Dict[str, Callable[[], object]]:
    """The steps to compare for one extension row (``plain`` first)."""
    (pair,), _ = extension_pairs((row,))
    steps: Dict[str, Callable[[], object]] = {
        "plain": lambda: setup.step(setup.plain),
        "tnbackpack": lambda: setup.step(setup.model, pair.tnbackpack()),
    }
    if setup.stages is not None:
        steps["plain_stages"] = lambda: setup.step(setup.plain_stages)
        steps["backpack_stages"] = lambda: setup.step(setup.stages, pair.backpack())
    if row == "BatchGrad":
        steps["torch.func"] = setup.per_sample_gradients
    return steps


@dataclass
class Result:
    """One (case, row): median ms and peak MB per variant, or an error text."""

    case: str
    row: str
    ms: Dict[str, Optional[float]]
    mb: Dict[str, Optional[float]]
    errors: Dict[str, str]

    def ratio(self, variant: str, of: str = "ms") -> Optional[float]:
        """``variant``'s time (or memory) over tnbackpack's."""
        values = getattr(self, of)
        mine, theirs = values.get("tnbackpack"), values.get(variant)
        if not mine or theirs is None:
            return None
        return theirs / mine


def measure(
    case: FactorizedCase,
    batch: int,
    repeats: int,
    rows=ROWS,
    memory: bool = True,
    max_seconds: float = 20.0,
) -> List[Result]:
    """Interleaved medians and peak memory of every variant of ``case``."""
    setup = Setup(case, batch)
    results = []
    for row in rows:
        steps = variants(setup, row)
        timings = time_interleaved(
            steps, setup.clear, repeats, warmup=1, max_seconds=max_seconds
        )
        ms = {name: timings.median_ms(name) for name in steps}
        errors = dict(timings.errors)
        if setup.stages is None:
            errors["backpack_stages"] = setup.stages_error
        mb: Dict[str, Optional[float]] = {}
        for name, step in steps.items():
            if memory and name not in errors:
                mb[name] = peak_mb(step)
                setup.clear()
        results.append(Result(case.name, row, ms, mb, errors))
    return results


def _cell(result: Result, variant: str) -> str:
    if variant in result.errors:
        return "refused" if "NotImplemented" in result.errors[variant] else "n/a"
    ms, mb = result.ms.get(variant), result.mb.get(variant)
    if ms is None:
        return "—"
    text = f"{ms:.0f} ms"
    if mb is not None:
        text += f", {mb:.0f} MB"
    ratio = result.ratio(variant)
    if variant != "tnbackpack" and ratio is not None:
        text += f" (**{ratio:.1f}×**)"
    return text


def table(results: List[Result]) -> str:
    """Markdown table: per variant ``ms, MB (time ratio vs tnbackpack)``."""
    header = ["case", "extension", "plain", "plain (stages)", *VARIANTS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        plain = [r.ms.get(name) for name in ("plain", "plain_stages")]
        cells = [r.case, r.row] + [f"{ms:.0f} ms" if ms else "—" for ms in plain]
        cells += [_cell(r, v) for v in VARIANTS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(results: List[Result], output: Path) -> None:
    """``results.csv`` and ``table.md`` under ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    names = ["plain", "plain_stages", *VARIANTS]
    with open(output / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["case", "extension"]
            + [f"{n}_ms" for n in names]
            + [f"{n}_mb" for n in names]
            + ["errors"]
        )
        for r in results:
            writer.writerow(
                [r.case, r.row]
                + [r.ms.get(n) for n in names]
                + [r.mb.get(n) for n in names]
                + ["; ".join(f"{k}: {v}" for k, v in r.errors.items())]
            )
    (output / "table.md").write_text(table(results) + "\n")


def run(
    quick: bool, batch: int, threads: int, repeats: int, output: Path, memory: bool
) -> List[Result]:
    """Measure every case, print and write the table."""
    torch.set_num_threads(threads)
    results: List[Result] = []
    for case in QUICK_CASES if quick else CASES:
        print(f"[factorized] {case.name}", flush=True)
        results += measure(case, batch, repeats, memory=memory)
    print(table(results))
    write(results, output)
    return results


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m tnbackpack.benchmark --factorized [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m tnbackpack.benchmark --factorized",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--quick", action="store_true", help="tiny cases, 2 repeats")
    parser.add_argument("--batch", type=int, default=32, help="batch size (32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--repeats", type=int, help="measured rounds (5, quick: 2)")
    parser.add_argument("--no-memory", action="store_true", help="skip peak memory")
    parser.add_argument(
        "--output",
        type=Path,
        help="output directory (docs/benchmarks/factorized, quick: .../quick)",
    )
    args = parser.parse_args(argv)
    default = Path("docs/benchmarks/factorized" + ("/quick" if args.quick else ""))
    run(
        quick=args.quick,
        batch=args.batch,
        threads=args.threads,
        repeats=args.repeats or (2 if args.quick else 5),
        output=args.output or default,
        memory=not args.no_memory,
    )
