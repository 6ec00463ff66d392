"""DP-SGD on scikit-learn's digits: clip per-sample gradients, add Gaussian noise.

One backward pass with ``BatchL2Grad`` and ``BatchGrad`` gives every sample's
gradient norm and gradient. Each sample's gradient is scaled to norm at most
``C``, the clipped gradients are summed, Gaussian noise of standard deviation
``σ·C`` is added and the sum is divided by the batch size (Abadi et al., 2016).
The CNN has a grouped convolution, whose per-sample norms BackPACK 1.7.1
computes wrongly; tnbackpack's agree with the norms of its per-sample gradients.
This script shows the mechanics only: it does no privacy accounting.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Optional, Sequence

import torch
from backpack import extensions as backpack_extensions
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from tnbackpack import backpack, extend
from tnbackpack.extensions import BatchGrad, BatchL2Grad

# BackPACK's hooks fire on the first layer, whose input needs no gradient.
warnings.filterwarnings("ignore", message="Full backward hook is firing")

CLIP = 1.0  # C: largest per-sample gradient norm
NOISE = 0.5  # σ: noise multiplier


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def private_step(model: nn.Module, loss_function, X, y, generator) -> float:
    """Set ``.grad`` to the clipped, noised mean gradient; return the largest norm."""
    model.zero_grad()
    with backpack(BatchGrad(), BatchL2Grad()):
        # reduction="sum": grad_batch holds each sample's own loss gradient
        loss_function(model(X), y).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    norms = torch.stack([p.batch_l2 for p in params]).sum(0).sqrt()  # [N]
    scale = (CLIP / (norms + 1e-12)).clamp(max=1.0)
    clipped_norm = 0.0
    for p in params:
        clipped = torch.einsum("n,n...->n...", scale, p.grad_batch)
        clipped_norm = clipped_norm + clipped.flatten(1).square().sum(1)
        noise = NOISE * CLIP * torch.randn(p.shape, generator=generator)
        p.grad = (clipped.sum(0) + noise) / len(X)
    return clipped_norm.sqrt().max().item()


def main(argv: Optional[Sequence[str]] = None) -> float:
    """Train privately; print and return the test accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one epoch")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    data = load_digits()
    images = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(data.target)
    X_train, X_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, random_state=0, stratify=labels
    )

    model = extend(cnn())
    loss_function = extend(nn.CrossEntropyLoss(reduction="sum"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.25, momentum=0.9)

    # tnbackpack's per-sample norms are those of its per-sample gradients;
    # BackPACK's are not, for the grouped convolution
    conv = model[2]
    for name, l2_extension in (
        ("tnbackpack", BatchL2Grad()),
        ("BackPACK", backpack_extensions.BatchL2Grad()),
    ):
        with backpack(BatchGrad(), l2_extension):
            loss_function(model(X_train[:64]), y_train[:64]).backward()
        direct = conv.weight.grad_batch.flatten(1).square().sum(1)
        error = ((conv.weight.batch_l2 - direct).abs().max() / direct.max()).item()
        print(f"grouped conv, {name:10s} batch_l2 vs |grad_batch|²: {error:.1e}")

    epochs, batch_size = (1, 128) if args.quick else (10, 128)
    for epoch in range(epochs):
        order = torch.randperm(len(X_train), generator=generator)
        for index in order.split(batch_size):
            largest = private_step(
                model, loss_function, X_train[index], y_train[index], generator
            )
            assert largest <= CLIP * (1 + 1e-5), largest
            optimizer.step()
        with torch.no_grad():
            accuracy = (model(X_test).argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch + 1:2d}  test accuracy {100 * accuracy:.1f}%")
    print(
        f"DP-SGD (clip C={CLIP}, noise σ={NOISE}) test accuracy: {100 * accuracy:.1f}%"
    )
    return accuracy


if __name__ == "__main__":
    main()
