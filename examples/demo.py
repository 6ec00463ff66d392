"""`make demo`: a CNN trained with K-FAC factors computed by tensor networks.

Trains the same small CNN (with a grouped convolution) on scikit-learn's bundled
8×8 digits three times — plain SGD, Adam, and SGD preconditioned by K-FAC with
factors from ``tnbackpack.extensions.KFAC(kfac_approx="reduce")`` — prints the
test accuracy of each, times one K-FAC step of tnbackpack against BackPACK
computing the same factors, and saves a plot of the training losses.

Run ``python examples/demo.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # no display needed; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from backpack import backpack, extend  # noqa: E402
from backpack import extensions as backpack_extensions  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from tnbackpack.extensions import KFAC  # noqa: E402
from tnbackpack.optim import KFACPreconditioner  # noqa: E402

SEED = 0
KFAC_LR = 0.3

# BackPACK's hooks fire on the first layer, whose input needs no gradient.
warnings.filterwarnings("ignore", message="Full backward hook is firing")
DEFAULT_PLOT = Path(__file__).resolve().parent.parent / "docs/images/demo_loss.png"


def digits(seed: int = SEED) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits as ``[N, 1, 8, 8]`` images in ``[0, 1]``; fixed stratified 80/20 split."""
    data = load_digits()
    images = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(data.target)
    split = train_test_split(
        images, labels, test_size=0.2, random_state=seed, stratify=labels
    )
    X_train, X_test, y_train, y_test = split
    return X_train, y_train, X_test, y_test


def cnn(groups: int = 2) -> nn.Sequential:
    """conv 1→16 (3×3) → ReLU → conv 16→32 (3×3, stride 2, groups) → ReLU → linear."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=groups),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def accuracy(model: nn.Module, X: Tensor, y: Tensor) -> float:
    """Fraction of correctly classified samples."""
    with torch.no_grad():
        return (model(X).argmax(1) == y).float().mean().item()


def batches(n: int, batch_size: int, epoch: int) -> List[Tensor]:
    """The same shuffled mini-batches for every optimizer (seeded by the epoch)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
    return list(order.split(batch_size))


def train(
    name: str,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    data: Tuple[Tensor, Tensor, Tensor, Tensor],
    epochs: int,
    batch_size: int,
    kfac: Optional[Dict[str, float]] = None,
) -> Tuple[List[float], float]:
    """Train a fresh CNN; K-FAC-precondition the gradients if ``kfac`` is given.

    Returns:
        The training loss of every step and the final test accuracy.
    """
    X_train, y_train, X_test, y_test = data
    torch.manual_seed(SEED)  # same initialization for every optimizer
    model = cnn()
    loss_function = nn.CrossEntropyLoss()
    preconditioner = None
    if kfac is not None:
        model, loss_function = extend(model), extend(loss_function)
        preconditioner = KFACPreconditioner(model, **kfac)
    optimizer = make_optimizer(model)
    losses = []
    steps = epochs * len(batches(len(X_train), batch_size, 0))
    # disable=None: a bar on a terminal, nothing in a log file
    with tqdm(total=steps, desc=f"{name:5s}", leave=False, disable=None) as progress:
        for epoch in range(epochs):
            for index in batches(len(X_train), batch_size, epoch):
                optimizer.zero_grad()
                loss = loss_function(model(X_train[index]), y_train[index])
                if preconditioner is None:
                    loss.backward()
                else:
                    with backpack(KFAC(kfac_approx="reduce")):
                        loss.backward()
                    preconditioner.step()
                optimizer.step()
                losses.append(loss.item())
                progress.update()
                progress.set_postfix(loss=f"{loss.item():.3f}")
    return losses, accuracy(model, X_test, y_test)


def time_step(model: nn.Module, X: Tensor, y: Tensor, extension) -> float:
    """Seconds for one forward and backward pass inside ``backpack(extension)``."""
    loss_function = extend(nn.CrossEntropyLoss())
    model.zero_grad()
    start = time.perf_counter()
    loss = loss_function(model(X), y)
    with backpack(*([extension] if extension is not None else [])):
        loss.backward()
    return time.perf_counter() - start


def kfac_timings(
    X: Tensor, y: Tensor, repeats: int
) -> Tuple[Dict[str, float], float, str]:
    """Median seconds per step of each way of computing K-FAC factors.

    BackPACK has no ``kfac_approx`` and refuses grouped convolutions, so the
    comparison with it uses the same CNN with ``groups=1``; tnbackpack's
    ``"backpack"`` approximation computes BackPACK's factors exactly.

    Returns:
        The medians, the largest relative difference between tnbackpack's
        and BackPACK's factors (same Monte-Carlo sample), and what BackPACK
        says about the grouped CNN.
    """
    torch.manual_seed(SEED)
    plain, grouped = extend(cnn(groups=1)), extend(cnn(groups=2))
    contenders: Dict[str, Tuple[nn.Module, Callable[[], object]]] = {
        "plain backward (no extension)": (plain, lambda: None),
        "BackPACK KFAC": (plain, backpack_extensions.KFAC),
        'tnbackpack KFAC("backpack")': (plain, lambda: KFAC(kfac_approx="backpack")),
        'tnbackpack KFAC("reduce")': (plain, lambda: KFAC(kfac_approx="reduce")),
        'tnbackpack KFAC("reduce"), groups=2': (
            grouped,
            lambda: KFAC(kfac_approx="reduce"),
        ),
    }
    samples: Dict[str, List[float]] = {name: [] for name in contenders}
    for _ in range(repeats + 1):  # interleaved; the first round warms up
        for name, (model, make) in contenders.items():
            samples[name].append(time_step(model, X, y, make()))
    medians = {name: statistics.median(s[1:]) for name, s in samples.items()}

    factors = {}
    for name in ("BackPACK KFAC", 'tnbackpack KFAC("backpack")'):
        model, make = contenders[name]
        torch.manual_seed(SEED)  # the same Monte-Carlo sample for both
        time_step(model, X, y, make())
        factors[name] = [f.clone() for p in model.parameters() for f in p.kfac]
    difference = max(
        ((a - b).norm() / b.norm()).item()
        for a, b in zip(*(factors[n] for n in factors))
    )
    try:
        time_step(grouped, X, y, backpack_extensions.KFAC())
        refusal = "BackPACK KFAC on groups=2: ran"
    except NotImplementedError as error:
        refusal = f"BackPACK KFAC on groups=2: NotImplementedError ({error})"
    return medians, difference, refusal


def plot(
    curves: Dict[str, List[float]],
    accuracies: Dict[str, float],
    path: Path,
    steps_per_epoch: int,
) -> None:
    """Training loss per step (and its per-epoch mean) of every optimizer."""
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for name, losses in curves.items():
        (line,) = axes.plot(losses, alpha=0.25, linewidth=0.8)
        epochs = [
            sum(losses[i : i + steps_per_epoch]) / len(losses[i : i + steps_per_epoch])
            for i in range(0, len(losses), steps_per_epoch)
        ]
        centers = [
            i + steps_per_epoch / 2 for i in range(0, len(losses), steps_per_epoch)
        ]
        label = f"{name} (test accuracy {100 * accuracies[name]:.1f}%)"
        axes.plot(centers, epochs, color=line.get_color(), label=label, marker="o")
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.set_title("CNN on scikit-learn's digits; K-FAC factors by tnbackpack")
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(figure)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Train, time, plot; return the test accuracies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    args = parser.parse_args(argv)
    epochs, repeats = (1, 2) if args.quick else (args.epochs, 20)
    torch.set_num_threads(args.threads)
    data = digits()
    batch_size = 64

    optimizers = {
        "SGD": (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), None),
        "Adam": (lambda m: torch.optim.Adam(m.parameters(), lr=1e-2), None),
        # K-FAC: natural-gradient steps need no momentum here; KL clipping
        # bounds the steps along directions of small curvature.
        "KFAC": (
            lambda m: torch.optim.SGD(m.parameters(), lr=KFAC_LR),
            {
                "damping": 1e-2,
                "update_every": 10,
                "ema": 0.95,
                "kl_clip": 1e-2,
                "lr": KFAC_LR,
            },
        ),
    }
    curves, accuracies = {}, {}
    for name, (make_optimizer, kfac) in optimizers.items():
        curves[name], accuracies[name] = train(
            name, make_optimizer, data, epochs, batch_size, kfac
        )
        print(f"{name:5s} test accuracy: {100 * accuracies[name]:.1f}%")

    X_train, y_train = data[0][:128], data[1][:128]
    medians, difference, refusal = kfac_timings(X_train, y_train, repeats)
    print(f"\nTime per step, batch of {len(X_train)} (median of {repeats}):")
    baseline = medians["BackPACK KFAC"]
    for name, seconds in medians.items():
        ratio = seconds / baseline
        print(f"  {name:38s} {1e3 * seconds:7.2f} ms  ({ratio:.2f}× BackPACK)")
    print(
        f"  tnbackpack vs BackPACK factors, max relative difference: {difference:.1e}"
    )
    print(f"  {refusal}")

    plot(curves, accuracies, args.plot, len(batches(len(data[0]), batch_size, 0)))
    print(f"\nLoss curves saved to {args.plot}")
    return accuracies


if __name__ == "__main__":
    main()
