"""Small test models: (transposed) convolutions -> activation -> flatten -> linear.

Hyper-parameters are written once for every dimension: a tuple-valued
argument such as ``kernel_size=(3, 2, 1)`` is cut to the layer's number of
spatial dimensions (``(3,)`` in 1d, ``(3, 2)`` in 2d), ints are kept.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Sequence, Tuple

import torch
from torch import nn

CONV_CLASSES = {
    (1, False): nn.Conv1d,
    (2, False): nn.Conv2d,
    (3, False): nn.Conv3d,
    (1, True): nn.ConvTranspose1d,
    (2, True): nn.ConvTranspose2d,
    (3, True): nn.ConvTranspose3d,
}

_PER_DIMENSION = ("kernel_size", "stride", "padding", "dilation", "output_padding")


def for_ndim(kwargs: Dict[str, Any], ndim: int) -> Dict[str, Any]:
    """Cut tuple-valued per-dimension hyper-parameters to ``ndim`` entries."""
    return {
        key: value[:ndim]
        if key in _PER_DIMENSION and isinstance(value, tuple)
        else value
        for key, value in kwargs.items()
    }


def conv_layer(ndim: int, transposed: bool = False, **kwargs: Any) -> nn.Module:
    """``nn.Conv{ndim}d`` or ``nn.ConvTranspose{ndim}d`` from generic kwargs."""
    return CONV_CLASSES[(ndim, transposed)](**for_ndim(kwargs, ndim))


def conv_net(
    ndim: int,
    convs: Sequence[Dict[str, Any]],
    in_channels: int,
    input_size: Sequence[int],
    num_outputs: int,
    activation: Callable[[], nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """``[conv -> activation] * len(convs) -> flatten -> linear``.

    Args:
        ndim: Number of spatial dimensions.
        convs: One kwargs dict per conv layer (``in_channels`` is chained and
            must be left out; ``transposed=True`` selects a ConvTranspose).
        in_channels: Channels of the network input.
        input_size: Spatial size of the network input (to size the linear layer).
        num_outputs: Output features of the linear layer.
        activation: Builds the activation after each conv.
    """
    layers = []
    channels = in_channels
    for kwargs in convs:
        kwargs = dict(kwargs)
        transposed = kwargs.pop("transposed", False)
        layers += [
            conv_layer(ndim, transposed, in_channels=channels, **kwargs),
            activation(),
        ]
        channels = kwargs["out_channels"]
    features = nn.Sequential(*layers, nn.Flatten())
    with torch.no_grad():
        num_features = features(torch.zeros(1, in_channels, *input_size)).shape[1]
    return nn.Sequential(*features, nn.Linear(num_features, num_outputs))


def input_shape(
    batch_size: int, in_channels: int, ndim: int, sizes: Tuple[int, ...] = (7, 6, 5)
) -> Tuple[int, ...]:
    """``(N, C_in, *I)`` with the first ``ndim`` entries of ``sizes``."""
    return (batch_size, in_channels, *sizes[:ndim])
