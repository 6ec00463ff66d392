"""Time first-order extensions on one 3×3 Conv2d: tnbackpack vs BackPACK.

Model: Conv2d(32, 64, 3, padding=1) -> ReLU -> Flatten -> Linear (frozen, so
its own quantities do not dominate) -> CrossEntropyLoss, batch 32, 32×32
input, one thread. Every configuration is timed once per round, rounds are
interleaved and repeated, and medians are reported as ratios to a plain
forward+backward of the same model without ``extend``, and, after subtracting
the median forward time, as ratios of the backward passes alone.

Run: ``python examples/bench_first_order.py [--rounds 15] [--clock cpu|wall]``
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from typing import Callable, Dict, List, Optional

import backpack.extensions as bp_extensions
import torch
from torch import nn

from tnbackpack import backpack, extend
from tnbackpack import extensions as tn_extensions
from tnbackpack.tn import ConvSpec, autotune, functional

NAMES = ("BatchGrad", "BatchL2Grad", "SumGradSquared", "Variance")


def build(batch_size: int = 32, size: int = 32, classes: int = 10):
    """Model (head frozen), loss and data for the benchmark layer."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(32, 64, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * size * size, classes),
    )
    model[-1].requires_grad_(False)
    x = torch.randn(batch_size, 32, size, size)
    y = torch.randint(0, classes, (batch_size,))
    return model, nn.CrossEntropyLoss(), x, y


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def timed(function: Callable[[], None], clock: Callable[[], float]) -> float:
    start = clock()
    function()
    return clock() - start


def main(rounds: int, warmup: int, clock_name: str) -> None:
    torch.set_num_threads(1)
    plain_model, loss_func, x, y = build()
    model = extend(copy.deepcopy(plain_model))
    ext_loss = extend(copy.deepcopy(loss_func))

    def forward() -> None:
        with torch.enable_grad():
            ext_loss(model(x), y)

    def plain() -> None:
        plain_model.zero_grad(set_to_none=True)
        loss_func(plain_model(x), y).backward()

    def with_extension(factory: Optional[Callable]) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            loss = ext_loss(model(x), y)
            if factory is None:
                loss.backward()
                return
            with backpack(factory()):
                loss.backward()

        return run

    conv = model[0]
    spec = ConvSpec.from_module(conv)
    grad_output = torch.randn_like(conv(x))

    def per_sample_vjp() -> None:  # the extension's irreducible work
        functional.per_sample_weight_vjp(spec, x, grad_output)

    configs: Dict[str, Callable[[], None]] = {
        "per-sample weight VJP alone": per_sample_vjp,
        "forward only (extended model)": forward,
        "plain forward+backward": plain,
        "extended, no extension": with_extension(None),
    }
    for name in NAMES:
        configs[f"tnbackpack {name}"] = with_extension(getattr(tn_extensions, name))
        configs[f"BackPACK   {name}"] = with_extension(getattr(bp_extensions, name))

    times: Dict[str, List[float]] = {key: [] for key in configs}
    order = list(configs)
    shuffler = random.Random(0)
    for round_index in range(warmup + rounds):
        shuffler.shuffle(order)  # no configuration always follows the same one
        for key in order:
            elapsed = timed(configs[key], CLOCKS[clock_name])
            if round_index >= warmup:
                times[key].append(elapsed)

    median = {key: statistics.median(values) for key, values in times.items()}
    fwd = median["forward only (extended model)"]
    base = median["plain forward+backward"]
    print(
        f"torch {torch.__version__}, 1 thread, {clock_name} clock, {rounds} rounds "
        f"(+{warmup} warm-up), medians; Conv2d(32, 64, 3, padding=1), N=32, 32x32"
    )
    header = f"{'configuration':34s} {'fwd+bwd [ms]':>12s} {'ratio':>7s}"
    print(f"{header} {'bwd ratio':>10s}")
    for key, value in median.items():
        backward_ratio = (value - fwd) / (base - fwd)
        alone = key.startswith(("forward", "per-sample"))
        extra = "" if alone else f"{backward_ratio:10.2f}"
        print(f"{key:34s} {1e3 * value:12.1f} {value / base:7.2f} {extra}")
    hooks = median["extended, no extension"] - fwd
    floor = (hooks + median["per-sample weight VJP alone"]) / (base - fwd)
    print(
        f"floor for BatchGrad's backward: extended backward + one per-sample VJP "
        f"= {floor:.2f}x a plain backward"
    )
    routes = sorted({route for route in autotune.choices().values()})
    print(f"per-sample route(s) chosen by the engine's one-time measurement: {routes}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="process CPU time (robust to other load on the machine) or wall time",
    )
    arguments = parser.parse_args()
    main(arguments.rounds, arguments.warmup, arguments.clock)
