"""Minimum cuts against brute force, and rank = min-cut on random unshared ConvACs."""

from __future__ import annotations

import itertools
import math
import random

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tnbackpack.analysis import ConvAC, coefficient_network, min_cut, separation_rank
from tnbackpack.analysis.mincut import split_at_cut
from tnbackpack.tn import TensorNetwork


def brute_force_cut(network: TensorNetwork, rows) -> int:
    """Try every side assignment of the operands; an axis costs its size when its
    holders (and its terminal, for open axes) are on both sides."""
    sizes = network.sizes()
    best = math.inf
    for sides in itertools.product((0, 1), repeat=len(network.operands)):
        cost = 1
        for name, size in sizes.items():
            members = {s for s, axes in zip(sides, network.axes) if name in axes}
            if name in network.output:
                members.add(0 if name in rows else 1)
            if len(members) == 2:
                cost *= size
        best = min(best, cost)
    return best


def random_geometry(rng: random.Random, num_patches: int):
    """Random windows (sizes 1-3) over a random order of the nodes, until one node."""
    levels, nodes = [], num_patches
    while nodes > 1:
        order = list(range(nodes))
        rng.shuffle(order)
        windows, k = [], 0
        while k < nodes:
            size = min(rng.randint(1, 3), nodes - k)
            windows.append(tuple(order[k : k + size]))
            k += size
        if len(windows) == nodes:  # make progress: merge the first two
            windows = [windows[0] + windows[1]] + windows[2:]
        levels.append(windows)
        nodes = len(windows)
    return levels


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), num_patches=st.integers(2, 5), m=st.integers(2, 3))
def test_mincut_equals_brute_force(seed, num_patches, m):
    rng = random.Random(seed)
    windows = random_geometry(rng, num_patches)
    assume(sum(len(level) for level in windows) + num_patches <= 12)  # 2^13 assignments
    widths = [rng.randint(1, 4) for _ in windows]
    g = torch.Generator().manual_seed(seed)
    model = ConvAC(num_patches, m, widths, windows, generator=g)
    network = coefficient_network(model)  # open legs of size m
    count = rng.randint(1, num_patches - 1)
    rows = [network.output[i] for i in sorted(rng.sample(range(num_patches), count))]
    cut = min_cut(network, rows)
    assert cut == brute_force_cut(network, rows)
    # the factorization through the cut reproduces the matricization
    u_net, v_net, names = split_at_cut(network, rows, cut)
    u = u_net.contract().reshape(-1, int(cut))
    v = v_net.contract().reshape(-1, int(cut))
    cols = [a for a in network.output if a not in rows]
    grid = network.contract()
    matrix = grid.permute([network.output.index(a) for a in rows + cols]).reshape(
        u.shape[0], v.shape[0]
    )
    torch.testing.assert_close(u @ v.T, matrix, rtol=1e-10, atol=1e-10)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), num_patches=st.integers(2, 7))
def test_rank_equals_mincut_on_random_unshared_convacs(seed, num_patches):
    """Levine et al. 2018: for unshared weights the generic rank is the min-cut."""
    rng = random.Random(seed)
    windows = random_geometry(rng, num_patches)
    widths = [rng.randint(1, 4) for _ in windows]
    model = ConvAC(
        num_patches, 2, widths, windows, generator=torch.Generator().manual_seed(seed)
    )
    rows = sorted(rng.sample(range(num_patches), rng.randint(1, num_patches - 1)))
    rank = separation_rank(model, torch.eye(2), rows)
    assert rank == rank.upper_bound


def test_cut_through_open_legs_gets_identities():
    """Odd/even, M = 2 templates of 3 features, width 3: the unique minimum cut is
    the template legs d0, d2 (2·2 = 4 < 3·3 for features or channels)."""
    g = torch.Generator().manual_seed(0)
    model = ConvAC(4, 3, [3, 3], [[(0, 1), (2, 3)], [(0, 1)]], generator=g)
    network = coefficient_network(
        model, torch.randn(2, 3, dtype=torch.float64, generator=g)
    )
    rows = ["d0", "d2"]
    cut = min_cut(network, rows)
    assert cut == 4 and set(cut.axes) in ({"d0", "d2"}, {"d1", "d3"})
    u_net, v_net, _ = split_at_cut(network, rows, cut)
    u = u_net.contract().reshape(4, 4)
    v = v_net.contract().reshape(4, 4)
    matrix = network.contract().permute(0, 2, 1, 3).reshape(4, 4)
    torch.testing.assert_close(u @ v.T, matrix, rtol=1e-12, atol=1e-12)
