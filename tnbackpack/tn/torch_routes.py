"""Routes through PyTorch's own convolution kernels, where they are fastest.

The batch-summed weight gradient and the input VJP are what PyTorch's backward
computes anyway; its kernels (``torch.nn.grad``, ``F.conv*d``) beat any
contraction we can schedule for overlapping kernels. Padding modes other than
zeros, asymmetric padding and transposed layers are mapped onto a plain
unpadded convolution first (the padding applied explicitly, or its adjoint
afterwards), so the routes are exact for every configuration with 1 to 3
spatial dimensions. Only public PyTorch functions are used.
"""

from __future__ import annotations

from math import prod
from typing import Optional, Sequence, Tuple

import torch.nn.functional as F
import torch.nn.grad as conv_grad
from torch import Tensor

from .patches import padded_input
from .pattern import fold_padding
from .simplify import fit_length
from .spec import ConvSpec

_WEIGHT_GRADIENTS = {
    1: conv_grad.conv1d_weight,
    2: conv_grad.conv2d_weight,
    3: conv_grad.conv3d_weight,
}
#: Input VJPs of more rows than this many elements (per row: the larger of
#: output gradient and input gradient) run in chunks (:func:`input_vjp`).
#: Measured with 10 vectors, batch 32 (ms, whole vs chunks of 2^22 / 2^20):
#: ResNet 3x3 476 / 470 / 406, Conv3d 3x3x3 211 / 230 / 143, Inception 7x1
#: 452 / 382 / 391, M5 Conv1d k3 122 / 70 / 77; 3c3d's small layers unchanged.
MAX_CHUNK_ELEMENTS = 2**20

_CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_TRANSPOSED_CONVOLUTIONS = {
    1: F.conv_transpose1d,
    2: F.conv_transpose2d,
    3: F.conv_transpose3d,
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
        x, padding = _input_and_padding(spec, x)
        return gradient(
            x,
            spec.weight_shape(),
            grad_output,
            stride=spec.stride,
            padding=padding,
            dilation=spec.dilation,
            groups=spec.groups,
        )
    return gradient(
        _aligned_output(spec, grad_output, x.shape[2:]),
        spec.weight_shape(),
        x,
        stride=spec.stride,
        dilation=spec.dilation,
        groups=spec.groups,
    )


def forward(
    spec: ConvSpec, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None
) -> Tensor:
    """Output ``[N, C_out, *O]`` of a convolution by PyTorch's kernel.

    Padding the kernel cannot apply (other modes, asymmetric) is applied first,
    as for the weight gradient. Differentiable; convolutions only.
    """
    if spec.transposed:
        raise ValueError(f"{spec.describe()}: forward route is for convolutions")
    x, padding = _input_and_padding(spec, x)
    return _CONVOLUTIONS[spec.ndim](
        x, weight, bias, spec.stride, padding, spec.dilation, spec.groups
    )


def _kernel_padding(spec: ConvSpec) -> Optional[Tuple[int, ...]]:
    """The padding PyTorch's kernels can apply themselves, ``None`` if they cannot.

    Its kernels pad with zeros, the same amount on both sides; other padding
    is applied (or, for gradients, folded back) around the kernel call.
    """
    symmetric = all(left == right for left, right in spec.padding)
    if spec.padding_mode == "zeros" and symmetric:
        return tuple(left for left, _ in spec.padding)
    return None


def _input_and_padding(spec: ConvSpec, x: Tensor) -> Tuple[Tensor, Tuple[int, ...]]:
    """The input and the padding to pass to PyTorch's kernel.

    Padding the kernel can apply is left to it, which saves a padded copy of
    the input (fresh pages on every call); other padding is applied here.
    """
    padding = _kernel_padding(spec)
    if padding is not None:
        return x, padding
    return padded_input(spec, x), (0,) * spec.ndim


def _aligned_output(
    spec: ConvSpec, grad_output: Tensor, input_size: Sequence[int]
) -> Tensor:
    """Shift a transposed layer's output gradient by its left crop and fit it.

    The length is what an unpadded convolution needs to map it back to
    ``input_size``. Positions past that length are read by no (input
    position, tap) pair.
    """
    for d in range(spec.ndim):
        left = spec.padding[d][0]
        reach = (input_size[d] - 1) * spec.stride[d]
        length = reach + spec.dilation[d] * (spec.kernel_size[d] - 1) + 1
        grad_output = fit_length(
            grad_output, grad_output.ndim - spec.ndim + d, length, left
        )
    return grad_output


def _unpad_adjoint(
    spec: ConvSpec, grad_padded: Tensor, input_size: Sequence[int]
) -> Tensor:
    """Adjoint of :func:`.patches.padded_input`: fold padded positions back.

    Zero padding is cropped; the other modes add each padded position onto
    the real position it copies (the same map as the index pattern's).
    """
    ndim = spec.ndim
    for d in range(ndim):
        left, right = spec.padding[d]
        if left == right == 0:
            continue
        dim = grad_padded.ndim - ndim + d
        size = input_size[d]
        if spec.padding_mode == "zeros":
            grad_padded = grad_padded.narrow(dim, left, size)
            continue
        grad_padded = fold_padding(
            grad_padded, dim, left, right, size, spec.padding_mode
        )
    return grad_padded


def input_vjp(
    spec: ConvSpec,
    grad_output: Tensor,
    weight: Tensor,
    input_size: Sequence[int],
    vectors: bool = False,
) -> Tensor:
    """Input VJPs ``[(V,) N, C_in, *I]`` by PyTorch's kernels.

    A convolution's input gradient is the transposed convolution of the output
    gradient. Symmetric zero padding is passed to the kernel, which then writes
    only the real input positions (measured 15-30% faster than computing the
    padded gradient and cropping it, and the padded buffer is gone: 61 vs 45 MB
    for an Inception 7x1 layer with 10 vectors). Other padding runs unpadded in
    the kernel onto the padded input (asymmetric ``'same'`` padding works;
    ``output_padding`` reaches the padded size), followed by the padding's
    adjoint. A transposed layer's input gradient is the plain convolution of
    its aligned output gradient.
    """
    input_size = tuple(input_size)
    flat = grad_output.flatten(0, 1) if vectors else grad_output
    rows = flat.shape[0]
    row_elements = max(prod(flat.shape[1:]), spec.in_channels * prod(input_size))
    chunk = max(1, MAX_CHUNK_ELEMENTS // row_elements)
    if chunk >= rows:
        result = _input_vjp_rows(spec, flat, weight, input_size)
    else:
        # PyTorch's kernel copies its whole input and output into its own
        # layout; in chunks, those copies stay small and in cache (an
        # Inception 7x1 layer with 10 vectors: peak 196 -> 135 MB, and faster)
        chunk = -(-rows // -(-rows // chunk))  # equal chunks
        result = flat.new_empty(rows, spec.in_channels, *input_size)
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            result[start:stop] = _input_vjp_rows(
                spec, flat[start:stop], weight, input_size
            )
    return result.unflatten(0, grad_output.shape[:2]) if vectors else result


def _input_vjp_rows(
    spec: ConvSpec, flat: Tensor, weight: Tensor, input_size: Tuple[int, ...]
) -> Tensor:
    """:func:`input_vjp` of ``[B, C_out, *O]`` rows in one kernel call."""
    if spec.transposed:
        return _CONVOLUTIONS[spec.ndim](
            _aligned_output(spec, flat, input_size),
            weight,
            stride=spec.stride,
            dilation=spec.dilation,
            groups=spec.groups,
        )
    reached = [
        (o - 1) * s + d * (k - 1) + 1
        for o, s, d, k in zip(
            flat.shape[2:], spec.stride, spec.dilation, spec.kernel_size
        )
    ]
    padded_size = [
        size + left + right for size, (left, right) in zip(input_size, spec.padding)
    ]
    padding = _kernel_padding(spec)
    result = _TRANSPOSED_CONVOLUTIONS[spec.ndim](
        flat,
        weight,
        stride=spec.stride,
        padding=0 if padding is None else padding,
        output_padding=tuple(p - r for p, r in zip(padded_size, reached)),
        groups=spec.groups,
        dilation=spec.dilation,
    )
    return result if padding is not None else _unpad_adjoint(spec, result, input_size)


def per_sample_weight_vjp(
    spec: ConvSpec, x: Tensor, grad_output: Tensor, vectors: bool = False
) -> Tensor:
    """Per-sample weight VJPs ``[(V,) N, *weight]`` by a grouped weight gradient.

    Folding the batch (and vectors) into the channel groups turns the
    per-sample gradients into one weight gradient of a convolution with
    ``B·G`` groups. With one vector per sample it is often the fastest route
    (a dense 3x3 layer: as fast as PyTorch's summed weight gradient); with
    ``V`` vectors it runs ``V·B·G`` groups and falls far behind unless every
    group is a single channel.
    """
    n = x.shape[0]
    v = grad_output.shape[0] if vectors else 1
    if vectors:
        x = x.unsqueeze(0).expand(v, *x.shape).flatten(0, 1)
        grad_output = grad_output.flatten(0, 1)
    batch = v * n
    padding = (0,) * spec.ndim
    if spec.transposed:  # the convolution from output gradient to input
        big, small = _aligned_output(spec, grad_output, x.shape[2:]), x
    else:
        (big, padding), small = _input_and_padding(spec, x), grad_output
    folded_big = big.reshape(1, -1, *big.shape[2:])
    folded_small = small.reshape(1, -1, *small.shape[2:])
    shape = spec.weight_shape()
    gradient = _WEIGHT_GRADIENTS[spec.ndim](
        folded_big,
        (batch * shape[0], *shape[1:]),
        folded_small,
        stride=spec.stride,
        padding=padding,
        dilation=spec.dilation,
        groups=batch * spec.groups,
    )
    lead = (v, n) if vectors else (n,)
    return gradient.reshape(*lead, *shape)
