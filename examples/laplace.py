"""A diagonal Laplace approximation of a CNN on scikit-learn's digits.

Trains a small CNN to a MAP estimate, accumulates the exact diagonal of the
generalized Gauss-Newton matrix over the training set with ``DiagGGNExact``,
and samples weights from the Gaussian posterior
``N(θ_MAP, (diag GGN + δ)⁻¹)``; the prior precision ``δ`` is chosen on a
validation split. The predictive (mean of the sampled softmax outputs) is
compared with the MAP network on test digits and on noise images: the Laplace
predictive should be about as accurate on digits and less confident on noise.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Dict, Optional, Sequence

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.func import functional_call

from tnbackpack import backpack, extend
from tnbackpack.extensions import DiagGGNExact

# BackPACK's hooks fire on the first layer, whose input needs no gradient.
warnings.filterwarnings("ignore", message="Full backward hook is firing")

PRIOR_PRECISIONS = (10.0, 30.0, 100.0, 300.0, 1000.0)


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def diag_ggn(model: nn.Module, X: Tensor, y: Tensor) -> Dict[str, Tensor]:
    """Diagonal GGN of the summed loss over ``(X, y)``, by batches."""
    loss_function = extend(nn.CrossEntropyLoss(reduction="sum"))
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for index in torch.arange(len(X)).split(256):
        model.zero_grad()
        with backpack(DiagGGNExact()):
            loss_function(model(X[index]), y[index]).backward()
        for name, p in model.named_parameters():
            total[name] += p.diag_ggn_exact
    return total


def predictive(
    model: nn.Module,
    X: Tensor,
    precision: Optional[Dict[str, Tensor]],
    samples: int,
    generator: torch.Generator,
) -> Tensor:
    """Mean softmax over weights sampled from the posterior (MAP if ``None``)."""
    with torch.no_grad():
        if precision is None:
            return model(X).softmax(1)
        mean = dict(model.named_parameters())
        probabilities = 0.0
        for _ in range(samples):
            sample = {
                name: p
                + torch.randn(p.shape, generator=generator) / precision[name].sqrt()
                for name, p in mean.items()
            }
            probabilities = probabilities + functional_call(
                model, sample, (X,)
            ).softmax(1)
        return probabilities / samples


def report(probabilities: Tensor, y: Optional[Tensor] = None) -> str:
    """Accuracy, negative log-likelihood and mean entropy of a predictive."""
    entropy = -(probabilities * probabilities.clamp(min=1e-12).log()).sum(1).mean()
    if y is None:
        return f"mean entropy {entropy:.3f}"
    accuracy = (probabilities.argmax(1) == y).float().mean()
    nll = -probabilities[torch.arange(len(y)), y].clamp(min=1e-12).log().mean()
    return f"accuracy {100 * accuracy:5.1f}%  NLL {nll:.3f}  mean entropy {entropy:.3f}"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Train, fit the Laplace approximation, print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run")
    args = parser.parse_args(argv)
    epochs, samples = (2, 5) if args.quick else (15, 30)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    data = load_digits()
    images = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(data.target)
    X_train, X_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, random_state=0, stratify=labels
    )
    X_train, X_val, y_train, y_val = train_test_split(
        X_train, y_train, test_size=0.15, random_state=0, stratify=y_train
    )
    X_noise = torch.rand(len(X_test), 1, 8, 8, generator=generator)

    model = extend(cnn())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        for index in torch.randperm(len(X_train), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(
                model(X_train[index]), y_train[index]
            ).backward()
            optimizer.step()

    ggn = diag_ggn(model, X_train, y_train)
    scores = {}
    for delta in PRIOR_PRECISIONS:
        precision = {name: g + delta for name, g in ggn.items()}
        p_val = predictive(model, X_val, precision, samples, generator)
        scores[delta] = -p_val[torch.arange(len(y_val)), y_val].log().mean().item()
    delta = min(scores, key=scores.get)
    print(
        "validation NLL by prior precision:",
        {d: round(s, 3) for d, s in scores.items()},
    )
    precision = {name: g + delta for name, g in ggn.items()}

    results = {}
    for name, posterior in (("MAP", None), (f"Laplace δ={delta:g}", precision)):
        p_test = predictive(model, X_test, posterior, samples, generator)
        p_noise = predictive(model, X_noise, posterior, samples, generator)
        print(f"{name:16s} test:  {report(p_test, y_test)}")
        print(f"{name:16s} noise: {report(p_noise)}")
        results[name] = (p_test.argmax(1) == y_test).float().mean().item()
    return results


if __name__ == "__main__":
    main()
