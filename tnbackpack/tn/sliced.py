"""Weight VJPs of a convolution from kept slices of its input positions.

The weight gradient ``G[g,d,c,k] = Σ_{n,i,o} X[n,g,c,i] · Π_k(o,i) · V[n,g,d,o]``
sums over input positions ``i``. Keeping only the slices ``i ∈ K_d`` of every
spatial axis ``d`` slices the input ``X`` and the index patterns ``Π_d`` (the
operands holding ``i``); the result is the same network with smaller legs.

Positions here are those of the explicitly padded input ("virtual"
positions, ``0`` is the first padded position). For ``padding_mode='zeros'``
the padded positions hold zeros and are never kept; for the other modes a
virtual position reads a real one (:func:`.pattern.source_positions`) and is
kept exactly when its source is, so a real slice enters with all its copies.

Routes for the sliced weight VJP (all exact for the kept slices):

- ``tn``: the network with sliced patterns ``Π_d[k, a, o]``, contracted by
  opt_einsum (the reference route, and any number of dimensions).
- ``gather``: per kernel tap, the output-gradient entries each kept position
  meets (``o = (pos − k·D)/S``) are gathered along the flattened positions,
  then one batched product per sample contracts them with the kept input. Its
  cost is ≈ ``keep`` times the full contraction's.
- ``scatter``: the kept slices are put back into a zero-filled (padded)
  input, and PyTorch's weight-gradient kernel runs on it. Its time is that of
  the exact kernel, whatever ``keep`` is, but it reads the output gradient
  only once: faster than ``gather`` for layers with few input channels (a
  first layer on RGB images), where that kernel is bound by reading the
  output gradient. The stored memory is the same (the zero-filled input
  lives only during the backward pass).
- ``torch``: PyTorch's weight-gradient kernel, when every position is kept.
"""

from __future__ import annotations

import dataclasses
import itertools
from math import prod
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import functional, torch_routes
from .network import TensorNetwork
from .pattern import source_positions
from .spec import ConvSpec

ROUTES = ("auto", "tn", "gather", "scatter", "torch")

#: Relative times, for the ``auto`` choice between ``gather`` and ``scatter``
#: (see :func:`sliced_weight_vjp_route`), in units of one multiply-add in a
#: matrix product: moving one element in a gather of whole rows, moving one
#: element in a transposing copy, and one multiply-add in PyTorch's
#: weight-gradient kernel. Fitted to the backward of 3x3 layers (batch 32,
#: one thread, keep 0.1-0.5): 3->96, 64->64, 96->96 (also stride 2) at
#: 32x32 and 192->192 at 8x8, where ``gather`` is 1.5-3x faster than
#: ``scatter`` except for 3 input channels (``scatter`` 1.5-7x faster).
MOVE_COST = 16
TRANSPOSE_COST = 64
KERNEL_COST = 1.0


def _check_convolution(spec: ConvSpec) -> None:
    if spec.transposed:
        raise ValueError(
            f"{spec.describe()}: sliced weight VJPs support convolutions, "
            "not transposed convolutions"
        )


def read_positions(spec: ConvSpec, input_size: Sequence[int]) -> List[Tensor]:
    """Per spatial axis, a boolean mask of the real input positions some output reads.

    A strided layer skips positions (a 1x1 stride-2 layer reads every other
    row): they never enter the weight gradient, so they need not be sampled
    nor stored.
    """
    _check_convolution(spec)
    output_size = spec.output_size(input_size)
    masks = []
    for d in range(spec.ndim):
        taps = torch.arange(spec.kernel_size[d]).view(-1, 1) * spec.dilation[d]
        windows = torch.arange(output_size[d]).view(1, -1) * spec.stride[d]
        virtual = taps + windows - spec.padding[d][0]
        real, reads = source_positions(virtual, input_size[d], spec.padding_mode)
        mask = torch.zeros(input_size[d], dtype=torch.bool)
        mask[real[reads]] = True
        masks.append(mask)
    return masks


def virtual_positions(
    spec: ConvSpec, input_size: Sequence[int], kept: Sequence[Tensor]
) -> Tuple[List[Tensor], List[Optional[Tensor]]]:
    """Padded positions that read kept real positions, and where they read.

    Args:
        spec: The convolution.
        input_size: Real spatial input size.
        kept: Per axis, the kept real positions (sorted, distinct, int64).

    Returns:
        Per axis the kept virtual positions (sorted) and the index into
        ``kept[d]`` each of them reads, or ``None`` where that index is the
        identity (no padding copies real positions: zero padding).
    """
    positions: List[Tensor] = []
    takes: List[Optional[Tensor]] = []
    for d, (left, right) in enumerate(spec.padding):
        size, rows = input_size[d], kept[d].cpu()
        if spec.padding_mode == "zeros" or left == right == 0:
            positions.append(rows + left)
            takes.append(None)
            continue
        rank = torch.full((size,), -1, dtype=torch.long)
        rank[rows] = torch.arange(len(rows))
        virtual = torch.arange(-left, size + right)
        source, _ = source_positions(virtual, size, spec.padding_mode)
        reads = rank[source]
        chosen = (reads >= 0).nonzero().squeeze(1)
        positions.append(chosen)
        takes.append(reads[chosen])
    return positions, takes


def sliced_index_pattern(
    positions: Tensor,
    output_size: int,
    kernel_size: int,
    stride: int,
    dilation: int,
    dtype: torch.dtype,
) -> Tensor:
    """``Π[k, a, o] = 1`` iff ``positions[a] = k·D + o·S`` (padded coordinates).

    The rows ``positions`` of the index pattern of the explicitly padded,
    unpadded convolution.
    """
    taps = torch.arange(kernel_size).view(-1, 1, 1) * dilation
    outputs = torch.arange(output_size).view(1, 1, -1) * stride
    return (positions.cpu().view(1, -1, 1) == taps + outputs).to(dtype)


def _tap_outputs(
    positions: Tensor, output_size: int, kernel_size: int, stride: int, dilation: int
) -> Tensor:
    """``[K, A]``: the output position each (tap, kept position) meets, or ``-1``."""
    offset = positions.view(1, -1) - dilation * torch.arange(kernel_size).view(-1, 1)
    valid = (offset >= 0) & (offset % stride == 0) & (offset < stride * output_size)
    return torch.where(valid, offset // stride, torch.full_like(offset, -1))


def sliced_weight_vjp(
    spec: ConvSpec,
    x_kept: Tensor,
    kept: Sequence[Tensor],
    input_size: Sequence[int],
    grad_output: Tensor,
    route: str = "auto",
) -> Tensor:
    """``Σ_{n, i kept}`` of the weight gradient, shaped like the weight (unscaled).

    Args:
        spec: The convolution (not transposed).
        x_kept: ``[N, C_in, |K_0|, ...]``: the input at the kept real positions.
        kept: Per spatial axis, the kept real positions (sorted, distinct).
        input_size: The real spatial input size.
        grad_output: ``[N, C_out, *O]``.
        route: ``auto``, ``tn``, ``gather``, ``scatter`` or ``torch`` (see
            the module docstring; ``torch`` only when every position is kept).

    Raises:
        ValueError: For an unknown route, ``torch`` with dropped positions,
            or shapes that do not match.
    """
    _check_convolution(spec)
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    output_size = spec.output_size(input_size)
    expected = (x_kept.shape[0], spec.in_channels, *(len(k) for k in kept))
    if tuple(x_kept.shape) != expected or len(kept) != spec.ndim:
        raise ValueError(
            f"{spec.describe()}: x_kept has shape {tuple(x_kept.shape)}, expected "
            f"{expected} for the kept positions"
        )
    if tuple(grad_output.shape) != (x_kept.shape[0], spec.out_channels, *output_size):
        raise ValueError(
            f"{spec.describe()}: grad_output has shape {tuple(grad_output.shape)}, "
            f"expected {(x_kept.shape[0], spec.out_channels, *output_size)}"
        )
    everything = all(len(k) == size for k, size in zip(kept, input_size))
    if route == "torch" and not everything:
        raise ValueError("route 'torch' needs every input position kept")
    if route == "auto" and everything and torch_routes.supports(spec):
        route = "torch"
    if route == "torch":
        return functional.weight_vjp(spec, x_kept, grad_output, route="torch")
    if any(len(k) == 0 for k in kept) or x_kept.shape[0] == 0:
        shape = spec.weight_shape()
        return x_kept.new_zeros(shape)
    positions, takes = virtual_positions(spec, input_size, kept)
    x_virtual = x_kept
    for d, take in enumerate(takes):
        if take is not None:
            x_virtual = x_virtual.index_select(2 + d, take.to(x_kept.device))
    if route == "auto":
        route = sliced_weight_vjp_route(spec, positions, output_size)
    if route == "scatter" and not torch_routes.supports(spec):
        raise ValueError(
            f"route 'scatter' uses PyTorch's kernels (1 to 3 spatial axes), "
            f"got {spec.ndim}"
        )
    compute = {"tn": _by_network, "gather": _by_gather, "scatter": _by_scatter}
    return compute[route](spec, x_virtual, positions, grad_output)


def _gathered_pairs(
    spec: ConvSpec, positions: Sequence[Tensor], output_size: Sequence[int]
) -> Tuple[int, int]:
    """Rows the ``gather`` route gathers, and the input rows it gathers besides.

    Per tap, all kept positions (those meeting no output read a zero row),
    or only the ones meeting an output when they are fewer than half.
    """
    met = [
        (_tap_outputs(p, o, k, s, d) >= 0).sum(1)
        for p, o, k, s, d in zip(
            positions, output_size, spec.kernel_size, spec.stride, spec.dilation
        )
    ]
    kept = prod(len(p) for p in positions)
    rows = extra = 0
    for counts in itertools.product(*(m.tolist() for m in met)):
        valid = prod(counts)
        if 2 * valid < kept:
            rows, extra = rows + valid, extra + valid
        else:
            rows += kept
    return rows, extra


def sliced_weight_vjp_route(
    spec: ConvSpec, positions: Sequence[Tensor], output_size: Sequence[int]
) -> str:
    """``gather`` or ``scatter``, by a count of moved elements and multiply-adds.

    Per sample and group, ``gather`` moves the output gradient once (to put
    positions first) and then its gathered rows, and multiplies each gathered
    row with the input channels; ``scatter`` reads the output gradient once
    and multiplies each output position with a whole patch, at PyTorch's
    kernel's speed (:data:`KERNEL_COST`). ``tn`` is never chosen (it
    multiplies by index patterns); nor is ``scatter`` beyond 3 dimensions.
    """
    if not torch_routes.supports(spec):
        return "gather"
    groups = spec.groups
    c_in, c_out = spec.in_channels // groups, spec.out_channels // groups
    rows, extra = _gathered_pairs(spec, positions, output_size)
    outputs, taps = prod(output_size), prod(spec.kernel_size)
    # a product with few input channels is bound by reading its gathered rows
    gather = (
        c_out * (outputs * TRANSPOSE_COST + rows * (MOVE_COST + max(c_in, MOVE_COST)))
        + extra * c_in * MOVE_COST
    )
    scatter = c_out * outputs * (MOVE_COST + KERNEL_COST * c_in * taps)
    return "gather" if gather <= scatter else "scatter"


def _by_network(
    spec: ConvSpec, x: Tensor, positions: Sequence[Tensor], grad_output: Tensor
) -> Tensor:
    """Contract ``x_kept, Π_d[k, a, o] (sliced), gy -> W`` with opt_einsum."""
    ndim, groups = spec.ndim, spec.groups
    a_names = tuple(f"a{d}" for d in range(ndim))
    o_names = tuple(f"o{d}" for d in range(ndim))
    k_names = tuple(f"k{d}" for d in range(ndim))
    tn = TensorNetwork([], [], ("g", "co", "ci", *k_names))
    tn.add(x.reshape(x.shape[0], groups, -1, *x.shape[2:]), ("n", "g", "ci", *a_names))
    for d in range(ndim):
        pattern = sliced_index_pattern(
            positions[d],
            grad_output.shape[2 + d],
            spec.kernel_size[d],
            spec.stride[d],
            spec.dilation[d],
            x.dtype,
        ).to(x.device)
        tn.add(pattern, (k_names[d], a_names[d], o_names[d]))
    gy = grad_output.reshape(grad_output.shape[0], groups, -1, *grad_output.shape[2:])
    tn.add(gy, ("n", "g", "co", *o_names))
    return tn.contract().reshape(spec.weight_shape())


def _positions_first(tensor: Tensor, ndim: int) -> Tensor:
    """``[N, C, *P] -> [*P, N, C]``: a view if the memory is laid out that way."""
    order = [*range(2, 2 + ndim), 0, 1]
    return tensor.permute(order).contiguous()


def _flat_strides(sizes: Sequence[int]) -> List[int]:
    return [prod(sizes[d + 1 :]) for d in range(len(sizes))]


def _contract_rows(rows: Tensor, inputs: Tensor, groups: int) -> Tensor:
    """``Σ_r rows[r, g, d] · inputs[r, g, c] -> [g, d, c]`` by matrix products."""
    if groups == 1:
        if 4 * inputs.shape[-1] < rows.shape[-1]:
            # few input channels: the thin operand first is 4x faster (3 vs 96)
            return (inputs[:, 0].t() @ rows[:, 0]).t().unsqueeze(0)
        return (rows[:, 0].t() @ inputs[:, 0]).unsqueeze(0)
    return torch.bmm(rows.permute(1, 2, 0), inputs.transpose(0, 1))


def _by_gather(
    spec: ConvSpec, x: Tensor, positions: Sequence[Tensor], grad_output: Tensor
) -> Tensor:
    """Per tap, gather the output gradient at the kept positions; one product each.

    Both operands are laid out positions first (``[positions, N, G, C]``), so
    a gather copies whole rows of ``N·C`` entries and each tap is one matrix
    product over (kept position, sample). Pairs (tap, kept position) that
    meet no output read a zero row; when most of a tap's pairs meet none (a
    strided layer), the kept input is gathered at the others instead.
    """
    n, groups, ndim = x.shape[0], spec.groups, spec.ndim
    out_size = tuple(grad_output.shape[2:])
    flat_out = prod(out_size)
    # flat[k..., a...]: flattened output position met by tap k at kept position a
    flat = torch.zeros((), dtype=torch.long)
    valid = torch.ones((), dtype=torch.bool)
    for d, stride_d in enumerate(_flat_strides(out_size)):
        hit = _tap_outputs(
            positions[d], out_size[d], spec.kernel_size[d], spec.stride[d],
            spec.dilation[d],
        )  # fmt: skip
        shape = [1] * (2 * ndim)
        shape[d], shape[ndim + d] = hit.shape
        flat = flat + hit.clamp(min=0).view(shape) * stride_d
        valid = valid & (hit >= 0).view(shape)
    taps, kept = prod(spec.kernel_size), prod(x.shape[2:])
    flat = torch.where(valid, flat, flat_out).reshape(taps, kept)
    valid = valid.reshape(taps, kept)

    # [O + 1, N·C_out]: the output gradient, positions first, and a zero row
    # (a transposing copy of the [N·C_out, O] matrix: 2.5x faster than copying
    # the permuted N-d view on a 3x3 64-channel layer)
    rows = grad_output.new_empty(flat_out + 1, n * spec.out_channels)
    rows[:flat_out].copy_(grad_output.reshape(-1, flat_out).t())
    rows[flat_out].zero_()
    inputs = _positions_first(x, ndim).view(kept, n, groups, -1)
    blocks = []
    for tap in range(taps):
        index, met = flat[tap], valid[tap]
        tap_inputs = inputs
        if int(met.sum()) * 2 < kept:
            chosen = met.nonzero().squeeze(1)
            index = index[chosen]
            tap_inputs = inputs.index_select(0, chosen.to(x.device))
        gathered = rows.index_select(0, index.to(x.device))
        blocks.append(
            _contract_rows(
                gathered.view(-1, groups, spec.out_channels // groups),
                tap_inputs.reshape(-1, groups, tap_inputs.shape[-1]),
                groups,
            )
        )
    result = torch.stack(blocks, dim=-1)  # [G, Dg, Cg, T]
    return result.reshape(spec.weight_shape())


def _by_scatter(
    spec: ConvSpec, x: Tensor, positions: Sequence[Tensor], grad_output: Tensor
) -> Tensor:
    """PyTorch's weight-gradient kernel on the zero-filled, explicitly padded input."""
    ndim = spec.ndim
    # fill positions first: copies of whole rows (x_kept is stored that way)
    filled = _positions_first(x, ndim)
    for d, rows in enumerate(positions):
        # the shortest padded input with this output size; a kept position
        # past it (a padded copy after the last window) meets no output
        length = (grad_output.shape[2 + d] - 1) * spec.stride[d]
        length += spec.dilation[d] * (spec.kernel_size[d] - 1) + 1
        inside = rows < length
        if not bool(inside.all()):
            filled = filled.index_select(d, inside.nonzero().squeeze(1).to(x.device))
            rows = rows[inside]
        shape = list(filled.shape)
        shape[d] = length
        filled = filled.new_zeros(shape).index_copy_(d, rows.to(x.device), filled)
    # PyTorch's kernel is 3x slower on a positions-first (channels-last) input
    filled = filled.permute(ndim, ndim + 1, *range(ndim)).contiguous()
    unpadded = dataclasses.replace(
        spec, padding=((0, 0),) * spec.ndim, padding_mode="zeros"
    )
    return torch_routes.weight_vjp(unpadded, filled, grad_output)
