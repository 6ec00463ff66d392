"""The engine's public entry points: build, simplify and contract a network.

Each function takes a :class:`~tnbackpack.tn.spec.ConvSpec` and tensors and
returns a tensor. ``simplified=False`` skips the strided-window rewrite (used
by the tests to check both paths).
"""

from __future__ import annotations

from functools import lru_cache
from math import prod
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import autotune, checks, expressions, gram, patches, shifted, torch_routes
from .network import TensorNetwork, plan
from .simplify import simplify
from .spec import ConvSpec

#: Largest number of elements a materialized block of per-sample VJPs may have
#: before the batch is processed in chunks (2**19 floats = 2 MiB in float32).
#: Small blocks stay in cache and need fewer fresh pages: the diagonal GGN of a
#: 3x3 Conv2d (N=32, 32->64, 32x32, 10 vectors) took 204 ms with 2**20,
#: 232 ms with 2**25, and its peak extra memory fell from 214 to 98 MB. With
#: 10 vectors, 2**19 vs 2**20 (ms): ResNet-18 3x3 355 / 373, ConvNeXt stem
#: 23 / 37, 3c3d's 6x6 layer 62 / 67, Inception 1x7 292 / 296, C3D 499 / 504.
MAX_BLOCK_ELEMENTS = 2**19

#: Largest copy of patches per block (2**22 floats = 16 MiB in float32) where
#: routes that copy them are expected: glibc serves repeated allocations up to
#: 32 MiB from memory it already holds, larger ones get fresh pages every time.
#: Measured on the depthwise MobileNetV2 3x3/2 layer (N=32, 96 channels,
#: 56x56): diagonal GGN with 10 vectors 150 -> 88 ms, squared gradients
#: 41 -> 11 ms; dense 3x3 layers with 10 vectors unchanged (+-5%).
MAX_PATCH_ELEMENTS = 2**22

ROUTES = ("auto", "materialize", "contract")

#: FLOP handicap of the ``contract`` route of :func:`weight_vjp_squares`.
CONTRACT_PENALTY = 8

#: Relative cost of gathering one element of a strided patch view into a
#: matrix, against streaming one element through a matrix product; see
#: :func:`_cheaper_product_route`.
GATHER_COST = 5


def _run(tn: TensorNetwork, simplified: bool) -> Tensor:
    return (simplify(tn) if simplified else tn).contract()


def forward(
    spec: ConvSpec,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    output_size: Optional[Sequence[int]] = None,
    simplified: bool = True,
) -> Tensor:
    """Layer output ``[N, C_out, *O]`` (see :func:`expressions.forward`)."""
    return _run(expressions.forward(spec, x, weight, bias, output_size), simplified)


def input_vjp_route(spec: ConvSpec) -> str:
    """The cost model's input-VJP route: ``tn`` or ``torch``, from the spec alone.

    ``tn`` for a convolution whose patterns are all strided windows (then the
    network is a reshape and a product), except a 1×1 stride-1 layer that
    widens its channels (``C_in < C_out``); ``torch`` elsewhere. Layers with
    more than three spatial dimensions always take ``tn`` (PyTorch has no
    kernels for them). See :func:`input_vjp` for the measurements.
    """
    if not torch_routes.supports(spec):
        return "tn"
    all_windows = all(expressions.windows(spec, d) for d in range(spec.ndim))
    if spec.transposed or not all_windows:
        return "torch"
    return "torch" if _widening_1x1(spec) else "tn"


def _widening_1x1(spec: ConvSpec) -> bool:
    """A 1×1 stride-1 convolution with more output than input channels.

    Its input VJP narrows the channels; the network's product then reads the
    larger tensor in a permuted copy, while PyTorch's kernel streams it in
    chunks (measured 2-2.8x faster with 10 vectors; see :func:`input_vjp`).
    """
    pointwise = all(k == 1 for k in spec.kernel_size) and all(
        s == 1 for s in spec.stride
    )
    return pointwise and spec.in_channels < spec.out_channels


def input_vjp_measured(spec: ConvSpec) -> bool:
    """Whether ``auto`` times both routes (with :data:`.autotune.POLICY` ``"measure"``).

    Convolutions whose patterns are all strided windows, where neither route
    is hopeless (both stream their operands once) and which one wins depends
    on channels, groups and the number of rows (see :func:`input_vjp`).
    Overlapping kernels and transposed layers keep PyTorch's kernel: the
    network is up to 5x slower there, too slow for even one timed run.
    """
    if spec.transposed or not torch_routes.supports(spec):
        return False
    return all(expressions.windows(spec, d) for d in range(spec.ndim))


def input_vjp_key(
    spec: ConvSpec,
    grad_output: Tensor,
    input_size: Sequence[int],
    vectors: bool,
    simplified: bool = True,
) -> tuple:
    """The :mod:`.autotune` key of an ``auto`` input VJP (for inspection)."""
    return (
        "input_vjp",
        spec,
        tuple(grad_output.shape),
        tuple(input_size),
        vectors,
        simplified,
        grad_output.dtype,
        grad_output.device,
    )


def input_vjp(
    spec: ConvSpec,
    grad_output: Tensor,
    weight: Tensor,
    input_size: Sequence[int],
    vectors: bool = False,
    simplified: bool = True,
    route: str = "auto",
) -> Tensor:
    """VJP w.r.t. the input, ``[(V,) N, C_in, *I]``.

    Routes: ``tn`` contracts the network; ``torch`` uses PyTorch's kernels
    (1 to 3 spatial dimensions, :mod:`.torch_routes`); ``auto`` takes
    :func:`input_vjp_route`'s choice and, with :data:`.autotune.POLICY`
    ``"measure"``, times both routes once per (spec, shapes, dtype, device)
    where the strided-window rewrite removes every pattern of a convolution
    (:func:`input_vjp_measured`), keeping the faster one.

    Measured (CPU ms, one thread, batch 16, network / kernel; ``python -m
    tnbackpack.benchmark.input_vjp``): overlapping 3x3 layers 2.5-5x slower
    by the network; 1×1 stride 2 faster by the network; 1×1 stride 1
    depthwise 0.1-0.6x, narrowing (64->16 @56², 10 vectors) 105 / 141, but
    widening (16->64 @56², 10 vectors) 99 / 36 and (32->128 @28²) 59 / 24;
    with one vector the widening layers are about even (5.1 / 4.4).
    """
    tn = expressions.input_vjp(spec, grad_output, weight, input_size, vectors)
    if route == "auto":
        route = input_vjp_route(spec)
        if autotune.POLICY == "measure" and input_vjp_measured(spec):
            key = input_vjp_key(spec, grad_output, input_size, vectors, simplified)
            remembered = autotune.remembered(key)
            if remembered is None:
                network = simplify(tn) if simplified else tn
                # planned outside the timing: planning is paid once anyway
                plan(network.equation(), _shapes_only(*network.operands))
                candidates = {
                    "tn": lambda: network.contract(),
                    "torch": lambda: torch_routes.input_vjp(
                        spec, grad_output, weight, input_size, vectors
                    ),
                }
                # the model's route last: it is preferred on a near tie
                names = sorted(candidates, key=lambda name: name == route)
                _, result = autotune.fastest(key, {n: candidates[n] for n in names})
                return result
            route = remembered
    if route == "torch":
        return torch_routes.input_vjp(spec, grad_output, weight, input_size, vectors)
    if route != "tn":
        raise ValueError(f"route must be 'auto', 'tn' or 'torch', got {route!r}")
    return _run(tn, simplified)


def weight_vjp(
    spec: ConvSpec,
    x: Tensor,
    grad_output: Tensor,
    simplified: bool = True,
    route: str = "auto",
) -> Tensor:
    """Weight gradient summed over the batch, shaped like the weight.

    Routes: ``tn`` contracts the network; ``torch`` calls PyTorch's weight
    gradient kernel (1 to 3 spatial dimensions, see :mod:`.torch_routes`);
    ``auto`` prefers ``torch`` where it exists.
    """
    tn = expressions.weight_vjp(spec, x, grad_output)
    if route == "auto":
        route = "torch" if torch_routes.supports(spec) else "tn"
    if route == "torch":
        return torch_routes.weight_vjp(spec, x, grad_output)
    if route != "tn":
        raise ValueError(f"route must be 'auto', 'tn' or 'torch', got {route!r}")
    return _run(tn, simplified)


def _shapes_only(*tensors: Tensor) -> Tuple[Tuple[int, ...], ...]:
    """The shapes that route decisions depend on (their cache key)."""
    return tuple(tuple(t.shape) for t in tensors)


def _meta(shape: Tuple[int, ...]) -> Tensor:
    """A data-less tensor: route decisions build networks only for their shapes."""
    return torch.empty(shape, device="meta")


def per_sample_weight_vjp_route(
    spec: ConvSpec, x: Tensor, grad_output: Tensor, vectors: bool = False
) -> Tuple[str, int]:
    """Cheaper route for per-sample weight VJPs and its FLOP estimate.

    ``tn``: the simplified network, contracted by opt_einsum (best when the
    strided-window rewrite removed the patterns, or for tiny outputs).
    ``shifted``: one batched matrix product per kernel tap on strided views of
    the input (:mod:`.shifted`), whose cost is that of the products alone.
    ``unfold``: one copy of the patches and one batched product
    (:func:`.patches.per_sample_weight_vjp`), for many rows per channel.
    Decided once per (spec, shapes) and cached.
    """
    return _per_sample_weight_vjp_route(spec, *_shapes_only(x, grad_output), vectors)


@lru_cache(maxsize=1024)
def _per_sample_weight_vjp_route(
    spec: ConvSpec,
    x_shape: Tuple[int, ...],
    grad_output_shape: Tuple[int, ...],
    vectors: bool,
) -> Tuple[str, int]:
    x, grad_output = _meta(x_shape), _meta(grad_output_shape)
    tn_cost = simplify(
        expressions.per_sample_weight_vjp(spec, x, grad_output, vectors)
    ).cost()
    product_cost = _product_cost(spec, x, grad_output, vectors)
    if product_cost >= tn_cost:
        return "tn", tn_cost
    if spec.transposed:
        return "shifted", product_cost
    traffic = _product_route_traffic(spec, x_shape, grad_output_shape, vectors)
    return min(traffic, key=traffic.get), product_cost


def _product_cost(spec: ConvSpec, x: Tensor, grad_output: Tensor, vectors: bool) -> int:
    """FLOPs of the product routes: one multiply-add per (sample, weight, position)."""
    batch = x.shape[0] * (grad_output.shape[0] if vectors else 1)
    positions = prod(
        grad_output.shape[-spec.ndim :] if not spec.transposed else x.shape[2:]
    )
    return 2 * batch * prod(spec.weight_shape()) * positions


def _product_route_traffic(
    spec: ConvSpec,
    x_shape: Tuple[int, ...],
    grad_output_shape: Tuple[int, ...],
    vectors: bool,
) -> Dict[str, int]:
    """Memory traffic per sample of ``shifted`` and ``unfold`` (a convolution).

    Both do the same FLOPs. ``shifted`` reads the output-gradient rows and the
    input once per kernel tap and writes (then stacks) one weight-sized block
    per tap; ``unfold`` gathers the patches once (a strided copy, weighted
    ``GATHER_COST`` per element) and writes the result once. Measured on
    3x3 layers, one thread: 32x32 inputs, 64 rows: shifted 1.6x faster; 640
    rows (V=10): unfold 1.6x faster; 6x6 inputs, 128 rows: unfold 3.7x faster.
    """
    groups = spec.groups
    rows = (grad_output_shape[0] if vectors else 1) * spec.out_channels // groups
    channels = spec.in_channels // groups
    taps = prod(spec.kernel_size)
    out_size = grad_output_shape[-spec.ndim :]
    positions = prod(out_size)
    # the shifted route's flat grid: the first output dimension times the
    # padded phase lengths of the others
    padded = [
        size + left + right for size, (left, right) in zip(x_shape[2:], spec.padding)
    ]
    grid = [-(-p // s) for p, s in zip(padded, spec.stride)]
    flat = out_size[0] * prod(grid[1:])
    block = rows * channels
    shifted_traffic = taps * flat * (rows + channels) + 3 * taps * block
    unfold_traffic = (
        GATHER_COST * taps * channels * positions + rows * positions + taps * block
    )
    return {"shifted": shifted_traffic, "unfold": unfold_traffic}


def per_sample_weight_vjp(
    spec: ConvSpec,
    x: Tensor,
    grad_output: Tensor,
    vectors: bool = False,
    simplified: bool = True,
    route: str = "auto",
) -> Tensor:
    """Per-sample weight VJPs ``[(V,) N, *weight]``.

    Args:
        spec: The layer.
        x: Layer input ``[N, C_in, *I]``.
        grad_output: ``[N, C_out, *O]``, or ``[V, N, C_out, *O]`` if ``vectors``.
        vectors: Whether ``grad_output`` has a leading vector axis.
        simplified: Apply the strided-window rewrite (``tn`` route).
        route: ``tn``, ``shifted``, ``unfold`` (convolutions only),
            ``grouped`` (PyTorch's grouped weight gradient, 1-3 dimensions) or
            ``auto``:
            the cost model (:func:`per_sample_weight_vjp_route`) names the
            candidates, and with :data:`.autotune.POLICY` ``"measure"`` the
            fastest is found by one timed run per (spec, shapes).
    """
    expressions.check_weight_vjp_arguments(spec, x, grad_output, vectors)
    if route not in ("auto", *_PER_SAMPLE_ROUTES):
        raise ValueError(
            "route must be 'auto', 'tn', 'shifted', 'unfold' or 'grouped', "
            f"got {route!r}"
        )
    if route == "auto":
        route, _ = per_sample_weight_vjp_route(spec, x, grad_output, vectors)
        if autotune.POLICY == "measure":
            key = (
                "per_sample_weight_vjp",
                spec,
                *_shapes_only(x, grad_output),
                vectors,
                simplified,
                x.dtype,
                x.device,
            )
            remembered = autotune.remembered(key)
            if remembered is None:
                return _measure_per_sample_routes(
                    key, spec, x, grad_output, vectors, simplified, route
                )
            route = remembered
    return _per_sample_by_route(route, spec, x, grad_output, vectors, simplified)


_PER_SAMPLE_ROUTES = ("tn", "shifted", "unfold", "grouped")


def _per_sample_by_route(
    route: str,
    spec: ConvSpec,
    x: Tensor,
    grad_output: Tensor,
    vectors: bool,
    simplified: bool,
) -> Tensor:
    """Per-sample weight VJPs by one named route (the network built only for ``tn``)."""
    if route == "shifted":
        return shifted.per_sample_weight_vjp(spec, x, grad_output, vectors)
    if route == "unfold":
        return patches.per_sample_weight_vjp(spec, x, grad_output, vectors)
    if route == "grouped":
        return torch_routes.per_sample_weight_vjp(spec, x, grad_output, vectors)
    tn = expressions.per_sample_weight_vjp(spec, x, grad_output, vectors)
    return _run(tn, simplified)


#: Candidates measured by ``auto``: the network only if its FLOP estimate is
#: within ``TN_WITHIN`` of the product routes', a product route only if its
#: traffic estimate is within ``TRAFFIC_WITHIN`` of the other's. A hopeless
#: candidate's one timed run could cost seconds (measured: 3.4 s for the
#: network of an 80-tap Conv1d, 5.7 s for the shifted route of a 3x3x3 Conv3d
#: with 3 input channels, where the chosen route takes 4 ms and 0.5 s).
TN_WITHIN = 1.5
TRAFFIC_WITHIN = 3


def _few_channels_per_group(spec: ConvSpec) -> bool:
    """Depthwise-like layers, where PyTorch's grouped weight gradient shines."""
    return spec.in_channels // spec.groups * spec.out_channels // spec.groups <= 4


@lru_cache(maxsize=1024)
def _measured_candidates(
    spec: ConvSpec,
    x_shape: Tuple[int, ...],
    grad_output_shape: Tuple[int, ...],
    vectors: bool,
    model_route: str,
) -> Tuple[str, ...]:
    """Routes worth one timed run, the model's choice last (it wins ties)."""
    x, grad_output = _meta(x_shape), _meta(grad_output_shape)
    tn = expressions.per_sample_weight_vjp(spec, x, grad_output, vectors)
    product_cost = _product_cost(spec, x, grad_output, vectors)
    names = ["tn"] if simplify(tn).cost() <= TN_WITHIN * product_cost else []
    if spec.transposed:
        names.append("shifted")
    else:
        # unfold's gather is plain streaming, so it is never hopeless; the
        # shifted route's per-tap products are (5.7 s vs 0.5 s, 3x3x3 Conv3d)
        traffic = _product_route_traffic(spec, x_shape, grad_output_shape, vectors)
        least = min(traffic.values())
        within = [n for n, t in traffic.items() if t <= TRAFFIC_WITHIN * least]
        names += [n for n in traffic if n == "unfold" or n in within]
    # PyTorch's grouped weight gradient: often the fastest for one vector per
    # sample (dense 3x3 32->64 on 32x32: 20 ms vs 21 unfold, 33 shifted), but
    # with V vectors it runs V·N groups and falls far behind (0.33 s vs 0.16 s)
    # unless every group is a single channel anyway
    if torch_routes.supports(spec) and (not vectors or _few_channels_per_group(spec)):
        names.append("grouped")
    if model_route not in names:
        names.append(model_route)
    names.sort(key=lambda name: name == model_route)
    return tuple(names)


def _measure_per_sample_routes(
    key: tuple,
    spec: ConvSpec,
    x: Tensor,
    grad_output: Tensor,
    vectors: bool,
    simplified: bool,
    model_route: str,
) -> Tensor:
    """Time the plausible routes once for ``key``; return the fastest's result."""
    names = _measured_candidates(
        spec, *_shapes_only(x, grad_output), vectors, model_route
    )
    if "tn" in names:  # plan outside the timing: planning is paid once anyway
        tn = expressions.per_sample_weight_vjp(spec, x, grad_output, vectors)
        network = simplify(tn) if simplified else tn
        plan(network.equation(), _shapes_only(*network.operands))

    def run(name: str) -> Callable[[], Tensor]:
        return lambda: _per_sample_by_route(
            name, spec, x, grad_output, vectors, simplified
        )

    _, result = autotune.fastest(key, {name: run(name) for name in names})
    return result


def bias_vjp(
    spec: ConvSpec,
    grad_output: Tensor,
    vectors: bool = False,
    per_sample: bool = False,
) -> Tensor:
    """Bias VJP ``[(V,) (N,) C_out]``: the sum over output positions (and batch).

    The bias meets no index pattern, so its network would have one operand;
    a plain ``sum`` computes the same and skips the einsum call (0.5 -> 0.2 ms).
    """
    expressions.check_bias_vjp_arguments(spec, grad_output, vectors)
    lead = 2 if vectors else 1  # axes before C_out
    dims = tuple(range(lead + 1, grad_output.ndim))
    return grad_output.sum(dims if per_sample else (lead - 1, *dims))


def _all_windows(tn: TensorNetwork) -> bool:
    """Whether the strided-window rewrite removes every pattern of ``tn``."""
    return all(leg.windows for leg in tn.legs.values())


def unfold(
    spec: ConvSpec,
    x: Tensor,
    output_size: Optional[Sequence[int]] = None,
    simplified: bool = True,
    route: str = "auto",
) -> Tensor:
    """Patches ``[N, C_in·∏K, ∏O]`` in ``F.unfold``'s order.

    Routes: ``tn`` contracts the input with the patterns; ``strided`` copies a
    zero-copy strided view (convolutions only, see :mod:`.patches`); ``auto``
    takes ``strided`` unless the patterns are windows (then ``tn`` is a reshape).
    """
    tn = expressions.unfold(spec, x, output_size)
    if route == "auto":
        route = "tn" if spec.transposed or _all_windows(tn) else "strided"
    if route == "tn":
        return _run(tn, simplified)
    if route != "strided":
        raise ValueError(f"route must be 'auto', 'tn' or 'strided', got {route!r}")
    out_size = _output_size_of(spec, x, output_size)
    view = patches.patches_view(spec, x, out_size)  # [N, C, *O, *K]
    ndim = spec.ndim
    order = [0, 1, *range(2 + ndim, 2 + 2 * ndim), *range(2, 2 + ndim)]
    return view.permute(order).reshape(x.shape[0], -1, prod(out_size))


def _output_size_of(
    spec: ConvSpec, x: Tensor, output_size: Optional[Sequence[int]]
) -> Tuple[int, ...]:
    input_size = tuple(x.shape[2:])
    padding = checks.output_padding_for(spec, input_size, output_size)
    return spec.output_size(input_size, output_padding=padding)


def kfac_input_factor(
    spec: ConvSpec,
    x: Tensor,
    approx: str = "expand",
    output_size: Optional[Sequence[int]] = None,
    simplified: bool = True,
    route: str = "auto",
) -> Tensor:
    """Input-side Kronecker factor ``[G, ci·∏K, ci·∏K]`` (``expand``/``reduce``).

    ``reduce`` always contracts the summed patterns (no unfolded input). For
    ``expand``, ``route`` picks between the network (``tn``) and one Gram
    matrix of strided-view patches (``strided``, convolutions only). ``auto``
    takes ``strided`` for every convolution and ``tn`` for transposed layers.
    FLOP estimates mislead here: the network's cheapest-FLOP path pairs the
    two pattern copies into large permuted intermediates whose memory traffic
    dominates (measured 2.6x slower than the Gram matrix for DeepOBS 2c2d's
    second layer, 1.75x for a 3x3 layer), and even where the strided-window
    rewrite applies, einsum's product is slower than one Gram matrix (0.72x
    BackPACK's speed for the ConvNeXt 4x4/4 stem by ``tn``).
    """
    tn = expressions.kfac_input_factor(spec, x, approx, output_size)
    if route == "auto":
        use_tn = approx == "reduce" or spec.transposed
        route = "tn" if use_tn else "strided"
    if route == "tn":
        return _run(tn, simplified)
    if route != "strided" or approx != "expand":
        raise ValueError(
            f"route must be 'auto', 'tn' or ('strided' for expand), got {route!r}"
        )
    return patches.kfac_expand_input_factor(
        spec, x, _output_size_of(spec, x, output_size)
    )


def kfac_output_factor(
    spec: ConvSpec, sqrt_ggn: Tensor, approx: str = "expand", route: str = "auto"
) -> Tensor:
    """Output-side Kronecker factor ``[G, co, co]`` from ``S [V, N, C_out, *O]``.

    Args:
        spec: The layer.
        sqrt_ggn: Backpropagated square root ``[V, N, C_out, *O]``.
        approx: ``"expand"`` (sum over positions of outer products) or
            ``"reduce"`` (outer products of the position sums).
        route: ``"gram"`` (blocked matrix products, :mod:`.gram`), ``"tn"``
            (the network of :func:`.expressions.kfac_output_factor`), or
            ``"auto"`` (``gram``).
    """
    tn = expressions.kfac_output_factor(spec, sqrt_ggn, approx)  # checks too
    if route not in ("auto", "gram", "tn"):
        raise ValueError(f"route must be 'auto', 'gram' or 'tn', got {route!r}")
    if route == "tn":
        return tn.contract()
    rows = sqrt_ggn.flatten(0, 1).flatten(2)  # [V·N, C_out, T]
    if approx == "reduce":
        rows = rows.sum(2, keepdim=True)
    return gram.grouped_gram(rows, spec.groups)


# ------------------------------------------------------- squares of weight VJPs
def _batch_chunk(tensor: Tensor, vectors: bool, start: int, stop: int) -> Tensor:
    return tensor[:, start:stop] if vectors else tensor[start:stop]


def _materialized_squares(
    spec: ConvSpec,
    x: Tensor,
    grad_output: Tensor,
    vectors: bool,
    per_sample: bool,
    sum_weight: bool,
    simplified: bool,
) -> Tensor:
    """Square per-sample VJPs block by block over the batch (bounded memory)."""
    batch = x.shape[0]
    per_sample_elements = (grad_output.shape[0] if vectors else 1) * prod(
        spec.weight_shape()
    )
    chunk = max(1, MAX_BLOCK_ELEMENTS // per_sample_elements)
    if vectors or _few_channels_per_group(spec):
        # routes that copy patches (∏K times the strided input per sample) win
        # here; bound the copy too (dense layers with one vector run PyTorch's
        # grouped kernel, which copies nothing and prefers whole batches)
        positions = x.shape[2:] if spec.transposed else grad_output.shape[-spec.ndim :]
        channels = spec.out_channels if spec.transposed else spec.in_channels
        patch_elements = channels * prod(spec.kernel_size) * prod(positions)
        chunk = max(1, min(chunk, MAX_PATCH_ELEMENTS // patch_elements))
    blocks = -(-batch // chunk)
    chunk = -(-batch // blocks)  # equal blocks: no small remainder to tune for
    parts: List[Tensor] = []  # per-sample results (kept batch axis)
    total: Optional[Tensor] = None  # or the running sum over the batch
    for start in range(0, batch, chunk):
        stop = min(start + chunk, batch)
        block = per_sample_weight_vjp(
            spec,
            x[start:stop],
            _batch_chunk(grad_output, vectors, start, stop),
            vectors,
            simplified,
        ).square_()
        if vectors:
            block = block.sum(0)
        if sum_weight:
            parts.append(block.flatten(1).sum(1))
        elif per_sample:
            parts.append(block)
        elif total is None:
            total = block.sum(0)
        else:
            # in place: stacking the blocks first costs a fresh
            # [blocks, *weight] tensor (measured 12 of 84 ms, 32 blocks)
            total.add_(block.sum(0))
    return total if total is not None else torch.cat(parts)


def choose_route(
    spec: ConvSpec,
    x: Tensor,
    grad_output: Tensor,
    vectors: bool,
    per_sample: bool,
    sum_weight: bool,
) -> str:
    """Pick the cheaper route for squared VJPs by opt_einsum's FLOP estimates.

    ``materialize`` costs one per-sample VJP plus the squares; ``contract``
    costs the two-copy network of :func:`expressions.squared_weight_vjp`,
    whose intermediates grow with the square of the output positions.
    Decided once per (spec, shapes, flags) and cached.
    """
    return _squares_route(
        spec, *_shapes_only(x, grad_output), vectors, per_sample, sum_weight
    )


@lru_cache(maxsize=1024)
def _squares_route(
    spec: ConvSpec,
    x_shape: Tuple[int, ...],
    grad_output_shape: Tuple[int, ...],
    vectors: bool,
    per_sample: bool,
    sum_weight: bool,
) -> str:
    x, grad_output = _meta(x_shape), _meta(grad_output_shape)
    _, vjp_cost = per_sample_weight_vjp_route(spec, x, grad_output, vectors)
    squared = expressions.squared_weight_vjp(
        spec, x, grad_output, vectors, per_sample, sum_weight
    )
    lead = grad_output.shape[0] * x.shape[0] if vectors else x.shape[0]
    materialize = vjp_cost + 2 * lead * prod(spec.weight_shape())
    contract = simplify(squared).cost()
    # The two-copy network's intermediates are [n, g, o, o']-sized and
    # memory-bound; FLOPs flatter it (measured: an Inception 1x7 layer whose
    # contract route was 4x slower than materializing at 0.6x the FLOPs).
    return "contract" if contract * CONTRACT_PENALTY < materialize else "materialize"


def weight_vjp_squares(
    spec: ConvSpec,
    x: Tensor,
    grad_output: Tensor,
    vectors: bool = False,
    per_sample: bool = False,
    sum_weight: bool = False,
    route: str = "auto",
    simplified: bool = True,
) -> Tensor:
    """``Σ (J_wᵀ g)²`` over vectors (and batch unless ``per_sample``).

    The common core of the diagonal GGN/Hessian (``vectors=True``: the columns
    of a backpropagated square root), the sum of squared gradients
    (``vectors=False``) and the squared per-sample gradient norms
    (``per_sample=True, sum_weight=True``).

    Args:
        spec: The layer.
        x: Layer input ``[N, C_in, *I]``.
        grad_output: ``[N, C_out, *O]`` or ``[V, N, C_out, *O]`` (``vectors``).
        vectors: Whether ``grad_output`` has a leading vector axis.
        per_sample: Keep the batch axis.
        sum_weight: Sum over the weight entries (needs ``per_sample``).
        route: ``materialize`` per-sample VJPs in bounded blocks, ``contract``
            two copies of the network without any VJP, or ``auto`` (cheaper
            by opt_einsum's estimate).
        simplified: Apply the strided-window rewrite.

    Returns:
        ``[(N,) *weight]``, or ``[N]`` if ``sum_weight``.
    """
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if sum_weight and not per_sample:
        raise ValueError("sum_weight=True needs per_sample=True")
    if route == "auto":
        route = choose_route(spec, x, grad_output, vectors, per_sample, sum_weight)
    if route == "contract":
        tn = expressions.squared_weight_vjp(
            spec, x, grad_output, vectors, per_sample, sum_weight
        )
        return _run(tn, simplified)
    return _materialized_squares(
        spec, x, grad_output, vectors, per_sample, sum_weight, simplified
    )
