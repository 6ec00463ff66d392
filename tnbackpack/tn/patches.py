"""Patches of a convolution's input as a zero-copy strided view.

``Tensor.unfold`` per spatial dimension turns the padded input into a view
``[N, C_in, *O, *K]`` whose entry at ``(o, k)`` is input position
``o·S + k·D``: every patch, without the ``∏K``-fold copy of im2col. The copy
happens only where a consumer needs a matrix (the Gram matrix of the KFAC
expand factor), and then once, straight into the layout that matrix product
wants. This is the "unfold + matmul" route, which beats a pattern contraction
for the expand factor of overlapping kernels.

Transposed convolutions are not strided views of their input (they insert
zeros), so they keep the tensor-network route.
"""

from __future__ import annotations

from math import prod
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .graph import records_graph
from .pattern import pad_by_reading
from .spec import ConvSpec


def padded_input(spec: ConvSpec, x: Tensor) -> Tensor:
    """The convolution's input with its padding applied (any padding mode, N-d).

    Non-zero modes read the same source positions as the index pattern does
    (:func:`.pattern.source_positions`), one spatial dimension at a time, so
    they work for any number of dimensions (``F.pad`` stops at three).
    """
    pads = [p for pair in reversed(spec.padding) for p in pair]
    if not any(pads):
        return x
    if spec.padding_mode == "zeros":
        return F.pad(x, pads)
    for d, (left, right) in enumerate(spec.padding):
        if left or right:
            x = pad_by_reading(x, 2 + d, left, right, spec.padding_mode)
    return x


#: With fewer output positions, the vectors of a per-sample VJP are folded into
#: one product (see :func:`per_sample_weight_vjp`)...
FOLD_BELOW_POSITIONS = 512
#: ...unless a patch has fewer entries than this: folding copies the vectors,
#: and the copy only pays off beside a long product per entry (ConvNeXt's
#: 4x4/4 stem, 3 input channels, 256 positions: 20 ms folded, 17 ms not).
FOLD_FROM_PATCH_SIZE = 128


def patches_view(spec: ConvSpec, x: Tensor, output_size: Sequence[int]) -> Tensor:
    """Zero-copy view ``[N, C_in, *O, *K]`` of the patches of a convolution.

    Args:
        spec: A (non-transposed) convolution.
        x: Its input ``[N, C_in, *I]``.
        output_size: Spatial output size ``O``.

    Raises:
        ValueError: For a transposed convolution.
    """
    if spec.transposed:
        raise ValueError(
            f"{spec.describe()}: patches of a transposed layer are no view"
        )
    view = padded_input(spec, x)
    for d in range(spec.ndim):
        k, s, dil = spec.kernel_size[d], spec.stride[d], spec.dilation[d]
        span = dil * (k - 1) + 1
        view = view.narrow(2 + d, 0, (output_size[d] - 1) * s + span)
        view = view.unfold(2 + d, span, s)[..., ::dil]
    return view


def kfac_expand_input_factor(
    spec: ConvSpec, x: Tensor, output_size: Sequence[int]
) -> Tensor:
    """``1/(N·T) Σ_{n,t} x̃ x̃ᵀ`` per group, ``[G, ci·∏K, ci·∏K]``, by one Gram matrix.

    The patches are copied once into ``[G, ci·∏K, N·T]`` and multiplied with
    their transpose.
    """
    view = patches_view(spec, x, output_size)  # [N, C, *O, *K]
    n, ndim, groups = x.shape[0], spec.ndim, spec.groups
    grouped = view.reshape(n, groups, -1, *view.shape[2:])  # [N, G, ci, *O, *K]
    spatial = list(range(3, 3 + ndim))
    taps = list(range(3 + ndim, 3 + 2 * ndim))
    order = [1, 2, *taps, 0, *spatial]  # [G, ci, *K, N, *O]
    positions = prod(output_size)
    columns = grouped.permute(order).reshape(groups, -1, n * positions)
    # in place is fine under autograd too: division by a number saves nothing
    return (columns @ columns.transpose(1, 2)).div_(n * positions)


def per_sample_weight_vjp(
    spec: ConvSpec, x: Tensor, grad_output: Tensor, vectors: bool = False
) -> Tensor:
    """Per-sample weight VJPs ``[(V,) N, *weight]``: one copy of the patches.

    Best when many output-gradient rows share one input (e.g. the ``V``
    columns of a backpropagated square root): the patches are copied once and
    meet the vectors in batched products. With many output positions each
    vector gets its own product, written straight into its slice of the result
    (no copy of the ``V`` vectors, measured 67 ms of 300 ms saved for a 32x32
    layer with V=10); with few positions (and patches long enough that the
    copy of the vectors pays off), or for depthwise layers, the vectors are
    folded into one taller product, which keeps the matrix product efficient
    (measured 1.3x faster for 6x6 and 12x12 outputs).
    """
    n, groups = x.shape[0], spec.groups
    out_size = tuple(grad_output.shape[-spec.ndim :])
    view = patches_view(spec, x, out_size)  # [N, C, *O, *K]
    ndim = spec.ndim
    order = [0, 1, *range(2 + ndim, 2 + 2 * ndim), *range(2, 2 + ndim)]
    columns = view.permute(order).reshape(n * groups, -1, prod(out_size))
    columns = columns.transpose(1, 2)  # [N·G, T, ci·∏K]
    # Fold the vectors into one taller product when there are few positions,
    # or when every group has one output channel (depthwise): folding is then
    # a view, and the patches are read once instead of once per vector
    # (measured 191 -> 122 ms for 10 vectors on MobileNetV2's 3x3/2 layer).
    depthwise = spec.out_channels == groups
    few_positions = prod(out_size) < FOLD_BELOW_POSITIONS
    if vectors and (
        depthwise or (few_positions and columns.shape[2] >= FOLD_FROM_PATCH_SIZE)
    ):
        rows = fold_vectors(grad_output.flatten(-ndim), groups, vectors)
        out = torch.bmm(rows, columns)  # [N·G, V·co, ci·∏K]
        v = grad_output.shape[0]
        out = out.reshape(n, groups, v, -1, columns.shape[2]).movedim(2, 0)
        return out.reshape(v, n, *spec.weight_shape())
    stack = grad_output if vectors else grad_output.unsqueeze(0)
    rows = stack.reshape(stack.shape[0], n * groups, -1, prod(out_size))
    if records_graph(rows, columns):  # autograd refuses out=
        out = torch.stack([torch.bmm(vector, columns) for vector in rows])
    else:
        out = rows.new_empty(
            stack.shape[0], n * groups, rows.shape[2], columns.shape[2]
        )
        for vector, result in zip(rows, out):
            torch.bmm(vector, columns, out=result)
    lead = (stack.shape[0], n) if vectors else (n,)
    return out.reshape(*lead, *spec.weight_shape())


def fold_vectors(tensor: Tensor, groups: int, vectors: bool) -> Tensor:
    """``[(V,) N, C, *S] -> [N·G, (V·)C/G, *S]``: vectors become extra rows."""
    if not vectors:
        return tensor.reshape(tensor.shape[0] * groups, -1, *tensor.shape[2:])
    v, n, c = tensor.shape[:3]
    spatial = tensor.shape[3:]
    grouped = tensor.reshape(v, n, groups, c // groups, *spatial)
    grouped = grouped.movedim(0, 2)  # [N, G, V, C/G, *S]
    return grouped.reshape(n * groups, v * c // groups, *spatial)
