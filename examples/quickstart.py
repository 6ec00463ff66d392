"""Every tnbackpack extension on a small CNN, and what it stores on each parameter.

The CNN has three layers that BackPACK 1.7.1 gets wrong or refuses: a
``padding="same"`` convolution with circular padding, a grouped strided
convolution and a transposed convolution with ``output_padding``. tnbackpack's
extensions are drop-in replacements for BackPACK's (same names, arguments,
savefields, shapes), so the only change to a BackPACK script is the import.
"""

from __future__ import annotations

import argparse
import warnings
from typing import List, Optional, Sequence

import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

from tnbackpack import backpack, extend
from tnbackpack.extensions import (
    KFAC,
    KFLR,
    KFRA,
    BatchDiagGGNExact,
    BatchDiagGGNMC,
    BatchDiagHessian,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
    SqrtGGNExact,
    SqrtGGNMC,
    SumGradSquared,
    Variance,
)

# BackPACK's hooks fire on the first layer, whose input needs no gradient.
warnings.filterwarnings("ignore", message="Full backward hook is firing")

EXTENSIONS = {
    "BatchGrad()": BatchGrad(),
    "BatchL2Grad()": BatchL2Grad(),
    "SumGradSquared()": SumGradSquared(),
    "Variance()": Variance(),
    'KFAC(kfac_approx="reduce")': KFAC(kfac_approx="reduce"),
    'KFLR(kfac_approx="expand")': KFLR(kfac_approx="expand"),
    "KFRA()": KFRA(),
    "DiagGGNExact()": DiagGGNExact(),
    "DiagGGNMC(mc_samples=2)": DiagGGNMC(mc_samples=2),
    "BatchDiagGGNExact()": BatchDiagGGNExact(),
    "BatchDiagGGNMC()": BatchDiagGGNMC(),
    "DiagHessian()": DiagHessian(),
    "BatchDiagHessian()": BatchDiagHessian(),
    "SqrtGGNExact()": SqrtGGNExact(),
    "SqrtGGNMC(mc_samples=3)": SqrtGGNMC(mc_samples=3),
}


def cnn() -> nn.Sequential:
    """8×8 → 8×8 → 4×4 → 8×8 feature maps, then a linear classifier."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding="same", padding_mode="circular"),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )


def describe(value) -> str:
    """Shape of a tensor, or the shapes in a list of Kronecker factors."""
    if isinstance(value, Tensor):
        return str(list(value.shape))
    return "[" + ", ".join(str(list(factor.shape)) for factor in value) + "]"


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    """Run each extension in its own backward pass; print and return the lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batch")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    digits = load_digits()
    batch = 8 if args.quick else 32
    X = torch.tensor(digits.images[:batch] / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target[:batch])

    model, loss_function = extend(cnn()), extend(nn.CrossEntropyLoss())
    lines = []
    for label, extension in EXTENSIONS.items():
        model.zero_grad()
        with backpack(extension):
            loss_function(model(X), y).backward()
        field = extension.savefield
        lines.append(f"{label} -> param.{field}")
        for param_name, param in model.named_parameters():
            value = getattr(param, field)
            lines.append(
                f"  {param_name:9s} {str(list(param.shape)):15s} {describe(value)}"
            )
            delattr(param, field)  # keep the next extension's output unambiguous
    print("\n".join(lines))

    # Extensions combine in one backward pass; per-sample gradients sum to .grad.
    model.zero_grad()
    with backpack(BatchGrad(), KFAC(kfac_approx="reduce"), DiagGGNExact()):
        loss_function(model(X), y).backward()
    weight = model[2].weight
    error = (weight.grad_batch.sum(0) - weight.grad).abs().max().item()
    print(f"\ngrouped conv: sum of grad_batch vs .grad, max difference {error:.1e}")
    print(f"grouped conv: kfac factors {describe(weight.kfac)} (one pair per group)")
    return lines


if __name__ == "__main__":
    main()
