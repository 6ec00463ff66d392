"""Index patterns: the binary tensors that turn a convolution into an einsum.

For one spatial dimension the pattern ``Π[k, a, b]`` connects kernel tap ``k``,
the layer's *input* position ``a`` and the layer's *output* position ``b``:

- convolution: ``Π[k, i, o] = 1`` iff ``i = pad(k·D + S·o − P_left)``
- transposed convolution: ``Π[k, i, o] = 1`` iff ``o = k·D + S·i − P_left``

where ``pad`` maps a position of the virtually padded input to the real input
position it reads from. For zero padding a position outside ``[0, I)`` reads
nothing (no entry). For ``reflect``, ``replicate`` and ``circular`` it reads a
real position, so the padding mode lives inside the pattern and every
derivative of the layer inherits it with no extra code.

Patterns always use the layer's orientation (input leg, then output leg), so a
transposed convolution is handled by the same expressions as a convolution.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Tuple

import torch
from torch import Tensor


def source_positions(
    virtual: Tensor, size: int, padding_mode: str
) -> Tuple[Tensor, Tensor]:
    """Map virtual (padded) positions to real input positions.

    Returns:
        The real positions and a mask of the virtual positions that read one.

    Raises:
        ValueError: If the padding is too large for the mode (PyTorch rejects
            these too).
    """
    inside = (virtual >= 0) & (virtual < size)
    if padding_mode == "zeros":
        return virtual.clamp(0, size - 1), inside
    lowest, highest = int(virtual.min()), int(virtual.max())
    overshoot = max(-lowest, highest - (size - 1), 0)
    if padding_mode == "replicate":
        return virtual.clamp(0, size - 1), torch.ones_like(inside)
    if padding_mode == "reflect":
        if overshoot > size - 1:
            raise ValueError(
                f"padding_mode='reflect' needs padding < input size, but the input "
                f"has size {size} and needs {overshoot} padded positions"
            )
        real = torch.where(virtual < 0, -virtual, virtual)
        real = torch.where(real >= size, 2 * (size - 1) - real, real)
        return real, torch.ones_like(inside)
    if padding_mode == "circular":
        if overshoot > size:
            raise ValueError(
                f"padding_mode='circular' needs padding <= input size, but the input "
                f"has size {size} and needs {overshoot} padded positions"
            )
        return virtual.remainder(size), torch.ones_like(inside)
    raise ValueError(f"unknown padding_mode {padding_mode!r}")


def pad_by_reading(
    x: Tensor, dim: int, left: int, right: int, padding_mode: str
) -> Tensor:
    """Pad dimension ``dim`` by reading real positions (:func:`source_positions`).

    For ``reflect``, ``replicate`` and ``circular``, on any dimension (one call
    per padded dimension, so any number of them, where ``F.pad`` stops at 3).
    """
    size = x.shape[dim]
    virtual = torch.arange(-left, size + right, device=x.device)
    real, _ = source_positions(virtual, size, padding_mode)
    return x.index_select(dim, real)


def fold_padding(
    grad: Tensor, dim: int, left: int, right: int, size: int, padding_mode: str
) -> Tensor:
    """Adjoint of :func:`pad_by_reading` on dimension ``dim``.

    Each padded position's gradient is added onto the real position it reads
    (``size`` real positions).
    """
    virtual = torch.arange(-left, size + right, device=grad.device)
    real, _ = source_positions(virtual, size, padding_mode)
    shape = list(grad.shape)
    shape[dim] = size
    return grad.new_zeros(shape).index_add_(dim, real, grad)


def _entries(
    input_size: int,
    output_size: int,
    kernel_size: int,
    stride: int,
    padding_left: int,
    dilation: int,
    padding_mode: str,
    transposed: bool,
):
    """Indices ``(k, i, o)`` of the ones; at most one ``i`` per ``(k, o)``."""
    taps = torch.arange(kernel_size).unsqueeze(1) * dilation
    if transposed:
        inputs = torch.arange(input_size).unsqueeze(0)
        outputs = taps + stride * inputs - padding_left  # [K, I]
        keep = (outputs >= 0) & (outputs < output_size)
        k_idx, i_idx = keep.nonzero(as_tuple=True)
        return k_idx, i_idx, outputs[k_idx, i_idx]
    outputs = torch.arange(output_size).unsqueeze(0)
    virtual = taps + stride * outputs - padding_left  # [K, O]
    real, keep = source_positions(virtual, input_size, padding_mode)
    k_idx, o_idx = keep.nonzero(as_tuple=True)
    return k_idx, real[k_idx, o_idx], o_idx


@lru_cache(maxsize=512)
def index_pattern(
    input_size: int,
    output_size: int,
    kernel_size: int,
    stride: int,
    padding_left: int,
    dilation: int,
    padding_mode: str,
    transposed: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """The index pattern ``Π[k, i, o]`` of one spatial dimension.

    Cached: a training loop builds each pattern once. The returned tensor is
    shared between callers and must not be modified in place. On the ``meta``
    device (used to plan without data) nothing is computed.

    Args:
        input_size: Layer input size ``I`` along this dimension.
        output_size: Layer output size ``O`` along this dimension.
        kernel_size: Kernel size ``K``.
        stride: Stride ``S``.
        padding_left: Left padding ``P_left`` (for a transposed convolution the
            number of positions cropped on the left of the full output).
        dilation: Dilation ``D``.
        padding_mode: How the padded positions of a convolution read the input.
        transposed: Whether the layer is a transposed convolution.
        device: Device of the pattern.
        dtype: Data type of the pattern.

    Returns:
        Binary tensor of shape ``[K, I, O]``.
    """
    layer = (
        input_size, output_size, kernel_size, stride, padding_left, dilation,
        padding_mode, transposed,
    )  # fmt: skip
    return _count_entries(layer, summed=False, device=device, dtype=dtype)


@lru_cache(maxsize=512)
def summed_index_pattern(
    input_size: int,
    output_size: int,
    kernel_size: int,
    stride: int,
    padding_left: int,
    dilation: int,
    padding_mode: str,
    transposed: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """``Π̄[k, i] = Σ_o Π[k, i, o]``: the pattern summed over output positions.

    Takes the arguments of :func:`index_pattern` and counts the entries
    directly, so the ``[K, I, O]`` pattern is never built. KFAC-reduce
    contracts this two-leg tensor with the input instead of unfolding it.
    """
    layer = (
        input_size, output_size, kernel_size, stride, padding_left, dilation,
        padding_mode, transposed,
    )  # fmt: skip
    return _count_entries(layer, summed=True, device=device, dtype=dtype)


def _count_entries(
    layer: tuple, summed: bool, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``Π [K, I, O]``, or ``Π̄ [K, I]`` counting each ``(k, i)``; nothing on meta."""
    input_size, output_size, kernel_size = layer[:3]
    shape = (kernel_size, input_size) + (() if summed else (output_size,))
    if torch.device(device).type == "meta":
        return torch.empty(shape, device=device, dtype=dtype)
    indices = _entries(*layer)[: 2 if summed else 3]
    counts = torch.zeros(shape, dtype=dtype)
    ones = torch.ones(len(indices[0]), dtype=dtype)
    counts.index_put_(indices, ones, accumulate=True)
    return counts.to(device)
