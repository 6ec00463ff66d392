"""Exact ranks by arithmetic modulo primes.

Floats are dyadic rationals: ``x = m·2^e`` with an integer ``m``, exactly. So
a network whose operands are floats has rational entries, and its rank over
the rationals can be computed exactly. Working modulo a prime ``p``, ``x`` maps
to ``m·2^e mod p`` (with ``2^e`` the modular inverse of ``2^{-e}`` for
``e < 0``); contraction (sums of products) commutes with that map, and Gaussian
elimination modulo ``p`` gives ``rank_p``.

Why it is exact: clearing the power-of-two denominators (units modulo an odd
``p``) makes the matrix an integer matrix ``Z`` of rational rank ``r``. Every
minor of size ``> r`` is zero, so ``rank_p ≤ r``; and ``rank_p = r`` unless
``p`` divides *every* nonzero ``r×r`` minor of ``Z``. A nonzero minor ``D``
has at most ``log₂|D| / 27`` prime factors ``≥ 2^27``, so for a prime drawn
uniformly from the ≈ 6.6·10⁶ primes in ``[2^27, 2^28)`` the chance of a drop is at
most ``log₂|D| / (27 · 6.6·10⁶)``, and for several independent primes (the rank
is their maximum) the product of such chances.
"""

from __future__ import annotations

import random
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ..tn.network import TensorNetwork
from .planning import tree_path

#: Primes are drawn from ``[2^27, 2^28)``: products of two residues stay below
#: ``2^56``, so int64 sums of up to 127 of them cannot overflow.
PRIME_BITS = 28

_WITNESSES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin (exact for ``n < 3.3·10^24``)."""
    if n < 2:
        return False
    for q in _WITNESSES:
        if n % q == 0:
            return n == q
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _WITNESSES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def random_primes(count: int, seed: int = 0) -> List[int]:
    """``count`` distinct primes drawn uniformly from ``[2^27, 2^28)``."""
    rng = random.Random(seed)
    primes: List[int] = []
    while len(primes) < count:
        candidate = rng.randrange(2 ** (PRIME_BITS - 1), 2**PRIME_BITS) | 1
        if is_prime(candidate) and candidate not in primes:
            primes.append(candidate)
    return primes


def to_modular(tensor: Tensor, p: int) -> Tensor:
    """Map a float tensor to GF(p) exactly (int64 residues in ``[0, p)``).

    Raises:
        ValueError: On non-finite entries (they are no rationals).
    """
    x = tensor.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError("exact ranks need finite weights and templates")
    fraction, exponent = torch.frexp(x)
    # fraction·2^53 is an integer below 2^53 in magnitude: x = mantissa·2^(e-53).
    mantissa = (fraction * 2.0**53).to(torch.int64).remainder(p)
    exponent = exponent.to(torch.int64) - 53
    unique, inverse = torch.unique(exponent, return_inverse=True)
    powers = torch.tensor([pow(2, int(e), p) for e in unique], dtype=torch.int64)
    return (mantissa * powers[inverse]).remainder(p)


def _chunk(p: int) -> int:
    """How many products of residues an int64 accumulator can sum safely."""
    return max(1, (2**63 - 1 - p) // (p - 1) ** 2)


def _sum_out(t: Tensor, letters: str, keep: str, p: int):
    """Sum (mod p) over the letters of ``t`` that are not in ``keep``."""
    dims = [i for i, c in enumerate(letters) if c not in keep]
    if dims:
        # residues < 2^28, so int64 sums of < 2^35 terms are exact
        t = t.sum(dim=dims).remainder(p)
        letters = "".join(c for c in letters if c in keep)
    return t, letters


def pair_mod(a: Tensor, la: str, b: Tensor, lb: str, out: str, p: int) -> Tensor:
    """``einsum(la,lb->out)`` modulo ``p`` with overflow-free int64 batched matmuls."""
    a, la = _sum_out(a, la, lb + out, p)
    b, lb = _sum_out(b, lb, la + out, p)
    batch = [c for c in la if c in lb and c in out]
    summed = [c for c in la if c in lb and c not in out]
    left = [c for c in la if c not in lb]
    right = [c for c in lb if c not in la]
    size = dict(zip(la, a.shape)) | dict(zip(lb, b.shape))

    def numel(letters):
        result = 1
        for c in letters:
            result *= size[c]
        return result

    a = a.permute([la.index(c) for c in batch + left + summed])
    a = a.reshape(numel(batch), numel(left), numel(summed))
    b = b.permute([lb.index(c) for c in batch + summed + right])
    b = b.reshape(numel(batch), numel(summed), numel(right))
    step = _chunk(p)
    result = torch.bmm(a[:, :, :step], b[:, :step]).remainder_(p)
    for start in range(step, a.shape[2], step):
        stop = start + step
        result.add_(torch.bmm(a[:, :, start:stop], b[:, start:stop])).remainder_(p)
    result = result.reshape([size[c] for c in batch + left + right])
    order = batch + left + right
    return result.permute([order.index(c) for c in out])


def contract_modular(
    network: TensorNetwork, p: int, max_entries: Optional[int] = None
) -> Tensor:
    """Contract a network exactly modulo ``p`` (no finalize step applied).

    Follows the cached greedy opt_einsum path (:mod:`.planning`); each pair is
    a batched int64 matmul reduced modulo ``p`` after every ≤127 products.
    """
    equation = network.equation()
    inputs, output = equation.split("->")
    letters = inputs.split(",")
    operands = [to_modular(op, p) for op in network.materialized()]
    path = tree_path(network, max_entries)
    for step in path:
        chosen = [(operands.pop(i), letters.pop(i)) for i in sorted(step, reverse=True)]
        needed = set(output).union(*letters)
        tensor, have = chosen[0]
        tensor, have = _sum_out(
            tensor, have, "".join(needed.union(*[ls for _, ls in chosen[1:]])), p
        )
        for k, (other, other_letters) in enumerate(chosen[1:], start=2):
            later = needed.union(*[ls for _, ls in chosen[k:]])
            keep = "".join(c for c in dict.fromkeys(have + other_letters) if c in later)
            tensor = pair_mod(tensor, have, other, other_letters, keep, p)
            have = keep
        operands.append(tensor)
        letters.append(have)
    (tensor,), (have,) = operands, letters
    tensor, have = _sum_out(tensor, have, output, p)
    return tensor.permute([have.index(c) for c in output])


def matmul_mod(a: Tensor, b: Tensor, p: int) -> Tensor:
    """``a @ b`` modulo ``p`` for int64 residue matrices (overflow-free)."""
    return pair_mod(a, "ik", b, "kj", "ij", p)


def _panel_pivots(panel: Tensor, p: int):
    """Rows and columns of a maximal nonsingular submatrix of a (tall) panel.

    Unblocked elimination on a copy; returns the original indices of the pivot
    rows and the pivot columns.
    """
    a = panel.clone()
    order = torch.arange(a.shape[0])
    rows, cols = [], []
    r = 0
    for col in range(a.shape[1]):
        nonzero = torch.nonzero(a[r:, col]).flatten()
        if nonzero.numel() == 0:
            continue
        pivot = r + int(nonzero[0])
        a[[r, pivot]] = a[[pivot, r]]
        order[[r, pivot]] = order[[pivot, r]]
        inverse = pow(int(a[r, col]), -1, p)
        a[r, col:] = (a[r, col:] * inverse).remainder(p)
        a[r + 1 :, col:] = (
            a[r + 1 :, col:] - a[r + 1 :, col : col + 1] * a[r, col:]
        ).remainder(p)
        rows.append(int(order[r]))
        cols.append(col)
        r += 1
        if r == a.shape[0]:
            break
    return rows, cols


def _inverse_mod(matrix: Tensor, p: int) -> Tensor:
    """Inverse of a nonsingular residue matrix (Gauss-Jordan)."""
    k = matrix.shape[0]
    a = torch.cat([matrix, torch.eye(k, dtype=torch.int64)], dim=1)
    for col in range(k):
        pivot = col + int(torch.nonzero(a[col:, col]).flatten()[0])
        a[[col, pivot]] = a[[pivot, col]]
        row = (a[col] * pow(int(a[col, col]), -1, p)).remainder(p)
        a = (a - a[:, col : col + 1] * row).remainder(p)
        a[col] = row
    return a[:, k:]


#: Columns per panel of the blocked elimination: the inner dimension of the
#: trailing update, kept ≤ 126 so that one int64 matmul plus a residue cannot
#: overflow (127·p² + p < 2^63 for p < 2^28).
PANEL = 96
#: Panels are themselves eliminated blockwise, in sub-panels of this width:
#: an unblocked step touches every row of its panel, so narrow is cheap.
SUBPANEL = 12


def independent_rows(matrix: Tensor, p: int, panel: int = PANEL) -> List[int]:
    """Indices of rows of an int64 residue matrix that form a basis of its row space.

    Blocked elimination modulo ``p``: per panel of columns, a maximal
    nonsingular submatrix ``S`` (pivot rows × pivot columns) is found, and the
    other rows lose their panel part through ``rows -= (P_rest S⁻¹) · pivots``,
    one matrix product. So the cost is ``O(rows · cols · rank)``, mostly int64
    matmuls. The number of rows returned is ``rank_p``.
    """
    active = matrix.clone()  # eliminated in place; the caller's matrix stays
    ids = torch.arange(matrix.shape[0])
    chosen: List[int] = []
    while active.shape[0] and active.shape[1]:
        block = active[:, :panel]
        if panel > SUBPANEL:
            rows = independent_rows(block, p, SUBPANEL)
            cols = _panel_pivots(block[rows], p)[1] if rows else []
        else:
            rows, cols = _panel_pivots(block, p)
        if rows:
            _rows_to_top(active, ids, rows)
            k = len(rows)
            chosen.extend(int(i) for i in ids[:k])
            pivots, others = active[:k], active[k:]
            weights = matmul_mod(others[:, cols], _inverse_mod(pivots[:, cols], p), p)
            # rows -= weights · pivots, as rows + (p - weights) · pivots: one
            # product, one addition and one reduction over the trailing matrix
            negated = (p - weights).remainder_(p)
            active = (
                torch.mm(negated, pivots[:, panel:])
                .add_(others[:, panel:])
                .remainder_(p)
            )
            ids = ids[k:]
        else:
            active = active[:, panel:]
    return chosen


def _rows_to_top(matrix: Tensor, ids: Tensor, rows: Sequence[int]) -> None:
    """Swap the rows ``rows`` (in this order) to the top, in place, ids alike."""
    position = {r: r for r in rows}  # current position of each wanted row
    holder = {}  # original row now held at a position (only moved ones)
    for target, row in enumerate(rows):
        current = position[row]
        if current != target:
            displaced = holder.get(target, target)
            matrix[[target, current]] = matrix[[current, target]]
            ids[[target, current]] = ids[[current, target]]
            holder[current], holder[target] = displaced, row
            if displaced in position:
                position[displaced] = current
            position[row] = target


def rank_mod_p(matrix: Tensor, p: int) -> int:
    """Rank of an int64 matrix of residues modulo the prime ``p``."""
    if matrix.shape[0] > matrix.shape[1]:
        matrix = matrix.T
    return len(independent_rows(matrix.contiguous(), p))


def exact_rank(matrices: Sequence[Tensor], primes: Sequence[int]) -> int:
    """The maximum over primes of ``rank_p`` (one residue matrix per prime)."""
    return max(rank_mod_p(m, p) for m, p in zip(matrices, primes))
