"""Separation ranks: the rank of a matricized grid tensor, exactly or numerically.

``rank [A]_{I,J} ≤ sep_{I,J}(h)`` for any ``h``; for ConvACs with linearly
independent templates (``M ≥ F`` and full-rank templates, e.g. one-hot) the
two are equal. Two methods:

- ``"exact"`` (ConvACs): the matricization's rank over the rationals, by
  arithmetic modulo random primes on the ConvAC's network
  (:mod:`.modular`), factored through a minimum cut when the cut is smaller
  than the matrix (``[A] = U Vᵀ``, then only bases of ``U``'s and ``V``'s row
  spaces are multiplied).
- ``"svd"`` (any model): float64 singular values and a spectral-gap rule
  (:func:`gap_rank`): a *numerical* rank.

A sub-grid (``fixed`` patches) or sampled rows and columns (``samples``) is a
submatrix of the matricization, so its rank is a guaranteed lower bound.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .coefficient import convac_network, feature_axis, template_axis
from .convac import ConvAC
from .grid import (
    MAX_ENTRIES,
    Assemble,
    check_entries,
    check_positions,
    evaluate,
    template_tuples,
)
from .mincut import Cut, min_cut, split_at_cut
from .modular import (
    contract_modular,
    independent_rows,
    matmul_mod,
    random_primes,
    rank_mod_p,
)
from .planning import contract
from .pointwise import forward_modular

#: Singular values are only computed for matrices with at most this many entries.
SVD_ENTRIES = 2**22


class SeparationRank(int):
    """A rank (an int) with how it was obtained.

    Attributes:
        method: ``"exact"`` (rational rank; ``primes`` says modulo what) or
            ``"svd"`` (numerical rank by the spectral-gap rule).
        bound: ``"exact"`` if this is the rank of the full matricization,
            ``"lower"`` if it is the rank of a submatrix (sub-grid or sampled),
            which bounds the full rank from below.
        shape: Shape of the matrix whose rank this is.
        singular_values: Its float64 singular values (``None`` if too large).
        upper_bound: Minimum cut of the ConvAC's grid network (``None`` for
            other models): ``rank ≤ upper_bound``.
        gap: For ``"svd"``, the ratio of consecutive singular values at the
            chosen rank (``inf`` when the rest is zero).
        primes: For ``"exact"``, the primes used.
        certain: For ``"exact"``, whether the rank reached a minimum cut (an
            upper bound), which makes it certain; otherwise it is the rational
            rank with the probability stated in :mod:`.modular`.
    """

    def __new__(cls, value: int, **info):
        """Attach ``info`` (the attributes above) to the rank."""
        rank = super().__new__(cls, value)
        rank.method = info["method"]
        rank.bound = info["bound"]
        rank.shape = info["shape"]
        rank.singular_values = info.get("singular_values")
        rank.upper_bound = info.get("upper_bound")
        rank.gap = info.get("gap")
        rank.primes = info.get("primes")
        rank.certain = info.get("certain")
        return rank

    def __str__(self) -> str:
        """The number alone (``print(rank)`` prints ``16``)."""
        return str(int(self))

    def __repr__(self) -> str:
        return (
            f"SeparationRank({int(self)}, method={self.method!r}, "
            f"bound={self.bound!r}, shape={self.shape}, upper_bound={self.upper_bound})"
        )


def gap_rank(
    singular_values: Tensor, shape: Tuple[int, int], gap: float
) -> Tuple[int, float]:
    """Numerical rank by the largest spectral gap.

    Singular values below the floor ``max(shape)·eps·σ₁`` (NumPy's default
    tolerance) are raised to the floor, the floor is appended, and the rank
    is the ``k`` maximizing ``σ_k / σ_{k+1}``. If that largest ratio is below
    ``gap`` there is no clear gap and the rank is the number of values above
    the floor. Values that truly are nonzero but below the floor (they occur
    in deep ConvACs) are invisible to any float method: use ``"exact"``.

    Returns:
        The rank and the ratio at it.
    """
    s = singular_values.to(torch.float64)
    if s.numel() == 0 or s[0] == 0:
        return 0, math.inf
    floor = max(shape) * torch.finfo(torch.float64).eps * s[0]
    clamped = torch.cat([s.clamp_min(floor), floor.reshape(1)])
    ratios = clamped[:-1] / clamped[1:]
    best = int(torch.argmax(ratios))
    if ratios[best] < gap:
        above = int((s > floor).sum())
        return above, float(ratios[above - 1]) if above else math.inf
    return best + 1, float(ratios[best])


def _configurations(
    num_templates: int, count: int, samples: Optional[int], generator
) -> Tensor:
    """Template tuples of ``count`` positions: all ``M^count``, or a random subset."""
    total = num_templates**count
    if samples is None or samples >= total:
        chosen = torch.arange(total)
    elif total <= 2**24:
        chosen = torch.randperm(total, generator=generator)[:samples].sort().values
    else:
        chosen = torch.randint(total, (samples,), generator=generator).unique()
    return template_tuples(chosen, num_templates, count)


def _side(
    positions: Sequence[int], configs: Tensor, templates: Tensor, full: bool, name: str
) -> Tuple[Dict[int, tuple], List[str]]:
    """Leaves of one side of the matrix and its open axes.

    All configurations keep one template axis per position (better cuts);
    sampled ones share a single axis ``name`` among the side's positions.
    """
    if full:
        leaves = {
            i: (templates, (template_axis(i), feature_axis(i))) for i in positions
        }
        return leaves, [template_axis(i) for i in positions]
    leaves = {
        i: (templates[configs[:, k]], (name, feature_axis(i)))
        for k, i in enumerate(positions)
    }
    return leaves, [name]


def _submatrix_network(
    model: ConvAC,
    templates: Tensor,
    fixed: Dict[int, int],
    row_side: Tuple[List[int], Tensor],
    col_side: Tuple[List[int], Tensor],
):
    """The ConvAC's network whose contraction is the (sub)matrix to rank.

    Fixed patches get one template vector; each side gets all its template
    tuples (one axis per position) or the sampled ones (one shared axis).

    Returns:
        The network and its row axes.
    """
    templates = templates.to(torch.float64)
    num = templates.shape[0]
    leaves = {i: (templates[t], (feature_axis(i),)) for i, t in fixed.items()}
    axes = []
    for (positions, configs), name in ((row_side, "rows"), (col_side, "cols")):
        full = configs.shape[0] == num ** len(positions)
        side_leaves, side_axes = _side(positions, configs, templates, full, name)
        leaves.update(side_leaves)
        axes.append(side_axes)
    order = [leaves[i] for i in range(model.num_patches)]
    return convac_network(model, order, axes[0] + axes[1]), axes[0]


def _exact_rank(
    network, rows: List[str], primes: Sequence[int], max_entries: int
) -> Tuple[int, List[int], bool]:
    """Max over primes of the rank of the matricized network modulo the prime.

    Stops early when a prime reaches the minimum cut: then the rank is certain.

    Returns:
        The rank, the primes used, and whether it is certain (it reached the cut).
    """
    sizes = network.sizes()
    num_rows = math.prod(sizes[a] for a in rows)
    num_cols = math.prod(sizes[a] for a in network.output if a not in rows)
    cut = min_cut(network, rows)
    ranks = []
    for p in primes:
        if cut < min(num_rows, num_cols):
            u_net, v_net, _ = split_at_cut(network, rows, cut)
            check_entries(
                max(num_rows, num_cols) * int(cut), max_entries, "a factor at the cut"
            )
            u = contract_modular(u_net, p, max_entries).reshape(num_rows, int(cut))
            v = contract_modular(v_net, p, max_entries).reshape(num_cols, int(cut))
            core = matmul_mod(u[independent_rows(u, p)], v[independent_rows(v, p)].T, p)
            ranks.append(rank_mod_p(core, p))
        else:
            check_entries(num_rows * num_cols, max_entries, "the matricization")
            ranks.append(
                rank_mod_p(
                    contract_modular(network, p, max_entries).reshape(
                        num_rows, num_cols
                    ),
                    p,
                )
            )
        if ranks[-1] == min(int(cut), num_rows, num_cols):
            # rank_p ≤ rank ≤ cut: certain, more primes cannot add
            return ranks[-1], list(primes[: len(ranks)]), True
    return max(ranks), list(primes), False


def separation_rank(
    model: nn.Module,
    templates: Tensor,
    partition: Sequence[int],
    num_patches: Optional[int] = None,
    *,
    method: str = "auto",
    fixed: Optional[Dict[int, int]] = None,
    samples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    primes: int = 3,
    seed: int = 0,
    gap: float = 1e3,
    assemble: Optional[Assemble] = None,
    batch_size: int = 4096,
    max_entries: int = MAX_ENTRIES,
    singular_values: bool = True,
) -> SeparationRank:
    """Rank of the grid tensor matricized by the partition ``(I, J)``.

    Args:
        model: A ConvAC (:func:`deep_convac`, :func:`shallow_convac`) or any
            module mapping assembled patches to one number per sample.
        templates: ``[M, *template_shape]`` (``[M, in_features]`` for ConvACs).
        partition: The positions ``I`` (rows); the others form ``J``.
        num_patches: ``N`` (read from the model for ConvACs).
        method: ``"exact"`` (ConvACs only), ``"svd"``, or ``"auto"``: exact
            for ConvACs, svd otherwise.
        fixed: Sub-grid: ``{position: template index}`` for patches held fixed
            (removed from both sides). The result is a lower bound.
        samples: Sample this many row and column configurations uniformly
            without replacement (per side; all if there are fewer). The
            result is a lower bound. For ConvACs the sampled entries are
            computed by the forward pass modulo each prime.
        generator: Random generator for the samples.
        primes: Number of random primes for ``"exact"``.
        seed: Seed of the primes.
        gap: Smallest ratio that counts as a spectral gap for ``"svd"``.
        assemble: Turns ``(B, N, *template_shape)`` into the model's input
            (other models only).
        batch_size: Forward passes per batch (other models).
        max_entries: Cap on the entries of any matrix, grid or contraction
            intermediate built.
        singular_values: Whether to attach float64 singular values (for
            matrices with at most ``2^22`` entries).

    Raises:
        ValueError: On bad partitions or fixed patches, or above ``max_entries``.
        TypeError: For ``method="exact"`` with a model that is no ConvAC.
    """
    convac = isinstance(model, ConvAC)
    if num_patches is None:
        if not convac:
            raise ValueError("num_patches is needed for models other than ConvACs")
        num_patches = model.num_patches
    if convac and num_patches != model.num_patches:
        raise ValueError(
            f"num_patches={num_patches}, but the ConvAC has {model.num_patches}"
        )
    if method == "auto":
        method = "exact" if convac else "svd"
    if method not in ("exact", "svd"):
        raise ValueError(f"method must be 'auto', 'exact' or 'svd', got {method!r}")
    if method == "exact" and not convac:
        raise TypeError(
            f"method='exact' needs a ConvAC's network; {type(model).__name__} is none "
            "(use method='svd')"
        )
    rows = check_positions(partition, num_patches)
    if not rows or len(rows) == num_patches:
        raise ValueError(f"partition {rows} must leave both sides nonempty")
    num_templates = templates.shape[0]
    fixed = {int(i): int(t) for i, t in (fixed or {}).items()}
    for i, t in fixed.items():
        if not (0 <= i < num_patches and 0 <= t < num_templates):
            raise ValueError(f"fixed patch {i}: template {t} is out of range")
    free_rows = [i for i in rows if i not in fixed]
    free_cols = [i for i in range(num_patches) if i not in rows and i not in fixed]
    if samples is not None and samples < 1:
        raise ValueError(f"samples must be ≥ 1, got {samples}")
    row_configs = _configurations(num_templates, len(free_rows), samples, generator)
    col_configs = _configurations(num_templates, len(free_cols), samples, generator)
    full_rows = row_configs.shape[0] == num_templates ** len(free_rows)
    full_cols = col_configs.shape[0] == num_templates ** len(free_cols)
    bound = "exact" if not fixed and full_rows and full_cols else "lower"
    shape = (row_configs.shape[0], col_configs.shape[0])

    sampled = not (full_rows and full_cols)
    upper = network = row_axes = None
    if convac:
        upper = int(mincut_bound(model, rows, num_templates))
        if not sampled:  # the network factors through its cuts
            network, row_axes = _submatrix_network(
                model,
                templates,
                fixed,
                (free_rows, row_configs),
                (free_cols, col_configs),
            )

    def indices() -> Tensor:
        """Template indices ``(R·C, N)`` of the matrix entries, row-major."""
        check_entries(
            shape[0] * shape[1], max_entries, f"the {shape[0]}×{shape[1]} matrix"
        )
        index = torch.empty(shape[0], shape[1], num_patches, dtype=torch.long)
        for i, t in fixed.items():
            index[:, :, i] = t
        index[:, :, free_rows] = row_configs[:, None, :]
        index[:, :, free_cols] = col_configs[None, :, :]
        return index.reshape(-1, num_patches)

    def matrix() -> Tensor:
        if network is not None:
            check_entries(
                shape[0] * shape[1], max_entries, f"the {shape[0]}×{shape[1]} matrix"
            )
            return contract(network, max_entries).reshape(shape)
        values = evaluate(model, templates, indices(), assemble, batch_size)
        return values.reshape(shape)

    info = dict(bound=bound, shape=shape, upper_bound=upper)
    if method == "exact":
        chosen = random_primes(primes, seed)
        if network is not None:
            value, used, certain = _exact_rank(network, row_axes, chosen, max_entries)
        else:
            points = templates[indices()]
            value, used, certain = _exact_pointwise_rank(
                model, points, shape, chosen, min(upper, *shape), batch_size
            )
        svals = None
        if singular_values and shape[0] * shape[1] <= min(SVD_ENTRIES, max_entries):
            svals = torch.linalg.svdvals(matrix())
        return SeparationRank(
            value,
            method="exact",
            primes=used,
            certain=certain,
            singular_values=svals,
            **info,
        )
    svals = torch.linalg.svdvals(matrix())
    value, ratio = gap_rank(svals, shape, gap)
    return SeparationRank(value, method="svd", singular_values=svals, gap=ratio, **info)


def _exact_pointwise_rank(
    model: ConvAC,
    points: Tensor,
    shape: Tuple[int, int],
    primes: Sequence[int],
    ceiling: int,
    batch_size: int,
) -> Tuple[int, List[int], bool]:
    """Rank of sampled entries, evaluated by the exact forward pass modulo primes.

    Stops early when a prime reaches ``ceiling`` (an upper bound on the rank).
    """
    ranks = []
    for p in primes:
        values = torch.cat(
            [forward_modular(model, batch, p) for batch in points.split(batch_size)]
        )
        ranks.append(rank_mod_p(values.reshape(shape), p))
        if ranks[-1] == ceiling:
            return ranks[-1], list(primes[: len(ranks)]), True
    return max(ranks), list(primes), False


def mincut_bound(
    model: ConvAC,
    partition: Sequence[int],
    num_templates: Optional[int] = None,
) -> Cut:
    """Minimum cut of a ConvAC's network for the partition ``(I, J)``.

    An upper bound on the rank of the matricized coefficient tensor (or, with
    ``num_templates``, of the grid tensor over that many templates). For
    unshared weights it is the generic rank (Levine et al. 2018); shared
    weights can have lower rank.
    """
    rows = check_positions(partition, model.num_patches)
    n = model.num_patches
    if num_templates is None:
        network = convac_network(model, [None] * n, [feature_axis(i) for i in range(n)])
        return min_cut(network, [feature_axis(i) for i in rows])
    templates = torch.zeros(num_templates, model.in_features)  # only sizes matter
    leaves = [(templates, (template_axis(i), feature_axis(i))) for i in range(n)]
    network = convac_network(model, leaves, [template_axis(i) for i in range(n)])
    return min_cut(network, [template_axis(i) for i in rows])
