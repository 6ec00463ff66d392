"""The engine in thirty lines: a convolution and its per-sample gradients as einsums.

Checks tnbackpack's tensor-network forward pass against PyTorch's own
convolution and its per-sample weight gradients against ``torch.func``, for a
few layers, and prints the largest differences.
"""

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from tnbackpack.tn import ConvSpec, functional

LAYERS = {
    "Conv2d 3x3, padding='same'": (nn.Conv2d(3, 8, 3, padding="same"), (12, 12)),
    "Conv2d 4x4, stride 2, circular": (
        nn.Conv2d(3, 8, 4, stride=2, padding=1, padding_mode="circular"),
        (12, 12),
    ),
    "Conv1d depthwise, dilation 2": (
        nn.Conv1d(6, 6, 3, dilation=2, groups=6, padding=2),
        (20,),
    ),
    "ConvTranspose2d, output_padding": (
        nn.ConvTranspose2d(3, 8, 3, stride=2, padding=1, output_padding=1),
        (6, 6),
    ),
}


def _sample_loss(layer, weight, x_n, g_n):
    """``<layer(x_n), g_n>`` as a function of the weight (one sample)."""
    y_n = functional_call(layer, {"weight": weight}, (x_n.unsqueeze(0),))
    return (y_n.squeeze(0) * g_n).sum()


def main() -> None:
    """Compare forward passes and per-sample gradients with PyTorch."""
    torch.manual_seed(0)
    print(f"{'layer':36s} {'forward':>10s} {'per-sample grad':>16s}")
    for name, (layer, size) in LAYERS.items():
        layer = layer.double()
        spec = ConvSpec.from_module(layer)
        x = torch.randn(4, layer.in_channels, *size, dtype=torch.float64)
        y = layer(x)
        ours_y = functional.forward(spec, x, layer.weight, layer.bias)
        forward_error = (ours_y - y).abs()

        grad_output = torch.randn_like(y)
        reference = vmap(grad(_sample_loss, argnums=1), in_dims=(None, None, 0, 0))(
            layer, layer.weight.detach(), x, grad_output
        )
        ours = functional.per_sample_weight_vjp(spec, x, grad_output)
        grad_error = (ours - reference).abs()
        print(f"{name:36s} {forward_error.max():10.1e} {grad_error.max():16.1e}")
    print("tnbackpack's tensor networks agree with PyTorch.")


if __name__ == "__main__":
    main()
