"""Compress the demo CNN's convolutions with CP and Tucker, fine-tune with K-FAC.

Trains the CNN of ``examples/demo.py`` (a grouped convolution included) on
scikit-learn's digits with K-FAC, decomposes each of its convolutions with
``FactorizedConv2d.from_conv`` (tensorly: CP by ALS, Tucker-2 by HOOI) at two
compression ratios, and fine-tunes every compressed network with
``tnbackpack.optim.KFACPreconditioner``, whose factors for each CP/Tucker
factor come from ``tnbackpack.extensions.KFAC(kfac_approx="reduce")``. Prints
test accuracy (right after the decomposition and after fine-tuning), parameter
count and the median time of one K-FAC training step per variant, and plots
accuracy against parameters.

Run ``python examples/compress.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # no display needed; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from backpack import backpack, extend  # noqa: E402
from torch import Tensor, nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import accuracy, batches, cnn, digits  # noqa: E402

from tnbackpack.extensions import KFAC  # noqa: E402
from tnbackpack.nn import FactorizedConv2d  # noqa: E402
from tnbackpack.optim import KFACPreconditioner  # noqa: E402

SEED = 0
LR = 0.3
#: Fine-tuning starts from a good point with fresh curvature estimates: a
#: smaller step than training from scratch (0.3 there) keeps it there.
FINETUNE_LR = 0.05
KFAC_OPTIONS = {"damping": 1e-2, "update_every": 10, "ema": 0.95, "kl_clip": 1e-2}
#: Fraction of each convolution's kernel parameters kept.
RATIOS = (0.5, 0.2)
DEFAULT_PLOT = (
    Path(__file__).resolve().parent.parent / "docs/images/compress_accuracy.png"
)

warnings.filterwarnings("ignore", message="Full backward hook is firing")

Data = Tuple[Tensor, Tensor, Tensor, Tensor]


def fit(
    model: nn.Module, data: Data, epochs: int, lr: float, batch_size: int = 64
) -> List[float]:
    """SGD preconditioned by K-FAC (reduce); returns the seconds of every step."""
    X_train, y_train = data[0], data[1]
    model, loss_function = extend(model), extend(nn.CrossEntropyLoss())
    preconditioner = KFACPreconditioner(model, lr=lr, **KFAC_OPTIONS)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    seconds = []
    for epoch in range(epochs):
        for index in batches(len(X_train), batch_size, epoch):
            start = time.perf_counter()
            optimizer.zero_grad()
            loss = loss_function(model(X_train[index]), y_train[index])
            with backpack(KFAC(kfac_approx="reduce")):
                loss.backward()
            preconditioner.step()
            optimizer.step()
            seconds.append(time.perf_counter() - start)
    return seconds


def compress(model: nn.Sequential, factorization: str, ratio: float) -> nn.Sequential:
    """A copy of ``model`` with every ``Conv2d`` decomposed at ``ratio``."""
    compressed = copy.deepcopy(model)
    for index, layer in enumerate(compressed):
        if type(layer) is nn.Conv2d:
            compressed[index] = FactorizedConv2d.from_conv(layer, factorization, ratio)
    return compressed


def parameters(model: nn.Module, convolutions_only: bool = False) -> int:
    """Number of trainable parameters (of the (factorized) convolutions only)."""
    layers = [m for m in model if not convolutions_only or not isinstance(m, nn.Linear)]
    return sum(p.numel() for m in layers for p in m.parameters() if p.requires_grad)


def ranks(model: nn.Module) -> str:
    """The ranks of the factorized layers, e.g. ``(3,) (6,)``."""
    return " ".join(str(m.rank) for m in model if isinstance(m, FactorizedConv2d))


def plot(rows: List[Dict], path: Path) -> None:
    """Test accuracy against the convolutions' parameter count, per family.

    Solid: after K-FAC fine-tuning; dashed: right after the decomposition.
    """
    figure, axes = plt.subplots(figsize=(5.5, 3.5))
    for family, marker in (("dense", "s"), ("cp", "o"), ("tucker", "^")):
        chosen = sorted(
            (r for r in rows if r["family"] == family),
            key=lambda r: r["conv_parameters"],
        )
        if not chosen:
            continue
        xs = [r["conv_parameters"] for r in chosen]
        (line,) = axes.plot(
            xs, [100 * r["accuracy"] for r in chosen], marker=marker, label=family
        )
        if family != "dense":
            axes.plot(
                xs,
                [100 * r["decomposed"] for r in chosen],
                marker=marker,
                linestyle="--",
                color=line.get_color(),
                alpha=0.5,
            )
    axes.set_xscale("log")
    axes.set_xlabel("parameters of the convolutions")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("Demo CNN on digits (dashed: before fine-tuning)")
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(figure)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    """Train, compress, fine-tune, print and plot; return one dict per variant."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs (6)")
    parser.add_argument(
        "--finetune", type=int, default=2, help="fine-tuning epochs (2)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    args = parser.parse_args(argv)
    epochs, finetune = (1, 1) if args.quick else (args.epochs, args.finetune)
    torch.set_num_threads(args.threads)
    data = digits()
    if args.quick:  # a third of the training set
        data = (data[0][::3], data[1][::3], data[2], data[3])
    X_test, y_test = data[2], data[3]

    torch.manual_seed(SEED)
    dense = cnn()
    seconds = fit(dense, data, epochs, LR)
    rows = [
        {
            "variant": "dense",
            "family": "dense",
            "ranks": "",
            "parameters": parameters(dense),
            "conv_parameters": parameters(dense, convolutions_only=True),
            "decomposed": accuracy(dense, X_test, y_test),
            "accuracy": accuracy(dense, X_test, y_test),
            "step_ms": 1e3 * statistics.median(seconds),
        }
    ]
    for factorization in ("cp", "tucker"):
        for ratio in RATIOS:
            torch.manual_seed(SEED)
            model = compress(dense, factorization, ratio)
            decomposed = accuracy(model, X_test, y_test)
            seconds = fit(model, data, finetune, FINETUNE_LR)
            rows.append(
                {
                    "variant": f"{factorization} {ratio:.0%}",
                    "family": factorization,
                    "ranks": ranks(model),
                    "parameters": parameters(model),
                    "conv_parameters": parameters(model, convolutions_only=True),
                    "decomposed": decomposed,
                    "accuracy": accuracy(model, X_test, y_test),
                    "step_ms": 1e3 * statistics.median(seconds),
                }
            )
    header = (
        f"{'variant':12s} {'ranks':16s} {'params':>7s} {'(convs)':>7s} "
        f"{'decomposed':>10s} {'fine-tuned':>10s} {'K-FAC step':>10s}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['variant']:12s} {r['ranks']:16s} {r['parameters']:7d} "
            f"{r['conv_parameters']:7d} "
            f"{100 * r['decomposed']:9.1f}% {100 * r['accuracy']:9.1f}% "
            f"{r['step_ms']:7.1f} ms"
        )
    plot(rows, args.plot)
    print(f"\nAccuracy against parameters saved to {args.plot}")
    return rows


if __name__ == "__main__":
    main()
