"""One function per quantity, each returning the tensor network that computes it.

Index names (per spatial dimension ``d``): ``k{d}`` kernel tap, ``i{d}`` layer
input position, ``o{d}`` layer output position; ``n`` batch, ``v`` leading
vector axis (e.g. columns of a GGN square root), ``g`` channel group, ``ci`` /
``co`` input / output channel within a group. Weights are viewed as
``[g, co, ci, k...]`` (convolution) or ``[g, ci, co, k...]`` (transposed).

Every network contains one index pattern ``Π_d[k, i, o]`` (see
:mod:`.pattern`) per spatial dimension and copy of the input. Nothing here
contracts; :mod:`.functional` simplifies and evaluates the networks.
"""

from __future__ import annotations

from functools import partial
from math import prod
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import checks
from .network import Axes, PatternLeg, TensorNetwork
from .pattern import index_pattern, summed_index_pattern
from .spec import ConvSpec


def _names(prefix: str, ndim: int) -> Axes:
    return tuple(f"{prefix}{d}" for d in range(ndim))


def _weight_axes(spec: ConvSpec, kernel: str = "k") -> Axes:
    """Axis names of the grouped weight view."""
    channels = ("ci", "co") if spec.transposed else ("co", "ci")
    return ("g", *channels, *_names(kernel, spec.ndim))


def _add_input(
    tn: TensorNetwork,
    spec: ConvSpec,
    x: Tensor,
    channel: str = "ci",
    position: str = "i",
) -> None:
    """Add ``x [N, C_in, *I]`` viewed as ``[n, g, ci, i...]``."""
    grouped = x.reshape(x.shape[0], spec.groups, -1, *x.shape[2:])
    tn.add(grouped, ("n", "g", channel, *_names(position, spec.ndim)))


def _add_output_like(
    tn: TensorNetwork,
    spec: ConvSpec,
    tensor: Tensor,
    vectors: bool,
    channel: str = "co",
    position: str = "o",
) -> None:
    """Add ``[(V,) N, C_out, *O]`` viewed as ``[(v,) n, g, co, o...]``."""
    lead = tensor.shape[: 2 if vectors else 1]
    grouped = tensor.reshape(*lead, spec.groups, -1, *tensor.shape[len(lead) + 1 :])
    axes = (("v",) if vectors else ()) + ("n", "g", channel)
    tn.add(grouped, (*axes, *_names(position, spec.ndim)))


def _add_weight(tn: TensorNetwork, spec: ConvSpec, weight: Tensor) -> None:
    grouped = weight.reshape(spec.groups, -1, *weight.shape[1:])
    tn.add(grouped, _weight_axes(spec))


def windows(spec: ConvSpec, d: int) -> bool:
    """Whether ``Π_d`` consists of non-overlapping strided windows.

    True when nothing is padded on the left (a transposed layer crops nothing
    there) and consecutive windows do not overlap: ``S ≥ D·(K−1) + 1``. Right
    padding is fine for zeros (it only adds positions that read nothing) but
    not for the other modes, where padded positions read real ones.
    """
    left, right = spec.padding[d]
    reach = spec.dilation[d] * (spec.kernel_size[d] - 1) + 1
    reads_padding = right > 0 and spec.padding_mode != "zeros"
    return left == 0 and not reads_padding and spec.stride[d] >= reach


def _add_patterns(
    tn: TensorNetwork,
    spec: ConvSpec,
    input_size: Sequence[int],
    output_size: Sequence[int],
    like: Tensor,
    kernel: str = "k",
    position_in: str = "i",
    position_out: str = "o",
    summed: bool = False,
) -> None:
    """Add one pattern per spatial dimension (``Π̄[k, i]`` if ``summed``)."""
    for d in range(spec.ndim):
        args = (
            input_size[d],
            output_size[d],
            spec.kernel_size[d],
            spec.stride[d],
            spec.padding[d][0],
            spec.dilation[d],
            spec.padding_mode,
            spec.transposed,
            like.device,
            like.dtype,
        )
        k, i, o = f"{kernel}{d}", f"{position_in}{d}", f"{position_out}{d}"
        if summed:  # [K, I]: small, built at once
            tn.add(summed_index_pattern(*args), (k, i))
            continue
        small, big = (i, o) if spec.transposed else (o, i)
        small_size, big_size = (
            (input_size[d], output_size[d])
            if spec.transposed
            else (output_size[d], input_size[d])
        )
        leg = PatternLeg(
            kernel=k,
            small=small,
            big=big,
            kernel_size=spec.kernel_size[d],
            stride=spec.stride[d],
            dilation=spec.dilation[d],
            small_size=small_size,
            big_size=big_size,
            windows=windows(spec, d),
        )
        # [K, I, O] can be large; built only if the network is contracted
        placeholder = torch.empty(
            spec.kernel_size[d],
            input_size[d],
            output_size[d],
            device="meta",
            dtype=like.dtype,
        )
        tn.add(placeholder, (k, i, o), leg=leg, build=partial(index_pattern, *args))


def _resolve_output_size(
    spec: ConvSpec, input_size: Sequence[int], output_size: Optional[Sequence[int]]
) -> Tuple[int, ...]:
    padding = checks.output_padding_for(spec, input_size, output_size)
    return spec.output_size(input_size, output_padding=padding)


# ---------------------------------------------------------------- forward & VJPs
def forward(
    spec: ConvSpec,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    output_size: Optional[Sequence[int]] = None,
) -> TensorNetwork:
    """Layer output ``[N, C_out, *O]``: ``x, Π..., W -> y`` (plus bias).

    Args:
        spec: The layer.
        x: Input ``[N, C_in, *I]``.
        weight: Weight as PyTorch stores it.
        bias: Optional bias ``[C_out]``.
        output_size: Spatial output size of a transposed layer (PyTorch's
            ``output_size=`` argument); defaults to the spec's output padding.
    """
    input_size = checks.check_input(spec, x)
    checks.check_weight(spec, weight)
    checks.check_bias(spec, bias)
    checks.check_same_kind(spec, input=x, weight=weight, bias=bias)
    out_size = _resolve_output_size(spec, input_size, output_size)
    tn = TensorNetwork([], [], ("n", "g", "co", *_names("o", spec.ndim)))
    _add_input(tn, spec, x)
    _add_patterns(tn, spec, input_size, out_size, x)
    _add_weight(tn, spec, weight)
    batch = x.shape[0]
    tn.then(lambda y: y.reshape(batch, spec.out_channels, *out_size))
    if bias is not None:
        tn.then(lambda y: y + bias.reshape(-1, *([1] * spec.ndim)))
    return tn


def input_vjp(
    spec: ConvSpec,
    grad_output: Tensor,
    weight: Tensor,
    input_size: Sequence[int],
    vectors: bool = False,
) -> TensorNetwork:
    """Vector-Jacobian product w.r.t. the input: ``gy, Π..., W -> gx``.

    Args:
        spec: The layer.
        grad_output: ``[N, C_out, *O]``, or ``[V, N, C_out, *O]`` if ``vectors``.
        weight: Weight as PyTorch stores it.
        input_size: Spatial input size (not determined by the output size
            when the stride is larger than one).
        vectors: Whether ``grad_output`` carries a leading vector axis.

    Returns:
        The network for ``[(V,) N, C_in, *I]``.
    """
    input_size = tuple(input_size)
    out_size = checks.check_output_like(
        spec, "grad_output", grad_output, input_size, None, vectors
    )
    checks.check_weight(spec, weight)
    checks.check_same_kind(spec, grad_output=grad_output, weight=weight)
    lead = (("v",) if vectors else ()) + ("n",)
    tn = TensorNetwork([], [], (*lead, "g", "ci", *_names("i", spec.ndim)))
    _add_output_like(tn, spec, grad_output, vectors)
    _add_patterns(tn, spec, input_size, out_size, grad_output)
    _add_weight(tn, spec, weight)
    shape = (*grad_output.shape[: len(lead)], spec.in_channels, *input_size)
    return tn.then(lambda gx: gx.reshape(shape))


def check_weight_vjp_arguments(
    spec: ConvSpec, x: Tensor, grad_output: Tensor, vectors: bool
) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Check the operands of the weight VJP family; return input and output size.

    Routes that do not contract the network call this alone (building the
    network costs ~0.2 ms per call, as much as a small layer's product).
    """
    input_size = checks.check_input(spec, x)
    out_size = checks.check_output_like(
        spec, "grad_output", grad_output, input_size, x.shape[0], vectors
    )
    checks.check_same_kind(spec, input=x, grad_output=grad_output)
    return input_size, out_size


def _weight_vjp_network(
    spec: ConvSpec, x: Tensor, grad_output: Tensor, vectors: bool, keep: Axes
) -> TensorNetwork:
    """``x, Π..., gy -> (keep..., weight axes)``: the weight VJP family."""
    input_size, out_size = check_weight_vjp_arguments(spec, x, grad_output, vectors)
    tn = TensorNetwork([], [], (*keep, *_weight_axes(spec)))
    _add_input(tn, spec, x)
    _add_patterns(tn, spec, input_size, out_size, x)
    _add_output_like(tn, spec, grad_output, vectors)
    return tn


def weight_vjp(spec: ConvSpec, x: Tensor, grad_output: Tensor) -> TensorNetwork:
    """Weight gradient summed over the batch: ``x, Π..., gy -> W``."""
    tn = _weight_vjp_network(spec, x, grad_output, vectors=False, keep=())
    return tn.then(lambda gw: gw.reshape(spec.weight_shape()))


def per_sample_weight_vjp(
    spec: ConvSpec, x: Tensor, grad_output: Tensor, vectors: bool = False
) -> TensorNetwork:
    """Per-sample weight VJPs ``[(V,) N, *weight]``: the batch axis is kept.

    With ``vectors`` the output gradient is ``[V, N, C_out, *O]`` (e.g. the
    columns of a backpropagated GGN square root) and all ``V·N`` products are
    computed in one contraction.
    """
    keep = ("v", "n") if vectors else ("n",)
    tn = _weight_vjp_network(spec, x, grad_output, vectors, keep)
    lead = tuple(grad_output.shape[: len(keep)])
    return tn.then(lambda gw: gw.reshape(*lead, *spec.weight_shape()))


def check_bias_vjp_arguments(
    spec: ConvSpec, grad_output: Tensor, vectors: bool
) -> None:
    """Check the output gradient of a bias VJP ``[(V,) N, C_out, *O]``."""
    checks.check_tensor(
        spec, "grad_output", grad_output, spec.ndim + (3 if vectors else 2)
    )
    checks.check_channels(spec, "grad_output", grad_output, 1 + vectors)


def squared_weight_vjp(
    spec: ConvSpec,
    x: Tensor,
    grad_output: Tensor,
    vectors: bool = False,
    per_sample: bool = False,
    sum_weight: bool = False,
) -> TensorNetwork:
    """Squares of weight VJPs, contracted without materializing any VJP.

    Computes ``Σ (J_wᵀ g)²`` over the vectors ``g`` (and over the batch unless
    ``per_sample``) element-wise per weight entry, or summed over the weight
    (``sum_weight``: squared per-sample gradient norms). Two copies of the
    network ``x, Π, gy`` share the batch, vector and weight indices but get
    their own positions, so the intermediate is ``[n, g, o, o']``-sized instead
    of ``[n, *weight]``-sized: cheap when there are few output positions.

    Returns:
        The network for ``[(N,) *weight]``, or ``[N]`` if ``sum_weight``.
    """
    input_size = checks.check_input(spec, x)
    out_size = checks.check_output_like(
        spec, "grad_output", grad_output, input_size, x.shape[0], vectors
    )
    checks.check_same_kind(spec, input=x, grad_output=grad_output)
    keep = ("n",) if per_sample else ()
    weight_axes = () if sum_weight else _weight_axes(spec)
    tn = TensorNetwork([], [], (*keep, *weight_axes))
    for copy in ("", "'"):
        _add_input(tn, spec, x, position="i" + copy)
        _add_patterns(
            tn,
            spec,
            input_size,
            out_size,
            x,
            position_in="i" + copy,
            position_out="o" + copy,
        )
        _add_output_like(tn, spec, grad_output, vectors, position="o" + copy)
    batch = x.shape[0]
    if sum_weight:
        return tn
    shape = ((batch,) if per_sample else ()) + spec.weight_shape()
    return tn.then(lambda sq: sq.reshape(shape))


# ------------------------------------------------------------------- patches
def unfold(
    spec: ConvSpec, x: Tensor, output_size: Optional[Sequence[int]] = None
) -> TensorNetwork:
    """Patches (im2col) ``[N, C_in·∏K, ∏O]``, ordered like ``F.unfold``.

    For a transposed layer the patch of output location ``o`` is what the
    weight multiplies there: ``y[:, :, o] = W̃ᵀ patch[:, :, o]`` per group.
    """
    input_size = checks.check_input(spec, x)
    out_size = _resolve_output_size(spec, input_size, output_size)
    tn = TensorNetwork(
        [], [], ("n", "g", "ci", *_names("k", spec.ndim), *_names("o", spec.ndim))
    )
    _add_input(tn, spec, x)
    _add_patterns(tn, spec, input_size, out_size, x)
    shape = (x.shape[0], spec.in_channels * prod(spec.kernel_size), prod(out_size))
    return tn.then(lambda p: p.reshape(shape))


# --------------------------------------------------------------- KFAC factors
def kfac_input_factor(
    spec: ConvSpec,
    x: Tensor,
    approx: str = "expand",
    output_size: Optional[Sequence[int]] = None,
) -> TensorNetwork:
    """Input-side Kronecker factor ``A`` per group, ``[G, ci·∏K, ci·∏K]``.

    - ``"expand"``: ``1/(N·T) Σ_{n,t} x̃ x̃ᵀ``. Both copies of the patterns share
      the output position ``o``.
    - ``"reduce"``: ``1/(N·T²) Σ_n (Σ_t x̃)(Σ_t x̃)ᵀ``. Each copy uses the
      pattern summed over output positions, ``Π̄[k, i]``, so the unfolded input
      is never built: the input meets a ``[K, I]`` matrix per dimension.

    ``T`` is the number of output positions and ``x̃`` a patch (see
    :func:`unfold`); for a transposed layer the same definitions apply to its
    patches.
    """
    if approx not in ("expand", "reduce"):
        raise ValueError(f"approx must be 'expand' or 'reduce', got {approx!r}")
    input_size = checks.check_input(spec, x)
    out_size = _resolve_output_size(spec, input_size, output_size)
    reduce = approx == "reduce"
    ndim = spec.ndim
    tn = TensorNetwork(
        [], [], ("g", "ci", *_names("k", ndim), "ci'", *_names("k'", ndim))
    )
    for copy in ("", "'"):
        _add_input(tn, spec, x, channel="ci" + copy, position="i" + copy)
        _add_patterns(
            tn,
            spec,
            input_size,
            out_size,
            x,
            kernel="k" + copy,
            position_in="i" + copy,
            position_out="o" if not reduce else "o" + copy,
            summed=reduce,
        )
    positions = prod(out_size)
    scale = 1.0 / (x.shape[0] * positions ** (2 if reduce else 1))
    side = spec.in_channels // spec.groups * prod(spec.kernel_size)
    # in place: the Gram matrix is a fresh tensor, and a new one costs fresh pages
    return tn.then(lambda a: a.reshape(spec.groups, side, side).mul_(scale))


def kfac_output_factor(
    spec: ConvSpec, sqrt_ggn: Tensor, approx: str = "expand"
) -> TensorNetwork:
    """Output-side Kronecker factor ``B`` per group, ``[G, co, co]``.

    From a backpropagated square root ``S [V, N, C_out, *O]``:

    - ``"expand"``: ``Σ_{v,n,t} s sᵀ`` (both copies share ``o``),
    - ``"reduce"``: ``Σ_{v,n} (Σ_t s)(Σ_t s)ᵀ`` (each copy sums its own ``o``).
    """
    if approx not in ("expand", "reduce"):
        raise ValueError(f"approx must be 'expand' or 'reduce', got {approx!r}")
    checks.check_tensor(spec, "sqrt_ggn", sqrt_ggn, spec.ndim + 3)
    checks.check_channels(spec, "sqrt_ggn", sqrt_ggn, 2)
    tn = TensorNetwork([], [], ("g", "co", "co'"))
    _add_output_like(tn, spec, sqrt_ggn, vectors=True)
    second = "o" if approx == "expand" else "o'"
    _add_output_like(tn, spec, sqrt_ggn, vectors=True, channel="co'", position=second)
    return tn
