"""Factorized convolution kernels as sequences of ordinary convolutions (stages).

Every factor of a CP, Tucker-2, tensor-train (TT) or tensor-ring (TR) kernel is
the weight of exactly one *stage*, an ordinary, grouped or depthwise
convolution; running the stages one after the other is the factorized layer.
That makes every per-factor quantity (per-sample gradients, curvature
diagonals, Kronecker factors) the weight quantity of its stage, which the
engine already computes. Factors are stored in their stage's weight layout
(output channels first, then input channels per group, then taps), without the
stage's unit kernel axes, so ``factor.reshape(stage.weight_shape())`` is the
stage weight (and, but for the TR input core, ``factor.flatten(1)`` its
``[C_out, C_in/G·∏K]`` matrix).

Stages for a layer with ``G`` groups, ``C_in → C_out`` channels, kernel
``K_1 × … × K_d`` (ranks are per group):

- CP ``R``: ``input_factor [G·R, C_in/G]`` (1×1, ``C_in → G·R``, ``G``
  groups), ``kernel_factor_i [G·R, K_i]`` (depthwise along axis ``i``),
  ``output_factor [C_out, R]`` (1×1, ``G·R → C_out``, bias);
- Tucker-2 ``(R_in, R_out)``: ``input_factor [G·R_in, C_in/G]`` (1×1),
  ``core [G·R_out, R_in, *K]`` (full kernel, ``G`` groups),
  ``output_factor [C_out, R_out]`` (1×1, bias);
- TT ``(r_0, …, r_d)``: ``input_core [G·r_0, C_in/G]`` (1×1),
  ``kernel_core_i [G·r_i+1, r_i, K_i]`` (along axis ``i``, mixing bonds),
  ``output_core [C_out, r_d]`` (1×1, bias);
- TR ``(r_0, …, r_d, r_z)``: ``input_core [G·r_0, r_z, C_in/G]`` (1×1 to
  ``(r_0, r_z)`` channels), ``kernel_core_i`` as TT but on a (d+1)-d
  convolution whose first axis is the ring bond (kernel size 1),
  ``output_core [C_out, r_d, r_z]`` (1×1 from ``(r_d, r_z)`` channels, bias).

Stride, padding, dilation and padding mode act on the spatial stages, one axis
at a time; the 1×1 stages stay plain. This is exact for every padding mode:
padding copies (or zeroes) whole positions, so it commutes with the 1×1
channel mixing and with convolutions along the other axes.

The TR ring bond ``r_z`` is carried as an extra leading spatial axis with a
one-tap kernel: the kernel cores act on every ring position alike, and
summing over ring positions is what a convolution does with positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Callable, Dict, Sequence, Tuple, Union

from ..tn.spec import ConvSpec

FACTORIZATIONS = ("cp", "tucker", "tt", "tr")

#: Spatial letters of the layer's equation per number of spatial dimensions.
SPATIAL_LETTERS = {1: "w", 2: "hw", 3: "thw"}
#: Letters of the TT/TR bonds ``r_0, …, r_d`` and of the TR ring bond.
BOND_LETTERS = "abdef"
RING_LETTER = "z"

Rank = Union[int, float, Sequence[int]]


def spatial_letters(spec: ConvSpec) -> str:
    """The spatial letters of a layer's equation."""
    return SPATIAL_LETTERS[spec.ndim]


def dense_parameters(spec: ConvSpec) -> int:
    """Number of entries of the dense kernel."""
    return prod(spec.weight_shape())


@dataclass(frozen=True)
class Factor:
    """One factor and the stage convolution whose weight it is.

    Attributes:
        name: Parameter name on the layer.
        shape: Stored shape (the stage weight without its unit kernel axes).
        subscripts: Letters of the stored factor in the layer's equation,
            without the group letter.
        stage: The stage convolution (``ndim`` spatial axes, one more for a
            TR kernel core).
        ring: Size of the ring axis that the stage carries as its first
            spatial axis (TR kernel cores), ``0`` if none.
    """

    name: str
    shape: Tuple[int, ...]
    subscripts: str
    stage: ConvSpec
    ring: int = 0


# ---------------------------------------------------------------- stage specs
def _stage(
    dense: ConvSpec,
    in_channels: int,
    out_channels: int,
    axes: Sequence[int] = (),
    groups: int = 0,
    bias: bool = False,
    ring: int = 0,
) -> ConvSpec:
    """A stage conv that applies the layer's kernel geometry along ``axes``.

    The other axes get a one-tap kernel, stride 1 and no padding; ``ring``
    prepends such an axis.
    """
    kernel, stride, padding, dilation = [], [], [], []
    for d in range(dense.ndim):
        on = d in axes
        kernel.append(dense.kernel_size[d] if on else 1)
        stride.append(dense.stride[d] if on else 1)
        padding.append(dense.padding[d] if on else (0, 0))
        dilation.append(dense.dilation[d] if on else 1)
    lead = 1 if ring else 0
    return ConvSpec(
        ndim=dense.ndim + lead,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=(1,) * lead + tuple(kernel),
        stride=(1,) * lead + tuple(stride),
        padding=((0, 0),) * lead + tuple(padding),
        dilation=(1,) * lead + tuple(dilation),
        groups=groups or dense.groups,
        bias=bias,
        padding_mode=dense.padding_mode if axes else "zeros",
        output_padding=(0,) * (dense.ndim + lead),
    )


def _channels(dense: ConvSpec) -> Tuple[int, int, int]:
    g = dense.groups
    return g, dense.in_channels // g, dense.out_channels // g


# -------------------------------------------------------------- factorizations
def cp_factors(dense: ConvSpec, ranks: Tuple[int, ...]) -> Tuple[Factor, ...]:
    """CP: ``x, [r c], [r k_1], …, [r k_d], [o r]`` (λ absorbed in the factors)."""
    (rank,) = ranks
    g, c, _ = _channels(dense)
    width = g * rank
    factors = [
        Factor(
            "input_factor", (width, c), "rc", _stage(dense, dense.in_channels, width)
        )
    ]
    for d, letter in enumerate(spatial_letters(dense)):
        stage = _stage(dense, width, width, axes=(d,), groups=width)
        shape = (width, dense.kernel_size[d])
        factors.append(Factor(f"kernel_factor_{d}", shape, "r" + letter, stage))
    out = _stage(dense, width, dense.out_channels, bias=dense.bias)
    factors.append(Factor("output_factor", (dense.out_channels, rank), "or", out))
    return tuple(factors)


def tucker_factors(dense: ConvSpec, ranks: Tuple[int, ...]) -> Tuple[Factor, ...]:
    """Tucker-2 on the channels: ``x, [a c], [b a *k], [o b]`` (the core keeps taps)."""
    r_in, r_out = ranks
    g, c, _ = _channels(dense)
    core_stage = _stage(dense, g * r_in, g * r_out, axes=range(dense.ndim))
    return (
        Factor(
            "input_factor",
            (g * r_in, c),
            "ac",
            _stage(dense, dense.in_channels, g * r_in),
        ),
        Factor(
            "core",
            (g * r_out, r_in, *dense.kernel_size),
            "ba" + spatial_letters(dense),
            core_stage,
        ),
        Factor(
            "output_factor",
            (dense.out_channels, r_out),
            "ob",
            _stage(dense, g * r_out, dense.out_channels, bias=dense.bias),
        ),
    )


def _kernel_cores(
    dense: ConvSpec, bonds: Sequence[int], ring: int
) -> Tuple[Factor, ...]:
    """TT/TR cores ``[G·r_i+1, r_i, K_i]``, one stage per spatial axis."""
    g = dense.groups
    cores = []
    for d, letter in enumerate(spatial_letters(dense)):
        r_in, r_out = bonds[d], bonds[d + 1]
        stage = _stage(dense, g * r_in, g * r_out, axes=(d,), ring=ring)
        subscripts = BOND_LETTERS[d + 1] + BOND_LETTERS[d] + letter
        shape = (g * r_out, r_in, dense.kernel_size[d])
        cores.append(Factor(f"kernel_core_{d}", shape, subscripts, stage, ring))
    return tuple(cores)


def tt_factors(dense: ConvSpec, ranks: Tuple[int, ...]) -> Tuple[Factor, ...]:
    """TT in the order ``(C_in, K_1, …, K_d, C_out)`` with bonds ``r_0, …, r_d``."""
    g, c, _ = _channels(dense)
    first, last = BOND_LETTERS[0], BOND_LETTERS[dense.ndim]
    return (
        Factor(
            "input_core",
            (g * ranks[0], c),
            first + "c",
            _stage(dense, dense.in_channels, g * ranks[0]),
        ),
        *_kernel_cores(dense, ranks, ring=0),
        Factor(
            "output_core",
            (dense.out_channels, ranks[-1]),
            "o" + last,
            _stage(dense, g * ranks[-1], dense.out_channels, bias=dense.bias),
        ),
    )


def tr_factors(dense: ConvSpec, ranks: Tuple[int, ...]) -> Tuple[Factor, ...]:
    """TR: TT's order with bonds ``r_0, …, r_d`` and the ring bond ``r_z`` last."""
    g, c, _ = _channels(dense)
    *bonds, ring = ranks
    first, last = BOND_LETTERS[0], BOND_LETTERS[dense.ndim]
    z = RING_LETTER
    in_stage = _stage(dense, dense.in_channels, g * bonds[0] * ring)
    out_stage = _stage(dense, g * bonds[-1] * ring, dense.out_channels, bias=dense.bias)
    return (
        Factor("input_core", (g * bonds[0], ring, c), first + z + "c", in_stage),
        *_kernel_cores(dense, bonds, ring=ring),
        Factor(
            "output_core",
            (dense.out_channels, bonds[-1], ring),
            "o" + last + z,
            out_stage,
        ),
    )


BUILDERS: Dict[str, Callable[[ConvSpec, Tuple[int, ...]], Tuple[Factor, ...]]] = {
    "cp": cp_factors,
    "tucker": tucker_factors,
    "tt": tt_factors,
    "tr": tr_factors,
}


def build_factors(
    factorization: str, dense: ConvSpec, ranks: Tuple[int, ...]
) -> Tuple[Factor, ...]:
    """The factors (and their stages) of a layer, in the order of its equation."""
    return BUILDERS[factorization](dense, ranks)


# ----------------------------------------------------------------------- ranks
def rank_count(factorization: str, ndim: int) -> int:
    """How many ranks a factorization takes."""
    return {"cp": 1, "tucker": 2, "tt": ndim + 1, "tr": ndim + 2}[factorization]


def factor_parameters(
    factorization: str, dense: ConvSpec, ranks: Tuple[int, ...]
) -> int:
    """Number of entries of all factors."""
    return sum(prod(f.shape) for f in build_factors(factorization, dense, ranks))


def resolve_ranks(
    factorization: str, rank: Rank, dense: ConvSpec, layer: str = "FactorizedConv"
) -> Tuple[int, ...]:
    """Turn an int, a tuple or a compression ratio into the factorization's ranks.

    A float ``ρ`` keeps at most ``ρ`` times the dense kernel's parameters: the
    largest uniform rank (CP, TT, TR) or the largest ranks proportional to the
    channels per group (Tucker-2) that fit, at least rank 1.

    Raises:
        ValueError: For an unknown factorization, a rank below 1, a tuple of
            the wrong length or a non-positive ratio.
    """
    if factorization not in FACTORIZATIONS:
        raise ValueError(
            f"{layer}: factorization must be one of {FACTORIZATIONS}, "
            f"got {factorization!r}"
        )
    count = rank_count(factorization, dense.ndim)
    if isinstance(rank, bool):
        raise ValueError(
            f"{layer}: rank must be an int, a tuple or a float, got {rank!r}"
        )
    if isinstance(rank, float):
        if not rank > 0:
            raise ValueError(
                f"{layer}: a compression ratio must be positive, got {rank}"
            )
        return _ranks_for_ratio(factorization, rank, dense, count)
    if isinstance(rank, int):
        ranks: Tuple[int, ...] = (rank,) * count
    else:
        try:
            ranks = tuple(int(r) for r in rank)
        except TypeError as error:
            raise ValueError(
                f"{layer}: rank must be an int, a tuple or a float, got {rank!r}"
            ) from error
    if len(ranks) != count:
        raise ValueError(
            f"{layer}: factorization {factorization!r} of a {dense.ndim}-d kernel "
            f"takes {count} rank(s) ({_rank_names(factorization, dense.ndim)}), "
            f"got {rank!r}"
        )
    if any(r < 1 for r in ranks):
        raise ValueError(f"{layer}: ranks must be at least 1, got {rank!r}")
    return ranks


def _rank_names(factorization: str, ndim: int) -> str:
    bonds = ", ".join(f"r_{i}" for i in range(ndim + 1))
    return {
        "cp": "R",
        "tucker": "R_in, R_out",
        "tt": bonds,
        "tr": bonds + ", r_ring",
    }[factorization]


def _ranks_for_ratio(
    factorization: str, ratio: float, dense: ConvSpec, count: int
) -> Tuple[int, ...]:
    budget = ratio * dense_parameters(dense)
    g = dense.groups
    c, o = dense.in_channels // g, dense.out_channels // g

    def candidate(step: int) -> Tuple[int, ...]:
        if factorization == "tucker":  # proportional to the channels per group
            scale = step / max(c, o)
            return (max(1, round(c * scale)), max(1, round(o * scale)))
        return (step,) * count

    best = candidate(1)
    step = 2
    while True:
        ranks = candidate(step)
        if factor_parameters(factorization, dense, ranks) > budget:
            return best
        best, step = ranks, step + 1
