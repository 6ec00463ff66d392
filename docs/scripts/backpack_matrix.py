"""Where BackPACK 1.7.1 differs from tnbackpack: the table of docs/support.md.

Runs every extension of both libraries on one small network per convolution
configuration (conv → sigmoid → flatten → linear, cross-entropy, float64, the
same seed for Monte-Carlo extensions) and compares BackPACK's results on the
convolution's parameters with tnbackpack's, which the test suite checks against
torch.func. Prints a markdown table: ``python docs/scripts/backpack_matrix.py``.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List

import torch
from backpack import backpack, extend
from backpack import extensions as backpack_extensions
from torch import nn

import tnbackpack.extensions as tn_extensions

warnings.filterwarnings("ignore")

#: name: (layer, spatial input size)
CONFIGURATIONS = {
    "Conv1d/2d/3d, kernel 3, padding 1": [
        (nn.Conv1d(2, 3, 3, padding=1), 5),
        (nn.Conv2d(2, 3, 3, padding=1), 5),
        (nn.Conv3d(2, 3, 3, padding=1), 4),
    ],
    "Conv2d, stride 2, dilation 2": [
        (nn.Conv2d(2, 3, 3, stride=2, dilation=2, padding=2), 7)
    ],
    "Conv1d, `padding='same'`, kernel 3 or 4": [
        (nn.Conv1d(2, 3, 3, padding="same"), 6),
        (nn.Conv1d(2, 3, 4, padding="same"), 6),
    ],
    "Conv2d, `padding='same'`, kernel 3 or 4": [
        (nn.Conv2d(2, 3, 3, padding="same"), 5),
        (nn.Conv2d(2, 3, 4, padding="same"), 5),
    ],
    "Conv3d, `padding='same'`, kernel 2": [(nn.Conv3d(2, 2, 2, padding="same"), 4)],
    "Conv3d, `padding='same'`, kernel 3": [(nn.Conv3d(2, 2, 3, padding="same"), 4)],
    "Conv2d, `padding='valid'`": [(nn.Conv2d(2, 3, 3, padding="valid"), 5)],
    "Conv2d, `padding_mode` circular/reflect/replicate": [
        (nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode), 5)
        for mode in ("circular", "reflect", "replicate")
    ],
    "Conv2d, `groups=2`": [(nn.Conv2d(4, 6, 3, padding=1, groups=2), 5)],
    "ConvTranspose1d/2d/3d, stride 2": [
        (nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1), 4),
        (nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1), 4),
        (nn.ConvTranspose3d(2, 2, 3, stride=2, padding=1), 3),
    ],
    "ConvTranspose1d/2d, `output_padding=1`": [
        (nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, output_padding=1), 4),
        (nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1), 4),
    ],
    "ConvTranspose2d, `groups=2`": [
        (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2), 4)
    ],
}

#: (extension, tnbackpack kwargs, Monte-Carlo)
EXTENSIONS = [
    ("BatchGrad", {}, False),
    ("BatchL2Grad", {}, False),
    ("SumGradSquared", {}, False),
    ("Variance", {}, False),
    ("KFAC", {"kfac_approx": "backpack"}, True),
    ("KFLR", {"kfac_approx": "backpack"}, False),
    ("KFRA", {"kfac_approx": "backpack"}, False),
    ("DiagGGNExact", {}, False),
    ("DiagGGNMC", {}, True),
    ("BatchDiagGGNExact", {}, False),
    ("BatchDiagGGNMC", {}, True),
    ("DiagHessian", {}, False),
    ("BatchDiagHessian", {}, False),
    ("SqrtGGNExact", {}, False),
    ("SqrtGGNMC", {}, True),
]


def conv_results(model, X, y, extension, seeded: bool) -> List[torch.Tensor]:
    """The extension's tensors on the convolution's parameters."""
    model.zero_grad()
    if seeded:
        torch.manual_seed(1)
    with backpack(extension):
        extend(nn.CrossEntropyLoss())(model(X), y).backward()
    tensors = []
    for param in model[0].parameters():
        value = getattr(param, extension.savefield)
        tensors += (
            [t.detach().clone() for t in value]
            if isinstance(value, list)
            else [value.detach().clone()]
        )
    return tensors


def status(layer: nn.Module, size: int, name: str, kwargs: dict, seeded: bool) -> str:
    """``ok``, ``wrong``, ``crashes`` or ``refuses`` for BackPACK on one layer."""
    torch.manual_seed(0)
    layer = layer.double()
    X = torch.randn(3, layer.in_channels, *[size] * (layer.weight.ndim - 2)).double()
    features = layer(X)[0].numel()
    model = extend(
        nn.Sequential(
            layer, nn.Sigmoid(), nn.Flatten(), nn.Linear(features, 3)
        ).double()
    )
    y = torch.tensor([0, 1, 2])
    reference = conv_results(
        model, X, y, getattr(tn_extensions, name)(**kwargs), seeded
    )
    try:
        result = conv_results(model, X, y, getattr(backpack_extensions, name)(), seeded)
    except NotImplementedError:
        return "refuses"
    except Exception:  # noqa: BLE001 - any failure is reported as a crash
        return "crashes"
    if any(a.shape != b.shape for a, b in zip(reference, result)):
        return "wrong"
    error = math.sqrt(
        sum((a - b).square().sum().item() for a, b in zip(reference, result))
        / sum(a.square().sum().item() for a in reference)
    )
    return "ok" if error < 1e-8 else "wrong"


def main() -> None:
    """Print the markdown table."""
    torch.set_num_threads(1)
    print("| configuration | BackPACK 1.7.1 | tnbackpack |")
    print("|---|---|---|")
    for configuration, layers in CONFIGURATIONS.items():
        worst: Dict[str, str] = {}
        order = ["ok", "wrong", "crashes", "refuses"]
        for layer, size in layers:
            for name, kwargs, seeded in EXTENSIONS:
                found = status(layer, size, name, kwargs, seeded)
                if order.index(found) >= order.index(worst.get(name, "ok")):
                    worst[name] = found
        groups: Dict[str, List[str]] = {}
        for name, found in worst.items():
            groups.setdefault(found, []).append(name)
        if set(groups) == {"ok"}:
            summary = "all right"
        else:
            summary = "; ".join(
                f"**{found}**: {', '.join(names)}"
                for found, names in groups.items()
                if found != "ok"
            ) + ("; others right" if "ok" in groups else "")
        print(f"| {configuration} | {summary} | all right |")


if __name__ == "__main__":
    main()
