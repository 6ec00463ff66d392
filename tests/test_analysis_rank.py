"""Separation ranks and min-cuts against values derived by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tnbackpack.analysis import (
    block_windows,
    checkerboard,
    deep_convac,
    gap_rank,
    grid_left_right,
    grid_tensor,
    left_right,
    matricize,
    mincut_bound,
    mirror_windows,
    odd_even,
    outer_inner,
    partitions_1d,
    separation_rank,
    shallow_convac,
)

DTYPE = torch.float64


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


# DESIGN §9: exact generic ranks, contiguous size-2 pooling, unshared.
DESIGN_TABLE = [
    (8, 2, [2, 2, 2], (2, 16, 4)),
    (8, 3, [3, 3, 3], (3, 81, 9)),
    (8, 2, [2, 3, 4], (3, 16, 4)),
    (16, 2, [2, 2, 2, 2], (2, 256, 4)),
]


@pytest.mark.parametrize("n, m, widths, expected", DESIGN_TABLE)
def test_design_table(n, m, widths, expected):
    model = deep_convac(n, m, widths, generator=generator())
    for rows, value in zip((left_right(n), odd_even(n), outer_inner(n)), expected):
        rank = separation_rank(model, torch.eye(m), rows)
        assert rank == value and rank.method == "exact" and rank.bound == "exact"
        assert rank.upper_bound == value and rank.certain


def closed_form(geometry, partition, r, m):
    """Min-cuts of unshared ConvACs with uniform width r, N = 8 (or 4×4), by hand.

    contiguous: L/R is cut above the left half (r); odd/even at the 4 split
    pairs, each min(r, M) (the leaf or the pooled channel); outer/inner above
    the pairs {0,1} and {6,7}, each min(r, M²). mirror: every first window
    (k, 7-k) is split by L/R and odd/even -> min(r, M)^4; outer/inner = nodes
    {0,1} vs {2,3} of level 1 -> r. 2-d blocks: left/right and top/bottom cut
    the top node (r); a checkerboard splits every 2×2 block 2/2 -> min(r, M²)^4.
    """
    table = {
        "contiguous": {
            "left/right": r,
            "odd/even": min(r, m) ** 4,
            "outer/inner": min(r, m * m) ** 2,
        },
        "mirror": {
            "left/right": min(r, m) ** 4,
            "odd/even": min(r, m) ** 4,
            "outer/inner": r,
        },
        "blocks": {
            "left/right": r,
            "top/bottom": r,
            "checkerboard": min(r, m * m) ** 4,
        },
    }
    return table[geometry][partition]


PARTITIONS = {
    "contiguous": partitions_1d(8),
    "mirror": partitions_1d(8),
    "blocks": {
        "left/right": grid_left_right(4, 4),
        "top/bottom": tuple(range(8)),
        "checkerboard": checkerboard(4, 4),
    },
}


def build(geometry, r, m, shared=False, seed=0):
    windows = {
        "contiguous": None,
        "mirror": mirror_windows(8),
        "blocks": block_windows(4, 4),
    }[geometry]
    n = 16 if geometry == "blocks" else 8
    levels = 2 if geometry == "blocks" else 3
    return deep_convac(n, m, [r] * levels, windows, shared, generator(seed))


SWEEP = [
    (g, r, m) for g in ("contiguous", "mirror") for r in (1, 2, 3, 4) for m in (2, 3)
]
SWEEP += [("blocks", r, 2) for r in (1, 3, 4)]
FAST = [("contiguous", 2, 2), ("contiguous", 4, 3), ("mirror", 3, 2), ("blocks", 3, 2)]


def check_mincut_equals_rank(geometry, r, m):
    model = build(geometry, r, m)
    for name, rows in PARTITIONS[geometry].items():
        expected = closed_form(geometry, name, r, m)
        assert mincut_bound(model, rows, num_templates=m) == expected, name
        if geometry == "blocks" and m == 3 and expected > 100:
            continue
        assert separation_rank(model, torch.eye(m), rows) == expected, name


@pytest.mark.parametrize("geometry, r, m", FAST)
def test_mincut_equals_rank_unshared(geometry, r, m):
    check_mincut_equals_rank(geometry, r, m)


@pytest.mark.slow
@pytest.mark.parametrize("geometry, r, m", SWEEP)
def test_mincut_equals_rank_unshared_sweep(geometry, r, m):
    check_mincut_equals_rank(geometry, r, m)


@pytest.mark.parametrize("n, m, r", [(8, 2, 1), (8, 2, 3), (8, 3, 4), (6, 2, 4)])
def test_shallow_rank_is_width_on_every_partition(n, m, r):
    model = shallow_convac(n, m, r, generator=generator(1))
    for rows in [(0,), (0, 2, 4), (1, 2), tuple(range(n // 2))]:
        expected = min(r, m ** len(rows), m ** (n - len(rows)))
        assert separation_rank(model, torch.eye(m), rows) == expected
        assert mincut_bound(model, rows, num_templates=m) == expected


def test_shared_weights_can_fall_below_the_mincut():
    """Shared 1×1 convs make each outer pair's functions symmetric in its two
    patches: (Wx)_c (Wy)_c = (Wy)_c (Wx)_c. Symmetric functions of two patches
    over M = 2 templates span M(M+1)/2 = 3 dimensions, so outer/inner (cut above
    {0,1} and {6,7}) has rank ≤ 3·3 = 9 while the min-cut is 4·4 = 16."""
    shared = build("contiguous", 4, 2, shared=True)
    unshared = build("contiguous", 4, 2, shared=False)
    assert mincut_bound(shared, outer_inner(8), num_templates=2) == 16
    assert separation_rank(shared, torch.eye(2), outer_inner(8)) == 9
    assert separation_rank(unshared, torch.eye(2), outer_inner(8)) == 16


def test_exact_where_float_svd_fails():
    """N = 16, odd/even: the smallest singular value is 3e-14 of the largest, so
    float SVD with NumPy's tolerance counts 255; the rank is 256 (= the min-cut)."""
    model = deep_convac(16, 2, [2, 2, 2, 2], generator=generator(3))
    rank = separation_rank(model, torch.eye(2), odd_even(16))
    assert rank == 256 and rank.certain
    s = rank.singular_values
    assert int((s > 256 * torch.finfo(DTYPE).eps * s[0]).sum()) == 255
    numerical = separation_rank(model, torch.eye(2), odd_even(16), method="svd")
    assert numerical.method == "svd" and numerical < 256


class PerPatch(nn.Module):
    """h = Π_i g(x_i) or Σ_i g(x_i) for a nonlinear per-patch g."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.w = nn.Parameter(torch.tensor([0.7, -1.3, 0.4]))

    def forward(self, patches):
        g = 1.5 + torch.tanh(patches @ self.w) * patches.sum(-1).cos()
        return g.prod(1) if self.mode == "product" else g.sum(1)


@pytest.mark.parametrize("mode, expected", [("product", 1), ("sum", 2)])
def test_product_and_sum_of_per_patch_functions(mode, expected):
    """A product is one separable term (rank 1); a sum Σ_I g + Σ_J g = u(I)·1 + 1·v(J)
    has rank 2 on every partition (u, v non-constant)."""
    templates = torch.randn(3, 3, generator=generator(4), dtype=DTYPE)
    model = PerPatch(mode)
    for rows in [(0,), (0, 2), (1, 2, 5), (0, 1, 2)]:
        rank = separation_rank(model, templates, rows, num_patches=6)
        assert rank == expected and rank.method == "svd" and rank.gap > 1e10


def test_subgrid_and_samples_are_lower_bounds():
    model = deep_convac(8, 2, [2, 2, 2], generator=generator(5))
    full = separation_rank(model, torch.eye(2), odd_even(8))
    assert full == 16
    # fixing the split pair (6, 7) leaves three split pairs: 2^3, as for the min-cut
    sub = separation_rank(model, torch.eye(2), odd_even(8), fixed={6: 0, 7: 1})
    assert sub == 8 and sub.bound == "lower" and sub.shape == (8, 8)
    sampled = separation_rank(
        model, torch.eye(2), odd_even(8), samples=5, generator=generator(6)
    )
    assert sampled.bound == "lower" and sampled.shape == (5, 5) and sampled == 5
    everything = separation_rank(model, torch.eye(2), odd_even(8), samples=100)
    assert everything.bound == "exact" and everything == 16
    # the same sub-grid by forward passes and SVD, from the grid tensor itself
    grid = grid_tensor(model, torch.eye(2), 8)[..., 0, 1]
    expected = torch.linalg.matrix_rank(matricize(grid, (0, 2, 4))).item()
    assert (
        separation_rank(
            model, torch.eye(2), odd_even(8), fixed={6: 0, 7: 1}, method="svd"
        )
        == expected
        == 8
    )


def test_redundant_templates_do_not_raise_the_rank():
    """M = 4 templates of 2 features: the grid rank stays the coefficient rank."""
    model = deep_convac(8, 2, [2, 2, 2], generator=generator(7))
    templates = torch.randn(4, 2, generator=generator(8), dtype=DTYPE)
    assert separation_rank(model, templates, odd_even(8)) == 16
    assert mincut_bound(model, odd_even(8), num_templates=4) == 16
    assert mincut_bound(model, odd_even(8)) == 16


def test_gap_rule():
    shape = (10, 10)
    assert gap_rank(torch.tensor([3.0, 2.0, 1.0, 1e-9, 1e-10]), shape, 1e3)[0] == 3
    assert gap_rank(torch.tensor([3.0, 2.0, 1.0, 0.5, 0.3]), shape, 1e3)[0] == 5
    assert gap_rank(torch.tensor([1.0, 1e-20, 1e-21]), shape, 1e3)[0] == 1
    assert gap_rank(torch.zeros(3), shape, 1e3)[0] == 0


def test_errors():
    model = deep_convac(4, 2, [2, 2])
    with pytest.raises(ValueError, match="both sides nonempty"):
        separation_rank(model, torch.eye(2), (0, 1, 2, 3))
    with pytest.raises(ValueError, match="distinct positions"):
        separation_rank(model, torch.eye(2), (0, 0))
    with pytest.raises(ValueError, match="out of range"):
        separation_rank(model, torch.eye(2), (0,), fixed={1: 5})
    with pytest.raises(TypeError, match="method='exact' needs a ConvAC"):
        separation_rank(
            nn.Linear(2, 1), torch.eye(2), (0,), num_patches=2, method="exact"
        )
    with pytest.raises(ValueError, match="num_patches is needed"):
        separation_rank(nn.Linear(2, 1), torch.eye(2), (0,))
    with pytest.raises(ValueError, match="max_entries=10"):
        separation_rank(model, torch.eye(2), (0, 2), max_entries=10)
    with pytest.raises(ValueError, match="method must be"):
        separation_rank(model, torch.eye(2), (0,), method="qr")


def test_shared_2d_checkerboard_is_three_per_pair():
    """2×2 blocks, shared weights, M = 2, width 4: a checkerboard splits each block
    into two diagonal pairs, whose functions (Wx)_c (Wy)_c are symmetric: 3
    dimensions per pair, so rank 3^4 = 81, where the min-cut is min(4, M²)^4 = 256."""
    shared = build("blocks", 4, 2, shared=True)
    assert mincut_bound(shared, checkerboard(4, 4), num_templates=2) == 256
    assert separation_rank(shared, torch.eye(2), checkerboard(4, 4)) == 81
    assert (
        separation_rank(build("blocks", 4, 2), torch.eye(2), checkerboard(4, 4)) == 256
    )


class SignalCNN(nn.Module):
    """A Conv1d over a signal of 4 patches of length 2 (kernel 2, stride 2)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 3, kernel_size=2, stride=2)
        self.head = nn.Linear(3 * 4, 1)

    def forward(self, signal):
        return self.head(torch.tanh(self.conv(signal)).flatten(1)).squeeze(1)


def test_assemble_and_samples_for_other_models():
    torch.manual_seed(0)
    model = SignalCNN()
    templates = torch.randn(3, 2, generator=generator(9), dtype=DTYPE)

    def assemble(patches):  # (B, N, 2) -> (B, 1, 2N)
        return patches.reshape(patches.shape[0], 1, -1)

    grid = grid_tensor(model, templates, 4, assemble=assemble, batch_size=7)
    d = (2, 0, 1, 1)
    signal = templates[list(d)].reshape(1, 1, 8)
    with torch.no_grad():
        expected = model.double()(signal)[0]
    torch.testing.assert_close(grid[d], expected, rtol=1e-12, atol=1e-12)
    model.float()
    full = separation_rank(model, templates, (0, 1), 4, assemble=assemble)
    assert full == torch.linalg.matrix_rank(matricize(grid, (0, 1))).item()
    sampled = separation_rank(
        model, templates, (0, 1), 4, assemble=assemble, samples=4, generator=generator()
    )
    assert sampled.bound == "lower" and sampled.shape == (4, 4) and sampled <= full


def test_sampled_exact_matches_sampled_svd_and_large_n():
    """Same samples (same generator seed) by the exact pointwise route and by
    float SVD on a well-conditioned case; then N = 32, where the grid has 2^32
    entries: 64 sampled rows and columns of odd/even reach full rank 64."""
    model = deep_convac(8, 2, [2, 2, 2], generator=generator(10))
    exact = separation_rank(
        model, torch.eye(2), odd_even(8), samples=6, generator=generator(1)
    )
    numerical = separation_rank(
        model,
        torch.eye(2),
        odd_even(8),
        samples=6,
        generator=generator(1),
        method="svd",
    )
    assert exact.shape == numerical.shape == (6, 6) and exact == numerical
    big = deep_convac(32, 2, [2] * 5, generator=generator(11))
    sampled = separation_rank(
        big, torch.eye(2), odd_even(32), samples=64, generator=generator()
    )
    assert sampled == 64 and sampled.bound == "lower" and sampled.certain
    assert sampled.upper_bound == 2**16
