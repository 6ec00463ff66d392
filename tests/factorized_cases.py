"""References for the factorized-convolution tests, written independently of the code.

- :func:`rebuilt_kernel`: the dense kernel from the factors by ``torch.einsum``
  strings written here from the documented factor layouts;
- :class:`RebuiltConv`: the layer as PyTorch's own convolution with that
  kernel (sharing the factor parameters), for ``torch.func`` references;
- :func:`stage_sequence`: the layer as an explicit ``nn.Sequential`` of
  ordinary PyTorch convolutions (CP, Tucker-2, TT), for Kronecker factors.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

import torch
from torch import Tensor, nn

from tnbackpack.nn import FactorizedConv1d, FactorizedConv2d, FactorizedConv3d

LAYERS = {1: FactorizedConv1d, 2: FactorizedConv2d, 3: FactorizedConv3d}
DENSE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SPATIAL = {1: "w", 2: "hw", 3: "thw"}
BONDS = "abdef"


def kernel_equation(factorization: str, ndim: int) -> str:
    """The dense kernel ``[o, c, *k]`` from one group's factors."""
    s = SPATIAL[ndim]
    if factorization == "cp":
        inputs = ["rc", *("r" + k for k in s), "or"]
    elif factorization == "tucker":
        inputs = ["ac", "ba" + s, "ob"]
    else:
        ring = "z" if factorization == "tr" else ""
        cores = [BONDS[i + 1] + BONDS[i] + k for i, k in enumerate(s)]
        inputs = ["a" + ring + "c", *cores, "o" + BONDS[ndim] + ring]
    return ",".join(inputs) + "->oc" + s


def rebuilt_kernel(layer: nn.Module, factors: Dict[str, Tensor]) -> Tensor:
    """``[C_out, C_in/G, *K]``: each group's factors contracted, groups stacked."""
    g = layer.groups
    equation = kernel_equation(layer.factorization, layer.ndim)
    names = list(layer.factors)
    blocks = []
    for group in range(g):
        pieces = [
            factors[n].reshape(g, factors[n].shape[0] // g, *factors[n].shape[1:])[
                group
            ]
            for n in names
        ]
        blocks.append(torch.einsum(equation, *pieces))
    return torch.cat(blocks)


class RebuiltConv(nn.Module):
    """The factorized layer as PyTorch's convolution of its rebuilt kernel.

    Registers the *same* parameter objects under the same names, so a model
    using it has the parameter names of the model using the factorized layer.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.names = list(layer.factors)
        for name, param in layer.factors.items():
            self.register_parameter(name, param)
        self.bias = layer.bias
        self.factorization = layer.factorization
        self.ndim = layer.ndim
        self.groups = layer.groups
        # not a submodule: only its hyper-parameters and padding logic are used
        self.__dict__["dense"] = DENSE[layer.ndim](
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=False,
            padding_mode=layer.padding_mode,
        )

    @property
    def factors(self) -> Dict[str, Tensor]:
        return {n: getattr(self, n) for n in self.names}

    def forward(self, x: Tensor) -> Tensor:
        kernel = rebuilt_kernel(self, self.factors)
        return self.dense._conv_forward(x, kernel, self.bias)


@dataclass
class Case:
    """A factorized layer inside ``conv -> ReLU -> layer -> Sigmoid -> linear``."""

    factorization: str
    rank: Any
    ndim: int = 2
    in_channels: int = 4
    out_channels: int = 4
    kernel_size: Any = 3
    input_size: Tuple[int, ...] = (6, 5, 4)
    kwargs: Dict[str, Any] = field(default_factory=dict)
    batch: int = 3

    def layer(self) -> nn.Module:
        return LAYERS[self.ndim](
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.rank,
            self.factorization,
            **self.kwargs,
        ).double()

    def size(self) -> Tuple[int, ...]:
        return self.input_size[: self.ndim]

    def x(self) -> Tensor:
        return torch.randn(self.batch, 2, *self.size(), dtype=torch.float64)

    def id(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.factorization}{self.rank}-{self.ndim}d-{extra}"


def model_pair(case: Case, seed: int = 0) -> Tuple[nn.Sequential, nn.Sequential]:
    """The network with the factorized layer, and the same with its rebuilt conv.

    Both have the same parameter names and values; the factors are shared.
    """
    torch.manual_seed(seed)
    dense = DENSE[case.ndim]
    first = dense(2, case.in_channels, 3, padding=1).double()
    layer = case.layer()
    with torch.no_grad():
        features = nn.Sequential(first, nn.ReLU(), layer, nn.Sigmoid(), nn.Flatten())
        width = features(case.x()).shape[1]
    head = nn.Linear(width, 3).double()
    model = nn.Sequential(first, nn.ReLU(), layer, nn.Sigmoid(), nn.Flatten(), head)
    # copies of the plain layers: BackPACK's hooks on the extended model's
    # modules must not run inside torch.func transforms of the reference
    reference = nn.Sequential(
        deepcopy(first),
        nn.ReLU(),
        RebuiltConv(layer),
        nn.Sigmoid(),
        nn.Flatten(),
        deepcopy(head),
    )
    return model, reference


def stage_sequence(layer: nn.Module) -> nn.Sequential:
    """The CP / Tucker-2 / TT layer as PyTorch convolutions, weights copied."""
    d, g = layer.ndim, layer.groups
    conv = DENSE[d]
    kwargs = {"padding_mode": layer.padding_mode}
    factors = list(layer.factors.values())

    def along(axis: int, c_in: int, c_out: int, groups: int) -> nn.Module:
        def pick(value: Tuple[int, ...], other: int) -> Tuple[int, ...]:
            return tuple(v if i == axis else other for i, v in enumerate(value))

        if isinstance(layer.padding, str):
            padding = layer.padding
        else:
            padding = pick(layer.padding, 0)
        return conv(
            c_in,
            c_out,
            pick(layer.kernel_size, 1),
            stride=pick(layer.stride, 1),
            padding=padding,
            dilation=pick(layer.dilation, 1),
            groups=groups,
            bias=False,
            **kwargs,
        )

    first = factors[0]
    stages = [conv(layer.in_channels, first.shape[0], 1, groups=g, bias=False)]
    if layer.factorization == "cp":
        width = first.shape[0]
        stages += [along(i, width, width, width) for i in range(d)]
    elif layer.factorization == "tucker":
        core = factors[1]
        stages.append(
            conv(
                core.shape[1] * g,
                core.shape[0],
                layer.kernel_size,
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                groups=g,
                bias=False,
                **kwargs,
            )
        )
    else:
        for i in range(d):
            core = factors[1 + i]
            stages.append(along(i, core.shape[1] * g, core.shape[0], g))
    last = factors[-1]
    stages.append(
        conv(
            last.shape[1] * g,
            layer.out_channels,
            1,
            groups=g,
            bias=layer.bias is not None,
        )
    )
    sequence = nn.Sequential(*stages).double()
    with torch.no_grad():
        for stage, factor in zip(sequence, factors):
            stage.weight.copy_(factor.reshape(stage.weight.shape))
        if layer.bias is not None:
            sequence[-1].bias.copy_(layer.bias)
    return sequence
