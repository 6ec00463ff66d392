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
- ``patches``: the output positions whose window meets a kept position are
  gathered once, and the kept input is gathered into their patches (zeros
  for dropped positions). Cheaper than ``gather`` when a patch is shorter than
  the output channels (a first layer on RGB images): the output gradient is
  read once instead of once per tap.
- ``torch``: PyTorch's weight-gradient kernel, when every position is kept.
"""

from __future__ import annotations

from math import prod
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import functional, torch_routes
from .network import TensorNetwork
from .pattern import source_positions, summed_index_pattern
from .spec import ConvSpec

ROUTES = ("auto", "tn", "gather", "patches", "torch")

#: Elements of one gathered block of the output gradient in the ``gather``
#: route; taps are processed in chunks that stay below it (2**23 floats =
#: 32 MiB in float32), so memory does not grow with the kernel size.
MAX_GATHER_ELEMENTS = 2**23

#: Relative time of moving one element in a gather against one multiply-add
#: in a matrix product, for the ``auto`` choice between ``gather`` and
#: ``patches`` (see :func:`sliced_weight_vjp_route`).
MOVE_COST = 16


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
        counts = summed_index_pattern(
            input_size[d],
            output_size[d],
            spec.kernel_size[d],
            spec.stride[d],
            spec.padding[d][0],
            spec.dilation[d],
            spec.padding_mode,
            False,
            torch.device("cpu"),
            torch.float32,
        )
        masks.append(counts.sum(0) > 0)
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
        route: ``auto``, ``tn``, ``gather``, ``patches`` or ``torch`` (see
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
        route = sliced_weight_vjp_route(spec, x_virtual.shape, grad_output.shape)
    compute = {"tn": _by_network, "gather": _by_gather, "patches": _by_patches}
    return compute[route](spec, x_virtual, positions, grad_output)


def sliced_weight_vjp_route(
    spec: ConvSpec, x_shape: Sequence[int], grad_output_shape: Sequence[int]
) -> str:
    """``gather`` or ``patches``, by moved elements and multiply-adds.

    ``gather`` moves ``∏K · M`` output-gradient columns (``M`` kept
    positions) and multiplies each with ``C_in/G`` input channels;
    ``patches`` moves the (up to ``O``) touched output columns once and
    ``∏K`` input columns per touched position, and multiplies each output
    column with a patch of ``C_in/G · ∏K``. The touched count is bounded by
    ``O`` (taken as is: it is the worse case for ``patches``).
    """
    n, groups = x_shape[0], spec.groups
    c_in, c_out = spec.in_channels // groups, spec.out_channels // groups
    taps, kept = prod(spec.kernel_size), prod(x_shape[2:])
    touched = min(prod(grad_output_shape[2:]), taps * kept)
    gather = n * groups * c_out * taps * kept * (MOVE_COST + c_in)
    patches = (
        n
        * groups
        * touched
        * (MOVE_COST * (c_out + 2 * c_in * taps) + c_out * c_in * taps)
    )
    return "gather" if gather <= patches else "patches"


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


def _by_patches(
    spec: ConvSpec, x: Tensor, positions: Sequence[Tensor], grad_output: Tensor
) -> Tensor:
    """Gather the touched output positions once, the kept input into their patches."""
    n, groups, ndim = x.shape[0], spec.groups, spec.ndim
    c_in = spec.in_channels // groups
    out_size = tuple(grad_output.shape[2:])
    # a zero slot at the end of every kept axis stands for dropped positions
    kept_sizes = tuple(x.shape[2:])
    patches = x.new_zeros(*(a + 1 for a in kept_sizes), n * spec.in_channels)
    patches[tuple(slice(0, a) for a in kept_sizes)] = _positions_first(x, ndim).view(
        *kept_sizes, -1
    )
    rows = _positions_first(grad_output, ndim)
    touched_sizes = []
    for d in range(ndim):
        hit = _tap_outputs(
            positions[d], out_size[d], spec.kernel_size[d], spec.stride[d],
            spec.dilation[d],
        )  # fmt: skip
        touched = hit[hit >= 0].unique()
        if len(touched) == 0:  # no kept position meets an output
            return x.new_zeros(spec.weight_shape())
        # slot[t, k]: which kept position tap k of touched output t reads
        taps = spec.dilation[d] * torch.arange(spec.kernel_size[d]).view(1, -1)
        wanted = touched.view(-1, 1) * spec.stride[d] + taps
        lookup = torch.full((int(wanted.max()) + 1,), len(positions[d]))
        inside = positions[d] < len(lookup)
        lookup[positions[d][inside]] = inside.nonzero().squeeze(1)
        patches = patches.index_select(d, lookup[wanted].reshape(-1).to(x.device))
        if len(touched) < out_size[d]:
            rows = rows.index_select(d, touched.to(x.device))
        touched_sizes.append(len(touched))
    # patches [T0, K0, T1, K1, ..., N, G, Cg] -> [T..., N, G, Cg, K...]
    split = [size for pair in zip(touched_sizes, spec.kernel_size) for size in pair]
    patches = patches.view(*split, n, groups, c_in)
    order = [*range(0, 2 * ndim, 2), *range(2 * ndim, 2 * ndim + 3)]
    order += list(range(1, 2 * ndim, 2))
    patches = patches.permute(order).reshape(-1, groups, c_in * prod(spec.kernel_size))
    rows = rows.reshape(-1, groups, spec.out_channels // groups)
    return _contract_rows(rows, patches, groups).reshape(spec.weight_shape())
