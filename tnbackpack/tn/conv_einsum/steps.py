"""One contraction step: two tensors with named letters into a part.

A step between two intermediates is dispatched to

- ``einsum``: no convolution letter is shared (a matrix product, batched);
- ``conv``: every shared convolution letter pairs a signal-side leg (negative
  coefficient) with a kernel-side leg: one grouped ``F.conv1d/2d/3d``, or
  PyTorch's weight-gradient kernel when the "kernel" is larger than the result;
- ``transposed``: every shared convolution letter pairs two kernel-side legs
  (e.g. a gradient with a kernel, or two kernels merging): one grouped
  ``F.conv_transpose1d/2d/3d``;
- ``pattern``: anything else (mixed roles, more than three shared letters):
  the letters' index patterns are built as 0/1 tensors and contracted by
  ``torch.einsum``.

Roles of the other letters in a convolution step: letters of one side only
are its batch (signal side) or output channels (kernel side); letters of both
sides are groups (kept) or input channels (summed). Convolution letters of the
signal side that the kernel side lacks ride along as spatial dimensions with
a kernel of size 1, which avoids moving them into the batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import autotune
from .legs import Leg, Part

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@dataclass(frozen=True)
class Side:
    """Letters of one operand of a step, with sizes and legs."""

    letters: str
    sizes: Tuple[int, ...]
    legs: Tuple[Tuple[str, Leg], ...]

    @staticmethod
    def of(part: Part) -> Side:
        """The side described by a part."""
        return Side(part.letters, part.sizes, part.legs)

    def size(self, letter: str) -> int:
        """Size of ``letter``."""
        return self.sizes[self.letters.index(letter)]


@dataclass(frozen=True)
class Layout:
    """Roles of the letters in a convolution step, and per-letter numbers.

    Attributes:
        method: ``"conv"``, ``"wgrad"`` or ``"transposed"``.
        swap: The second operand is the signal side.
        batch, group, cin, cout: Letters in these roles.
        spatial: Convolution letters of the step (shared ones, then the
            signal side's ride-along letters).
        closed: Shared letters the step sums out (size-1 results).
        stride, dilation: Per spatial letter.
        pad: Per spatial letter ``(left, right)`` padding (negative crops)
            of the signal side (``conv``/``wgrad``), or ``(start, step)``
            of the window cut from the full output (``transposed``).
        in_sizes, kernel_sizes, out_sizes: Per spatial letter.
    """

    method: str
    swap: bool
    batch: str
    group: str
    cin: str
    cout: str
    spatial: str
    closed: str
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]
    pad: Tuple[Tuple[int, int], ...]
    in_sizes: Tuple[int, ...]
    kernel_sizes: Tuple[int, ...]
    out_sizes: Tuple[int, ...]


def _sizes(side: Side, letters: str) -> int:
    return math.prod(side.size(c) for c in letters)


def layout(a: Side, b: Side, out: Part) -> Optional[Layout]:
    """The convolution layout of a step, ``None`` if it needs a pattern.

    Only valid when the two sides share at least one convolution letter.
    """
    legs_a, legs_b, legs_out = dict(a.legs), dict(b.legs), dict(out.legs)
    shared = [c for c in a.letters if c in legs_a and c in legs_b]
    signs = {(legs_a[c].coef < 0, legs_b[c].coef < 0) for c in shared}
    if len(signs) != 1 or not shared:
        return None
    sign = signs.pop()
    if sign == (False, True):
        a, b, legs_a, legs_b = b, a, legs_b, legs_a
    transposed = sign == (False, False)
    if transposed and math.prod(a.sizes) < math.prod(b.sizes):
        a, b, legs_a, legs_b = b, a, legs_b, legs_a
        sign = (False, True)  # read as "swapped"
    ride = [c for c in a.letters if c in legs_a and c not in b.letters]
    if len(shared) + len(ride) > 3:
        ride = []
    if len(shared) + len(ride) > 3:
        return None
    # spatial letters in the part's canonical order (e.g. h before w), the
    # order every intermediate keeps them in: so channels-last stays a view
    spatial = "".join(c for c in a.letters if c in shared or c in ride)
    batch = "".join(c for c in a.letters if c not in b.letters and c not in ride)
    group = "".join(
        c for c in a.letters if c in b.letters and c not in legs_a and c in out.letters
    )
    cin = "".join(
        c
        for c in a.letters
        if c in b.letters and c not in legs_a and c not in out.letters
    )
    cout = "".join(c for c in b.letters if c not in a.letters)
    closed = "".join(c for c in shared if c not in out.letters)
    stride, dilation, pad, n_in, n_k, n_out = [], [], [], [], [], []
    for c in spatial:
        la = legs_a[c]
        if c in ride:
            (
                stride.append(1),
                dilation.append(1),
                pad.append((0, 1) if transposed else (0, 0)),
            )
            n_in.append(la.size), n_k.append(1), n_out.append(la.size)
            continue
        lb = legs_b[c]
        if transposed:
            g = math.gcd(la.coef, lb.coef)
            lm = legs_out.get(c, Leg(g, 0, 1))
            shift = lm.coef * lm.offset - la.coef * la.offset - lb.coef * lb.offset
            if lm.coef % g or shift % g:
                return None
            stride.append(la.coef // g), dilation.append(lb.coef // g)
            pad.append((shift // g, lm.coef // g))
        else:
            alpha, beta = -la.coef, lb.coef
            lm = legs_out.get(c, Leg(-alpha, 0, 1))
            gamma = -lm.coef
            shift = gamma * lm.offset + beta * lb.offset
            if beta % alpha or gamma % alpha or shift % alpha or gamma < 0:
                return None
            s, d = gamma // alpha, beta // alpha
            delta = shift // alpha - la.offset
            need = s * (lm.size - 1) + d * (lb.size - 1) + 1
            stride.append(s), dilation.append(d)
            pad.append((-delta, need + delta - la.size))
        n_in.append(la.size), n_k.append(lb.size), n_out.append(lm.size)
    method = "transposed" if transposed else "conv"
    if not transposed and math.prod(n_k) > math.prod(n_out) and not ride:
        method = "wgrad"  # the "kernel" is the larger side: a weight gradient
    return Layout(
        method, sign == (False, True), batch, group, cin, cout, spatial, closed,
        tuple(stride), tuple(dilation), tuple(pad), tuple(n_in), tuple(n_k),
        tuple(n_out),
    )  # fmt: skip


def _arrange(t: Tensor, letters: str, order: str) -> Tensor:
    """Permute ``t`` (axes named by ``letters``) to ``order``."""
    return t.permute([letters.index(c) for c in order])


def _pad_dims(t: Tensor, first: int, pads: List[Tuple[int, int]]) -> Tensor:
    """Pad (negative: crop) dims ``first, first+1, ..`` with zeros."""
    if all(p == (0, 0) for p in pads):
        return t
    spec: List[int] = [0, 0] * (t.ndim - first - len(pads))
    for left, right in reversed(pads):
        spec += [left, right]
    return F.pad(t, spec)


def run_conv(lay: Layout, a: Tensor, la: str, b: Tensor, lb: str) -> Tuple[Tensor, str]:
    """Run a convolution step; returns the result and its letters."""
    if lay.swap:
        a, la, b, lb = b, lb, a, la
    sizes = dict(zip(la, a.shape))
    sizes.update(zip(lb, b.shape))
    for c in lay.spatial:  # ride-along letters: kernel size 1
        if c not in lb:
            b, lb = b.unsqueeze(-1), lb + c
    counts = {
        role: math.prod(sizes[c] for c in getattr(lay, role))
        for role in ("group", "batch", "cin", "cout")
    }
    run = {"transposed": _transposed, "wgrad": _weight_gradient}.get(lay.method, _conv)
    y, letters = run(lay, a, la, b, lb, counts)
    y = y.reshape(
        [sizes[c] for c in letters[: -len(lay.spatial)]] + list(lay.out_sizes)
    )
    return _squeeze(y, letters, lay.closed)


def _conv(lay: Layout, a, la, b, lb, n) -> Tuple[Tensor, str]:
    """``F.conv*d``: ``a`` the signal side, ``b`` the kernel side."""
    x = _arrange(a, la, lay.batch + lay.group + lay.cin + lay.spatial)
    x = x.reshape(n["batch"], n["group"] * n["cin"], *lay.in_sizes)
    w = _arrange(b, lb, lay.group + lay.cout + lay.cin + lay.spatial)
    w = w.reshape(n["group"] * n["cout"], n["cin"], *lay.kernel_sizes)
    padding = _symmetric(lay.pad)
    if padding is None:
        x, padding = _pad_dims(x, 2, list(lay.pad)), 0
    y = _CONV[len(lay.spatial)](
        x, w, stride=lay.stride, padding=padding, dilation=lay.dilation,
        groups=n["group"],
    )  # fmt: skip
    return y, lay.batch + lay.group + lay.cout + lay.spatial


def _weight_gradient(lay: Layout, a, la, b, lb, n) -> Tuple[Tensor, str]:
    """PyTorch's weight-gradient kernel.

    ``b`` (the larger side) is the output gradient, ``a`` the input, the
    result the "weight".
    """
    loop = _loop_letter(lay, a, la, b, lb)
    if loop:
        # per-sample weight gradients (a kept batch letter among the groups)
        # of channels-last tensors: one kernel call per sample reads both in
        # place, where merging the letter into the groups would copy them
        inner = dataclasses.replace(lay, group=lay.group.replace(loop, ""))
        counts = dict(n, group=n["group"] // a.shape[la.index(loop)])
        la_rest, lb_rest = la.replace(loop, ""), lb.replace(loop, "")
        slices = [
            _weight_gradient(
                inner, a.select(la.index(loop), i), la_rest,
                b.select(lb.index(loop), i), lb_rest, counts,
            )[0]
            for i in range(a.shape[la.index(loop)])
        ]  # fmt: skip
        return torch.stack(slices), loop + inner.group + lay.cout + lay.batch + (
            lay.spatial
        )
    num = len(lay.spatial)
    x = _arrange(a, la, lay.cin + lay.group + lay.batch + lay.spatial)
    x = x.reshape(n["cin"], n["group"] * n["batch"], *lay.in_sizes)
    g = _arrange(b, lb, lay.cin + lay.group + lay.cout + lay.spatial)
    g = g.reshape(n["cin"], n["group"] * n["cout"], *lay.kernel_sizes)
    padding = _symmetric(lay.pad)
    if padding is None:
        x, padding = _pad_dims(x, 2, list(lay.pad)), [0] * num
    weight = torch.empty(
        (n["group"] * n["cout"], n["batch"], *lay.out_sizes),
        dtype=x.dtype, device=x.device, memory_format=_format(x),
    )  # fmt: skip
    y = torch.ops.aten.convolution_backward(
        g, x, weight, None, list(lay.dilation), padding, list(lay.stride),
        False, [0] * num, n["group"], [False, True, False],
    )[1]  # fmt: skip
    return y, lay.group + lay.cout + lay.batch + lay.spatial


def _loop_letter(lay: Layout, a: Tensor, la: str, b: Tensor, lb: str) -> str:
    """A group letter outermost in memory on both sides, if merging copies.

    ``""`` when the groups can be viewed as one dimension of both sides.
    """
    if len(lay.group) < 2:
        return ""
    first = memory_order(a, la)[0]
    if first not in lay.group or memory_order(b, lb)[0] != first:
        return ""
    merged_a = _viewable(a, la, (lay.cin, lay.group + lay.batch))
    merged_b = _viewable(b, lb, (lay.cin, lay.group + lay.cout))
    return "" if merged_a and merged_b else first


def _transposed(lay: Layout, a, la, b, lb, n) -> Tuple[Tensor, str]:
    """``F.conv_transpose*d`` (both legs kernel-side).

    The full output is cut to the result's positions; what the kernel's
    symmetric padding can crop is not computed.
    """
    x = _arrange(a, la, lay.batch + lay.group + lay.cin + lay.spatial)
    x = x.reshape(n["batch"], n["group"] * n["cin"], *lay.in_sizes)
    w = _arrange(b, lb, lay.group + lay.cin + lay.cout + lay.spatial)
    w = w.reshape(n["group"] * n["cin"], n["cout"], *lay.kernel_sizes)
    crop = []
    for n_in, n_k, s, d, (start, step), n_out in zip(
        lay.in_sizes, lay.kernel_sizes, lay.stride, lay.dilation, lay.pad,
        lay.out_sizes,
    ):  # fmt: skip
        full = s * (n_in - 1) + d * (n_k - 1) + 1
        crop.append(max(0, min(start, full - 1 - (start + step * (n_out - 1)))))
    y = _CONV_T[len(lay.spatial)](
        x, w, stride=lay.stride, padding=crop, dilation=lay.dilation,
        groups=n["group"],
    )  # fmt: skip
    for dim, ((start, step), p, size) in enumerate(
        zip(lay.pad, crop, lay.out_sizes), start=2
    ):
        y = window(y, dim, start - p, step, size)
    return y, lay.batch + lay.group + lay.cout + lay.spatial


def _symmetric(pads) -> Optional[List[int]]:
    """The per-dimension padding if every dimension is padded symmetrically."""
    if all(left == right >= 0 for left, right in pads):
        return [left for left, _ in pads]
    return None


def _format(x: Tensor) -> torch.memory_format:
    """Channels-last if ``x`` is laid out so (PyTorch's kernels follow the input)."""
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _squeeze(y: Tensor, letters: str, closed: str) -> Tuple[Tensor, str]:
    if not closed:
        return y, letters
    keep = [i for i, c in enumerate(letters) if c not in closed]
    y = y.reshape([y.shape[i] for i in keep])
    return y, "".join(letters[i] for i in keep)


def window(t: Tensor, dim: int, start: int, step: int, size: int) -> Tensor:
    """``t[start + step·p]`` along ``dim`` for ``p < size``; zeros outside ``t``."""
    length = t.shape[dim]
    if start == 0 and step == 1 and size == length:
        return t
    first = max(0, -(start // step))  # first p inside t
    last = min(size - 1, (length - 1 - start) // step)
    if last < first:
        shape = list(t.shape)
        shape[dim] = size
        return t.new_zeros(shape)
    lo = start + step * first
    inner = t.narrow(dim, lo, step * (last - first) + 1)
    if step > 1:
        index = [slice(None)] * t.ndim
        index[dim] = slice(None, None, step)
        inner = inner[tuple(index)]
    return pad_dim(inner, dim, first, size - 1 - last)


def pad_dim(t: Tensor, dim: int, left: int, right: int) -> Tensor:
    """Zero-pad (negative: crop) one dimension."""
    if left == 0 and right == 0:
        return t
    spec = [0, 0] * (t.ndim - 1 - dim) + [left, right]
    return F.pad(t, spec)


def reindex(t: Tensor, dim: int, src: Leg, dst: Leg) -> Tensor:
    """Move a leg from ``src``'s positions to ``dst``'s (zeros where none)."""
    if src == dst:
        return t
    positions = [src.position(dst.coef * (p + dst.offset)) for p in range(dst.size)]
    found = [(p, m) for p, m in enumerate(positions) if m is not None]
    if not found:
        shape = list(t.shape)
        shape[dim] = dst.size
        return t.new_zeros(shape)
    (p0, m0), (p1, m1) = found[0], found[-1]
    step = (m1 - m0) // (p1 - p0) if p1 > p0 else 1
    regular = (
        len(found) == p1 - p0 + 1
        and step > 0
        and all(m == m0 + step * (p - p0) for p, m in found)
    )
    if regular:
        return window(t, dim, m0 - step * p0, step, dst.size)
    index = torch.tensor(
        [m if m is not None else 0 for m in positions], device=t.device
    )
    mask = torch.tensor(
        [m is not None for m in positions], device=t.device, dtype=t.dtype
    )
    shape = [1] * t.ndim
    shape[dim] = dst.size
    return t.index_select(dim, index) * mask.reshape(shape)


def pattern_tensor(a: Leg, b: Leg, m: Optional[Leg], dtype, device) -> Tensor:
    """0/1 tensor ``T[p_a, p_b(, p_m)]``: the legs' values cancel."""
    va = a.coef * (torch.arange(a.size, device=device) + a.offset)
    vb = b.coef * (torch.arange(b.size, device=device) + b.offset)
    total = va[:, None] + vb[None, :]
    if m is None:
        return (total == 0).to(dtype)
    vm = m.coef * (torch.arange(m.size, device=device) + m.offset)
    return (total[:, :, None] == vm[None, None, :]).to(dtype)


def run_pattern(
    a: Tensor,
    la: str,
    legs_a: Dict[str, Leg],
    b: Tensor,
    lb: str,
    legs_b: Dict[str, Leg],
    out: Part,
) -> Tuple[Tensor, str]:
    """A step through materialized index patterns (any roles, any count)."""
    legs_out = dict(out.legs)
    free = [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [
        chr(c) for c in range(ord("a"), ord("z") + 1)
    ]
    free = [c for c in free if c not in la + lb]
    ta, tb, operands, subs = list(la), list(lb), [], []
    for c in la:
        if c in legs_a and c in legs_b:
            sa, sb = free.pop(), free.pop()
            ta[la.index(c)], tb[lb.index(c)] = sa, sb
            keep = c in out.letters
            operands.append(
                pattern_tensor(
                    legs_a[c],
                    legs_b[c],
                    legs_out.get(c) if keep else None,
                    a.dtype,
                    a.device,
                )
            )
            subs.append(sa + sb + (c if keep else ""))
    equation = ",".join(["".join(ta), "".join(tb)] + subs) + "->" + out.letters
    return torch.einsum(equation, a, b, *operands), out.letters


def memory_order(t: Tensor, letters: str) -> str:
    """``letters`` from the outermost to the innermost dimension in memory."""
    ranked = sorted(range(len(letters)), key=lambda i: (-t.stride(i), -t.shape[i]))
    return "".join(letters[i] for i in ranked)


def run_matmul(
    a: Tensor,
    la: str,
    b: Tensor,
    lb: str,
    out: str,
    channels_last: bool = True,
    onednn: bool = False,
) -> Tuple[Tensor, str]:
    """A step without shared convolution letters, as one (batched) matrix product.

    The larger operand is read in place, in its memory order: its letters
    before the first contracted one (in memory) are the batch of ``bmm``,
    the smaller operand is broadcast over them with stride 0. The result has
    the smaller operand's free letters innermost (``channels_last``, what
    PyTorch's CPU convolutions run fastest on) or right after the batch
    letters (``nchw`` order, for a result returned to the caller).

    With ``onednn``, a product of one channel letter between ``nchw``-ordered
    tensors runs as PyTorch's 1×1 convolution or its weight gradient
    (:func:`_channel_product`), the kernels of the stage sequence.
    """
    if a.numel() < b.numel():
        a, la, b, lb = b, lb, a, la
    contracted = "".join(c for c in la if c in lb and c not in out)
    if contracted and any(c in lb and c in out for c in la):
        kept = _kept_batch(a, la, b, lb, out)
        if kept is not None:
            return kept
    if not contracted or any(c in lb and c in out for c in la):
        return torch.einsum(f"{la},{lb}->{out}", a, b), out
    if onednn:
        result = _channel_product(a, la, b, lb, contracted)
        if result is not None:
            return result
    summed = _summed_batch(a, la, b, lb, contracted)
    if summed is not None:
        return summed
    as_conv = _matmul_as_conv(a, la, b, lb, out, contracted, channels_last)
    if as_conv is not None:
        key = ("conv_einsum.matmul", la, lb, out, a.shape, b.shape, a.stride(),
               b.stride(), channels_last)  # fmt: skip
        return autotune.fastest(
            key,
            {
                "conv1x1": as_conv,
                "bmm": lambda: _bmm(a, la, b, lb, out, contracted, channels_last),
            },
        )[1]
    return _bmm(a, la, b, lb, out, contracted, channels_last)


def _kept_batch(a: Tensor, la: str, b: Tensor, lb: str, out: str):
    """A product whose shared letters kept in ``out`` are the ``bmm`` batch.

    Per-sample gradients are such products (the batch letter is shared and
    kept, :mod:`.per_sample`). Both operands are read in place when their
    kept, contracted and free letters each form one block in memory (in the
    same letter order for the shared groups); otherwise the smaller one is
    copied into that arrangement. ``None`` when the larger one would need a
    copy too (``torch.einsum`` then decides).
    """
    sizes = dict(zip(la, a.shape))
    sizes.update(zip(lb, b.shape))
    order_a, order_b = memory_order(a, la), memory_order(b, lb)
    free_a = "".join(c for c in order_a if c not in lb)
    free_b = "".join(c for c in order_b if c not in la)
    for source in (order_a, order_b):
        shared = [c for c in source if c in la and c in lb]
        kept = "".join(c for c in shared if c in out)
        contracted = "".join(c for c in shared if c not in out)
        a3 = _batched(a, la, sizes, kept, contracted, free_a)
        if a3 is None:
            continue
        b3 = _batched(b, lb, sizes, kept, contracted, free_b)
        if b3 is None:
            b3 = _arrange(b, lb, kept + free_b + contracted).reshape(
                _count(sizes, kept), _count(sizes, free_b), _count(sizes, contracted)
            )
        result = torch.bmm(a3, b3.transpose(1, 2))
        letters = kept + free_a + free_b
        return result.view([sizes[c] for c in letters]), letters
    return None


def _block_order(t: Tensor, letters: str) -> Optional[str]:
    """``letters`` in memory order if ``t`` is contiguous in it, else ``None``."""
    order = memory_order(t, letters)
    return order if _arrange(t, letters, order).is_contiguous() else None


def _channel_product(a: Tensor, la: str, b: Tensor, lb: str, contracted: str):
    """A product over channels as a 1×1 convolution, ``None`` if it is not one.

    ``a`` (``[batch, channel, spatial..]`` in memory, 1 to 3 spatial letters)
    with a matrix ``b`` over its channel letter: ``F.conv*d`` with a 1×1
    kernel, result in ``a``'s order. Two such tensors summed over everything
    but their channel letters: the weight gradient of that convolution.
    """
    order = _block_order(a, la)
    if order is None or not 3 <= len(order) <= 5:
        return None
    spatial = order[2:]
    if b.ndim == 2 and contracted == order[1]:
        free = lb.replace(contracted, "")
        weight = _arrange(b, lb, free + contracted)
        weight = weight.reshape(weight.shape + (1,) * len(spatial))
        return _CONV[len(spatial)](a.permute(_perm(la, order)), weight), (
            order[0] + free + spatial
        )
    other = _block_order(b, lb) if b.ndim == a.ndim else None
    if other is None or other[0] + other[2:] != order[0] + spatial:
        return None
    if sorted(contracted) != sorted(order[0] + spatial):
        return None
    x, g = a.permute(_perm(la, order)), b.permute(_perm(lb, other))
    ones = (1,) * len(spatial)
    weight = x.new_empty((g.shape[1], x.shape[1]) + ones)
    y = torch.ops.aten.convolution_backward(
        g, x, weight, None, list(ones), [0] * len(spatial), list(ones), False,
        [0] * len(spatial), 1, [False, True, False],
    )[1]  # fmt: skip
    return y.reshape(g.shape[1], x.shape[1]), other[1] + order[1]


def _perm(letters: str, order: str) -> List[int]:
    return [letters.index(c) for c in order]


def _matmul_as_conv(a, la, b, lb, out, contracted, channels_last):
    """The product as a 1×1 ``F.conv1d`` (oneDNN), ``None`` if it needs a copy.

    ``a`` is read as ``[batch, contracted, positions]`` (its letters before
    the first contracted one in memory are the batch); the result is laid
    out as :func:`_bmm` lays it out.
    """
    order = memory_order(a, la)
    outer = order[: min(order.index(c) for c in contracted)]
    inner = "".join(c for c in order if c not in contracted and c not in outer)
    small_free = "".join(c for c in lb if c not in contracted)
    if not _viewable(a, la, (outer, contracted, inner)):
        return None
    if not channels_last and not _viewable(a, la, (outer + contracted + inner,)):
        return None  # a returned result keeps the signal's layout
    sizes = dict(zip(la, a.shape))
    sizes.update(zip(lb, b.shape))

    def run() -> Tuple[Tensor, str]:
        x = _arrange(a, la, outer + contracted + inner).view(
            _count(sizes, outer), _count(sizes, contracted), _count(sizes, inner)
        )
        w = _arrange(b, lb, small_free + contracted).reshape(
            _count(sizes, small_free), _count(sizes, contracted), 1
        )
        y = F.conv1d(x, w)
        # the layout bmm would give, so that the measurement compares like
        # with like (the next steps' speed depends on it)
        if channels_last:
            letters, y = outer + inner + small_free, y.transpose(1, 2).contiguous()
        else:
            letters, y = outer + small_free + inner, y.contiguous()
        return y.view([sizes[c] for c in letters]), letters

    return run


def _bmm(a, la, b, lb, out, contracted, channels_last) -> Tuple[Tensor, str]:
    """The product as one ``bmm`` (see :func:`run_matmul`)."""
    small_free = "".join(c for c in lb if c not in contracted)
    big_free = [c for c in memory_order(a, la) if c not in contracted]
    sizes = dict(zip(la, a.shape))
    sizes.update(zip(lb, b.shape))
    small = _arrange(b, lb, contracted + small_free).reshape(
        _count(sizes, contracted), _count(sizes, small_free)
    )
    if channels_last:
        splits = [0]
    else:  # batch: the result's letters before the smaller operand's first one
        lead = next((i for i, c in enumerate(out) if c in small_free), len(out))
        splits = [len([c for c in out[:lead] if c in big_free])]
    order = memory_order(a, la)
    splits.append(min(order.index(c) for c in contracted))
    for split in splits:
        outer = "".join(big_free[:split])
        inner = "".join(big_free[split:])
        big = _batched(a, la, sizes, outer, contracted, inner)
        if big is not None:
            break
    else:
        return torch.einsum(f"{la},{lb}->{out}", a, b), out
    n_outer, n_k, n_small = big.shape[0], big.shape[2], small.shape[1]
    if channels_last:
        result = torch.bmm(big, small.expand(n_outer, n_k, n_small))
        letters = outer + inner + small_free
    else:
        result = torch.bmm(small.t().expand(n_outer, n_small, n_k), big.transpose(1, 2))
        letters = outer + small_free + inner
    return result.reshape([sizes[c] for c in letters]), letters


def _summed_batch(a: Tensor, la: str, b: Tensor, lb: str, contracted: str):
    """``Σ_s a[s] @ b[s]`` over contracted letters outermost in both operands.

    A weight gradient ``Σ_{n,h,w} g[n,r,h,w] x[n,c,h,w]`` with ``x`` in NCHW
    and ``g`` channels-last has no single-matrix view, but one per sample.
    """
    order_a, order_b = memory_order(a, la), memory_order(b, lb)
    prefix = ""
    for ca, cb in zip(order_a, order_b):
        if ca != cb or ca not in contracted:
            break
        prefix += ca
    if not prefix:
        return None
    sizes = dict(zip(la, a.shape))
    rest = "".join(c for c in contracted if c not in prefix)
    free_a = "".join(c for c in order_a if c not in contracted)
    free_b = "".join(c for c in order_b if c not in contracted)
    a3 = _batched(a, la, sizes, prefix, rest, free_a)
    b3 = _batched(b, lb, dict(zip(lb, b.shape)), prefix, rest, free_b)
    if a3 is None or b3 is None:
        return None
    shape_a = [sizes[c] for c in free_a]
    shape_b = [b.shape[lb.index(c)] for c in free_b]

    def by_bmm() -> Tuple[Tensor, str]:
        result = torch.bmm(a3, b3.transpose(1, 2)).sum(0)
        return result.reshape(shape_a + shape_b), free_a + free_b

    def by_weight_gradient() -> Tuple[Tensor, str]:
        # Σ_s a[s] b[s]ᵀ is the weight gradient of a 1×1 conv1d whose input
        # is a (channels free_a, positions rest) and output gradient b
        weight = a3.new_empty(b3.shape[1], a3.shape[1], 1)
        result = torch.ops.aten.convolution_backward(
            b3, a3, weight, None, [1], [0], [1], False, [0], 1,
            [False, True, False],
        )[1]  # fmt: skip
        return result.reshape(shape_b + shape_a), free_b + free_a

    key = ("conv_einsum.summed", la, lb, a.shape, b.shape, a.stride(), b.stride(),
           contracted)  # fmt: skip
    return autotune.fastest(key, {"wgrad1x1": by_weight_gradient, "bmm": by_bmm})[1]


def _batched(a: Tensor, la: str, sizes, outer: str, contracted: str, inner: str):
    """``a`` as a ``[outer, inner, contracted]`` view, ``None`` if it needs a copy.

    Each group of letters must be one block in memory; the two inner groups
    may come in either order (the matrix is then read transposed).
    """
    shape = (_count(sizes, outer), _count(sizes, inner), _count(sizes, contracted))
    if _viewable(a, la, (outer, inner, contracted)):
        return _arrange(a, la, outer + inner + contracted).view(shape)
    if _viewable(a, la, (outer, contracted, inner)):
        view = _arrange(a, la, outer + contracted + inner).view(
            shape[0], shape[2], shape[1]
        )
        return view.transpose(1, 2)
    return None


def _viewable(a: Tensor, la: str, groups: Sequence[str]) -> bool:
    """Whether ``a`` permuted to ``groups`` can be viewed with one dim per group.

    Checked on the strides (a failed ``view`` raises, which is slow).
    """
    for group in groups:
        dims = [la.index(c) for c in group if a.shape[la.index(c)] != 1]
        for outer_dim, inner_dim in zip(dims, dims[1:]):
            if a.stride(outer_dim) != a.stride(inner_dim) * a.shape[inner_dim]:
                return False
    return True


def _count(sizes: Dict[str, int], letters: str) -> int:
    return math.prod(sizes[c] for c in letters)
