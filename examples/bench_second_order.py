"""Second-order extensions on one 3×3 Conv2d: tnbackpack vs BackPACK.

Network: Conv2d(32 -> 64, 3×3, padding 1) on N=32 inputs of 32×32 -> ReLU ->
flatten -> Linear(-> 10, frozen) -> CrossEntropyLoss, one thread. The head is
frozen so that its Kronecker factor does not dominate (DESIGN.md §6). Every
round times, interleaved, a plain forward+backward and the same with each
extension; the table shows medians over the rounds and their ratio to the
plain pass. Two more rows bound what any implementation of DiagGGNExact can
reach here: the extension with the conv weight frozen (BackPACK's rules for
the layers after it, which both libraries share) and ten summed weight VJPs of
the conv (the arithmetic of a 10-class exact diagonal, at PyTorch's speed).

``--routes`` also times the two input-VJP routes of
:mod:`tnbackpack.extensions.derivatives` (10 vectors) on overlapping (3×3,
strided 3×3), non-overlapping (3×3 stride 3, 1×1 stride 2) and transposed
layers.

Run: ``python examples/bench_second_order.py [--rounds 11] [--routes] [--no-table]``.
Times are CPU seconds of the process (see :func:`timed`).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Callable, Dict, List

import torch
from backpack import backpack, extend
from backpack import extensions as bp
from torch import nn

from tnbackpack import extensions as tn
from tnbackpack.extensions.derivatives import input_vjp

SAVEFIELDS = (
    "kfac",
    "kflr",
    "diag_ggn_exact",
    "diag_ggn_mc",
    "sqrt_ggn_exact",
    "diag_h",
)


def extensions() -> Dict[str, Callable[[], object]]:
    """Label -> factory, tnbackpack and BackPACK side by side."""
    return {
        "KFAC backpack (tn)": lambda: tn.KFAC(kfac_approx="backpack"),
        "KFAC expand (tn)": lambda: tn.KFAC(kfac_approx="expand"),
        "KFAC reduce (tn)": lambda: tn.KFAC(kfac_approx="reduce"),
        "KFAC (BackPACK)": bp.KFAC,
        "KFLR backpack (tn)": tn.KFLR,
        "KFLR (BackPACK)": bp.KFLR,
        "DiagGGNExact (tn)": tn.DiagGGNExact,
        "DiagGGNExact (BackPACK)": bp.DiagGGNExact,
        "DiagGGNMC (tn)": tn.DiagGGNMC,
        "DiagGGNMC (BackPACK)": bp.DiagGGNMC,
        "SqrtGGNExact (tn)": tn.SqrtGGNExact,
        "SqrtGGNExact (BackPACK)": bp.SqrtGGNExact,
        "DiagHessian (tn)": tn.DiagHessian,
        "DiagHessian (BackPACK)": bp.DiagHessian,
    }


def build(batch: int = 32):
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 64, 3, padding=1)
    head = nn.Linear(64 * 32 * 32, 10).requires_grad_(False)
    model = extend(nn.Sequential(conv, nn.ReLU(), nn.Flatten(), head))
    loss_fn = extend(nn.CrossEntropyLoss())
    x = torch.randn(batch, 32, 32, 32)
    y = torch.randint(0, 10, (batch,))
    return model, loss_fn, x, y


def timed(step: Callable[[], None]) -> float:
    """CPU time of this process: with one thread it is the wall time on an idle
    machine, and it does not count time lost to other processes on a busy one.
    """
    start = time.process_time()
    step()
    return time.process_time() - start


def run_table(rounds: int) -> None:
    model, loss_fn, x, y = build()
    factories = extensions()

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    def with_extension(factory) -> Callable[[], None]:
        def step() -> None:
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            with backpack(factory()):
                loss.backward()
            for p in model.parameters():  # free the result before the next one
                for field in SAVEFIELDS:
                    if hasattr(p, field):
                        delattr(p, field)

        return step

    conv = model[0]

    def frozen_conv_diag_ggn() -> None:
        """BackPACK's rules for the layers after the conv (and the cheap bias)."""
        conv.weight.requires_grad_(False)
        try:
            with_extension(tn.DiagGGNExact)()
        finally:
            conv.weight.requires_grad_(True)

    grad_outputs = torch.randn(10, *conv(x).shape)

    def ten_weight_vjps() -> None:
        """The arithmetic of an exact diagonal GGN with 10 classes, at best."""
        for grad_output in grad_outputs:
            torch.nn.grad.conv2d_weight(x, conv.weight.shape, grad_output, padding=1)

    steps = {"plain forward+backward": plain}
    steps.update({label: with_extension(f) for label, f in factories.items()})
    steps["DiagGGNExact, conv weight frozen"] = frozen_conv_diag_ggn
    steps["10 summed weight VJPs alone"] = ten_weight_vjps
    times: Dict[str, List[float]] = {label: [] for label in steps}
    for step in steps.values():  # warm-up: plans, patterns, allocator
        step()
    for _ in range(rounds):
        for label, step in steps.items():
            times[label].append(timed(step))
    base = statistics.median(times["plain forward+backward"])
    print(f"{'':32s} {'median [s]':>10s} {'× plain':>8s}")
    for label, values in times.items():
        median = statistics.median(values)
        print(f"{label:32s} {median:10.3f} {median / base:8.2f}")
    for name in ("KFAC", "KFLR", "DiagGGNExact", "DiagGGNMC", "SqrtGGNExact"):
        ours = [v for k, v in times.items() if k.startswith(name) and "(tn)" in k][0]
        theirs = times[f"{name} (BackPACK)"]
        speedup = statistics.median(theirs) / statistics.median(ours)
        print(f"{name}: BackPACK / tnbackpack = {speedup:.2f}")
    diag_h = statistics.median(times["DiagHessian (BackPACK)"]) / statistics.median(
        times["DiagHessian (tn)"]
    )
    print(f"DiagHessian: BackPACK / tnbackpack = {diag_h:.2f}")
    rest = statistics.median(times["DiagGGNExact, conv weight frozen"])
    backpack_time = statistics.median(times["DiagGGNExact (BackPACK)"])
    products = statistics.median(times["10 summed weight VJPs alone"])
    print(
        f"DiagGGNExact without the conv weight: {rest:.3f} s, so even a free conv "
        f"part is at most {backpack_time / rest:.2f}x faster than BackPACK; with "
        f"ten PyTorch weight VJPs ({products:.3f} s) at most "
        f"{backpack_time / (rest + products):.2f}x"
    )


def run_routes(rounds: int) -> None:
    """Median time of each input-VJP route for a few layers."""
    layers = {  # layer, spatial input size
        "3x3 stride 1 padding 1": (nn.Conv2d(32, 64, 3, padding=1), 32),
        "3x3 stride 2 padding 1": (nn.Conv2d(32, 64, 3, stride=2, padding=1), 32),
        "3x3 stride 3": (nn.Conv2d(32, 64, 3, stride=3), 33),
        "1x1 stride 2": (nn.Conv2d(32, 64, 1, stride=2), 32),
        "transposed 2x2 stride 2": (nn.ConvTranspose2d(32, 64, 2, stride=2), 16),
    }
    print(f"\ninput VJP of 10 vectors, N=32 {'':19s} torch [s]   tn [s]")
    for label, (layer, size) in layers.items():
        x = torch.randn(32, 32, size, size)
        layer.input0, layer.output = x, layer(x).detach()
        mat = torch.randn(10, *layer.output.shape)
        medians = []
        for route in ("torch", "tn"):

            def step(route: str = route, layer=layer, mat=mat) -> None:
                input_vjp(layer, mat, route=route)

            step()
            medians.append(statistics.median(timed(step) for _ in range(rounds)))
        print(f"{label:50s} {medians[0]:8.3f} {medians[1]:8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--routes", action="store_true", help="time input-VJP routes")
    parser.add_argument("--no-table", action="store_true", help="skip the table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    if not args.no_table:
        run_table(args.rounds)
    if args.routes:
        run_routes(max(3, args.rounds // 2))


if __name__ == "__main__":
    main()
