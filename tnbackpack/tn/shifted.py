"""Per-sample weight VJPs by shifted matrix products: no unfolded input.

The weight VJP of a convolution correlates two tensors: the one read at
strided, dilated positions (the padded input of a convolution, the output
gradient of a transposed one; called ``big`` here) and the one read densely
(``small``):

    out[b, rs, rb, k] = Σ_o small[b, rs, o] · big[b, rb, o·S + k·D].

Splitting ``big`` into its ``∏S`` stride phases turns every kernel tap into a
plain shift ``q = (k·D) // S`` of phase ``p = (k·D) mod S``. Flattened
row-major over a common grid, a shift of a multi-dimensional index is a shift of
the flat index, so each tap is *one* batched matrix product of ``small`` with a
strided view of one phase, ``∏K`` products in all. The index pattern ``Π`` is
never multiplied and the ``∏K``-fold copy of unfold is never made; the only
copies are one of each operand, zero-padded onto the grid.

Zero padding of ``small``'s inner dimensions makes positions that wrap around a
row read into terms that are multiplied by zero, so the flat shift is exact.
"""

from __future__ import annotations

import itertools
from math import prod
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .patches import fold_vectors, padded_input
from .simplify import pad_trailing
from .spec import ConvSpec


def _pad_to(tensor: Tensor, sizes: Sequence[int]) -> Tensor:
    """Zero-pad (on the right) or crop the trailing dims of ``tensor`` to ``sizes``."""
    trailing = tensor.shape[tensor.ndim - len(sizes) :]
    return pad_trailing(tensor, [(0, s - t) for s, t in zip(sizes, trailing)])


def shifted_correlation(
    big: Tensor,
    small: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """``out[b, rs, rb, k...] = Σ_o small[b, rs, o...] · big[b, rb, o·S + k·D]``.

    Args:
        big: ``[B, Rb, *L]``, read at strided positions (positions past ``L``
            read zeros).
        small: ``[B, Rs, *O]``, read densely.
        kernel_size: Taps ``K`` per spatial dimension.
        stride: ``S`` per spatial dimension.
        dilation: ``D`` per spatial dimension.

    Returns:
        ``[B, Rs, Rb, *K]``.
    """
    batch, rows_big = big.shape[:2]
    rows_small, out_size = small.shape[1], tuple(small.shape[2:])
    ndim = len(out_size)
    furthest = [(k - 1) * d // s for k, d, s in zip(kernel_size, dilation, stride)]
    grid = [
        max(-(-length // s), o + q)
        for length, s, o, q in zip(big.shape[2:], stride, out_size, furthest)
    ]
    # [B, Rb, J0, S0, J1, S1, ...] -> phases first: [S0, S1, ..., B, Rb, J0, J1, ...]
    big = _pad_to(big, [j * s for j, s in zip(grid, stride)])
    big = big.reshape(batch, rows_big, *itertools.chain(*zip(grid, stride)))
    order = [3 + 2 * d for d in range(ndim)] + [0, 1] + [2 + 2 * d for d in range(ndim)]
    phases = big.permute(order).reshape(*stride, batch, rows_big, prod(grid))
    flat_strides = [prod(grid[d + 1 :]) for d in range(ndim)]
    tail = sum(q * f for q, f in zip(furthest, flat_strides))
    phases = F.pad(phases, (0, tail))

    rows = out_size[0] * flat_strides[0]
    small = _pad_to(small, [out_size[0], *grid[1:]]).reshape(batch, rows_small, rows)

    taps: List[Tensor] = []
    for tap in itertools.product(*(range(k) for k in kernel_size)):
        offsets = [t * d for t, d in zip(tap, dilation)]
        phase: Tuple[int, ...] = tuple(o % s for o, s in zip(offsets, stride))
        shift = sum((o // s) * f for o, s, f in zip(offsets, stride, flat_strides))
        window = phases[phase][:, :, shift : shift + rows]
        taps.append(torch.matmul(small, window.transpose(1, 2)))
    return torch.stack(taps, dim=-1).reshape(batch, rows_small, rows_big, *kernel_size)


def per_sample_weight_vjp(
    spec: ConvSpec, x: Tensor, grad_output: Tensor, vectors: bool = False
) -> Tensor:
    """Per-sample weight VJPs ``[(V,) N, *weight]`` by shifted matrix products.

    Arguments are those of :func:`tnbackpack.tn.functional.per_sample_weight_vjp`
    and are assumed checked.
    """
    n, groups = x.shape[0], spec.groups
    v = grad_output.shape[0] if vectors else 1
    if spec.transposed:
        # o = k·D + S·i − P: the output gradient is read at strided positions.
        left = [pair[0] for pair in spec.padding]
        pads = [p for pad in reversed(left) for p in (pad, 0)]
        big = fold_vectors(F.pad(grad_output, pads), groups, vectors)
        small = fold_vectors(x, groups, False)
    else:
        big = fold_vectors(padded_input(spec, x), groups, False)
        small = fold_vectors(grad_output, groups, vectors)
    out = shifted_correlation(big, small, spec.kernel_size, spec.stride, spec.dilation)
    # out: [N·G, Rs, Rb, *K]; one of Rs, Rb holds (V, C_out/G)
    kernel = spec.kernel_size
    c_in, c_out = spec.in_channels // groups, spec.out_channels // groups
    if spec.transposed:  # Rs = ci, Rb = (v, co) -> [V, N, G, ci, co, K]
        out = out.reshape(n, groups, c_in, v, c_out, *kernel).movedim(3, 0)
    else:  # Rs = (v, co), Rb = ci -> [V, N, G, co, ci, K]
        out = out.reshape(n, groups, v, c_out, c_in, *kernel).movedim(2, 0)
    lead = (v, n) if vectors else (n,)
    return out.reshape(*lead, *spec.weight_shape())
