"""Routes through PyTorch's own convolution kernels, where they are fastest.

The batch-summed weight gradient is what PyTorch's backward computes anyway;
its kernels (``torch.nn.grad.conv{1,2,3}d_weight``) beat any contraction we
can schedule for it. Padding modes other than zeros, asymmetric padding and
transposed layers are mapped onto a plain convolution first, so the route is
exact for every configuration with 1 to 3 spatial dimensions.
"""

from __future__ import annotations

import torch.nn.grad as conv_grad
from torch import Tensor

from .patches import padded_input
from .simplify import fit_length
from .spec import ConvSpec

_WEIGHT_GRADIENTS = {
    1: conv_grad.conv1d_weight,
    2: conv_grad.conv2d_weight,
    3: conv_grad.conv3d_weight,
}


def supports(spec: ConvSpec) -> bool:
    """Whether PyTorch has kernels for this number of spatial dimensions."""
    return spec.ndim in _WEIGHT_GRADIENTS


def weight_vjp(spec: ConvSpec, x: Tensor, grad_output: Tensor) -> Tensor:
    """Batch-summed weight gradient by PyTorch's convolution weight gradient.

    A transposed layer's weight gradient is that of the convolution which maps
    its output gradient (cropped by the padding, i.e. read from position
    ``P_left`` on) to its input, with the same weight tensor.
    """
    gradient = _WEIGHT_GRADIENTS[spec.ndim]
    if not spec.transposed:
        return gradient(
            padded_input(spec, x),
            spec.weight_shape(),
            grad_output,
            stride=spec.stride,
            dilation=spec.dilation,
            groups=spec.groups,
        )
    shifted = grad_output
    for d in range(spec.ndim):
        left = spec.padding[d][0]
        reach = (x.shape[2 + d] - 1) * spec.stride[d]
        length = reach + spec.dilation[d] * (spec.kernel_size[d] - 1) + 1
        shifted = fit_length(shifted, 2 + d, length, left)
    return gradient(
        shifted,
        spec.weight_shape(),
        x,
        stride=spec.stride,
        dilation=spec.dilation,
        groups=spec.groups,
    )
