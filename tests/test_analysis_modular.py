"""Exact arithmetic modulo primes against Python's Fractions (exact rationals)."""

from __future__ import annotations

import itertools
from fractions import Fraction

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tnbackpack.analysis import coefficient_network, deep_convac, mirror_windows
from tnbackpack.analysis.modular import (
    contract_modular,
    independent_rows,
    is_prime,
    random_primes,
    rank_mod_p,
    to_modular,
)
from tnbackpack.analysis.pointwise import forward_modular

PRIMES = random_primes(2, seed=7)


def residue(value: Fraction, p: int) -> int:
    return value.numerator * pow(value.denominator, -1, p) % p


def rational_rank(rows) -> int:
    """Rank over Q by Gaussian elimination with Fractions."""
    a = [[Fraction(v) for v in row] for row in rows]
    rank, cols = 0, len(a[0]) if a else 0
    for col in range(cols):
        pivot = next((r for r in range(rank, len(a)) if a[r][col] != 0), None)
        if pivot is None:
            continue
        a[rank], a[pivot] = a[pivot], a[rank]
        for r in range(rank + 1, len(a)):
            factor = a[r][col] / a[rank][col]
            a[r] = [x - factor * y for x, y in zip(a[r], a[rank])]
        rank += 1
    return rank


def test_primes_are_primes_in_range():
    assert all(is_prime(p) and 2**27 <= p < 2**28 for p in random_primes(5))
    assert [is_prime(n) for n in (1, 2, 91, 97, 2**31 - 1, 2**32 + 1)] == [
        False,
        True,
        False,
        True,
        True,
        False,
    ]


def test_floats_map_exactly():
    g = torch.Generator().manual_seed(0)
    values = torch.cat(
        [
            torch.randn(50, generator=g, dtype=torch.float64) * 1e3,
            torch.randn(50, generator=g).to(torch.float64) * 1e-30,
            torch.tensor(
                [0.0, -0.0, 1.0, -2.5, 2.0**-1074, 1e300], dtype=torch.float64
            ),
        ]
    )
    for p in PRIMES:
        got = to_modular(values, p)
        expected = [residue(Fraction(float(v)), p) for v in values]
        assert got.tolist() == expected


def exact_convac(model, point):
    """h at one-hot patches ``point`` with Fractions (explicit loops)."""
    nodes = [[Fraction(int(j == d)) for j in range(model.in_features)] for d in point]
    for level, windows in enumerate(model.windows):
        mapped = []
        for k, v in enumerate(nodes):
            w = model.node_weight(level, k).detach().double().tolist()
            mapped.append([sum(Fraction(a) * b for a, b in zip(row, v)) for row in w])
        nodes = []
        for window in windows:
            prod = [Fraction(1)] * len(mapped[window[0]])
            for k in window:
                prod = [x * y for x, y in zip(prod, mapped[k])]
            nodes.append(prod)
    return sum(
        Fraction(a) * b
        for a, b in zip(model.output.detach().double().tolist(), nodes[0])
    )


def test_contraction_modulo_p_equals_exact_rationals():
    g = torch.Generator().manual_seed(1)
    model = deep_convac(8, 2, [2, 3, 2], mirror_windows(8), generator=g)
    network = coefficient_network(model)
    for p in PRIMES:
        got = contract_modular(network, p)
        for point in itertools.islice(itertools.product(range(2), repeat=8), 0, 256, 7):
            assert int(got[point]) == residue(exact_convac(model, point), p)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 12),
    inner=st.integers(1, 6),
    seed=st.integers(0, 2**31),
    zero_rows=st.integers(0, 3),
)
def test_rank_mod_p_equals_rational_rank(rows, cols, inner, seed, zero_rows):
    """Low-rank integer matrices (products of small factors), with zeroed rows."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-3, 4, (rows, inner), generator=g) @ torch.randint(
        -3, 4, (inner, cols), generator=g
    )
    a[:zero_rows] = 0
    expected = rational_rank(a.tolist())
    for p in PRIMES:
        residues = a.remainder(p)
        assert rank_mod_p(residues, p) == expected
        basis = independent_rows(residues, p)
        assert len(basis) == expected
        assert rational_rank(a[basis].tolist()) == expected  # the rows are independent


def test_blocked_elimination_on_panels():
    """Wider than one panel, rank deficient, dyadic entries: rank over Q by hand."""
    g = torch.Generator().manual_seed(2)
    left = torch.randint(-50, 50, (230, 37), generator=g).double() / 8
    right = torch.randint(-50, 50, (37, 250), generator=g).double() / 4
    a = left @ right  # exact in float64: |entries| < 2^53 / 32
    a[:, 100:140] = a[:, 10:50]  # repeated columns across panels
    for p in PRIMES:
        assert rank_mod_p(to_modular(a, p), p) == 37
        assert rank_mod_p(to_modular(a.T, p), p) == 37


def test_forward_modulo_p_equals_exact_rationals():
    """The pointwise route (sampled rows and columns) against Fractions."""
    g = torch.Generator().manual_seed(3)
    for shared in (False, True):
        model = deep_convac(8, 2, [3, 2, 2], shared=shared, generator=g)
        points = list(
            itertools.islice(itertools.product(range(2), repeat=8), 0, 256, 11)
        )
        patches = torch.eye(2, dtype=torch.float64)[torch.tensor(points)]
        for p in PRIMES:
            got = forward_modular(model, patches, p).tolist()
            assert got == [residue(exact_convac(model, d), p) for d in points]
