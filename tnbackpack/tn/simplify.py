"""Structure-aware rewrites of a tensor network before it is contracted.

One rewrite covers the three special structures of Dangel (2023):

- **dense** (``K = S``, no padding, ``D = 1``; patchify/ViT and ConvNeXt stems),
- **down-sampling** (``S > K``, no padding, ``D = 1``; 1×1 stride-2 ResNet
  shortcuts), and
- **1×1 identity** (``K = S = 1``, no padding),

all of which are *non-overlapping strided windows*: with nothing padded on
the left and ``S ≥ D·(K−1) + 1`` the pattern is ``Π[k, ·, ·] = 1`` iff
``big = small·S + k·D`` (``big`` is the input position of a convolution and the
output position of a transposed one). Then the contraction with ``Π`` is an
index reshuffle: the ``big`` axis of length ``B`` is padded with zeros or
cropped to ``small·S``, split into ``(small, S)`` and sliced to the ``K`` taps
``0, D, ..., D·(K−1)`` — a strided view, no copy and no multiplication. When the
``big`` axis belongs to the result instead of an operand (input VJP of a
convolution, forward of a transposed one), the result is computed with
``(small, k)`` axes and scattered back.

Dilation and zero right padding are allowed as long as windows do not overlap;
for ``D = 1`` and ``S = K`` the split is a plain reshape (the dense case).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor

from .network import PatternLeg, TensorNetwork


def pad_trailing(tensor: Tensor, amounts: Sequence[Tuple[int, int]]) -> Tensor:
    """Pad the trailing dims by ``(left, right)`` zeros each; negative amounts crop.

    One ``F.pad`` call: measured 3x faster than concatenating zeros.
    """
    if not any(left or right for left, right in amounts):
        return tensor
    return F.pad(tensor, [p for pair in reversed(amounts) for p in pair])


def fit_length(tensor: Tensor, dim: int, length: int, left: int = 0) -> Tensor:
    """Pad ``left`` zeros before ``dim``, then crop or zero-pad it to ``length``."""
    dim = dim % tensor.ndim
    amounts = [(0, 0)] * (tensor.ndim - dim)
    amounts[0] = (left, length - left - tensor.shape[dim])
    return pad_trailing(tensor, amounts)


def _taps(leg: PatternLeg) -> slice:
    return slice(0, leg.dilation * (leg.kernel_size - 1) + 1, leg.dilation)


def _is_plain_reshape(leg: PatternLeg) -> bool:
    return leg.dilation == 1 and leg.kernel_size == leg.stride


def split_operand(tensor: Tensor, dim: int, leg: PatternLeg) -> Tensor:
    """Replace axis ``dim`` (the big leg) by the axes ``(small, k)``."""
    tensor = fit_length(tensor, dim, leg.small_size * leg.stride)
    tensor = tensor.unflatten(dim, (leg.small_size, leg.stride))
    if _is_plain_reshape(leg):
        return tensor
    index: Tuple[slice, ...] = (slice(None),) * (dim + 1) + (_taps(leg),)
    return tensor[index]


def merge_result(tensor: Tensor, dim: int, leg: PatternLeg) -> Tensor:
    """Inverse of :func:`split_operand` for a result: axes ``(small, k)`` → big."""
    if _is_plain_reshape(leg):
        full = tensor
    else:
        shape = list(tensor.shape)
        shape[dim + 1] = leg.stride
        full = tensor.new_zeros(shape)
        full[(slice(None),) * (dim + 1) + (_taps(leg),)] = tensor
    return fit_length(full.flatten(dim, dim + 1), dim, leg.big_size)


def simplify(tn: TensorNetwork) -> TensorNetwork:
    """Remove every strided-window pattern by reshaping its neighbour.

    Returns a new network; operands are views of the original ones wherever
    possible. Patterns that are not windows are kept for opt_einsum.
    """
    operands = list(tn.operands)
    axes = list(tn.axes)
    output = tn.output
    result_merges = []
    removed = set()
    for position, leg in tn.legs.items():
        if not leg.windows:
            continue
        # The big leg must sit on exactly one non-pattern operand or on the
        # result, and the (small, k) pair must be new there; otherwise (e.g. two
        # pattern copies sharing a transposed layer's output leg, or unfold of a
        # transposed layer, whose result already has k) keep the contraction.
        holders = [j for j, names in enumerate(axes) if leg.big in names]
        holders = [j for j in holders if j != position]
        in_output = leg.big in output
        if len(holders) + in_output != 1 or any(j in tn.legs for j in holders):
            continue
        target = axes[holders[0]] if holders else output
        if leg.small in target or leg.kernel in target:
            continue
        removed.add(position)
        if holders:
            j = holders[0]
            dim = axes[j].index(leg.big)
            operands[j] = split_operand(operands[j], dim, leg)
            axes[j] = axes[j][:dim] + (leg.small, leg.kernel) + axes[j][dim + 1 :]
        else:
            dim = output.index(leg.big)
            output = output[:dim] + (leg.small, leg.kernel) + output[dim + 1 :]
            result_merges.append(leg)
    if not removed:
        return tn

    simplified = TensorNetwork(
        [op for j, op in enumerate(operands) if j not in removed],
        [names for j, names in enumerate(axes) if j not in removed],
        output,
        deferred=tn.deferred,  # the kept patterns are still placeholders
    )
    final_output = tn.output

    def undo_result_splits(result: Tensor) -> Tensor:
        names = output
        for leg in result_merges:
            dim = names.index(leg.small)
            result = merge_result(result, dim, leg)
            names = names[:dim] + (leg.big,) + names[dim + 2 :]
        assert names == final_output
        return result

    if result_merges:
        simplified.then(undo_result_splits)
    if tn.finalize is not None:
        simplified.then(tn.finalize)
    return simplified
