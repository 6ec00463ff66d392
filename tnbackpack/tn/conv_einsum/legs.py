"""Legs of convolution letters, and the legs of any part of a network.

A leg ``coef·(position + offset)`` for ``position`` in ``[0, size)`` is one
operand's share of a convolution letter's constraint (the legs of a letter sum
to zero, see :mod:`.semantics`). Contracting a set of nodes leaves, per letter
it shares with the rest of the network, one merged leg holding the partial sum
of its legs' values. Only values the rest of the network can cancel are kept:
those on the lattice both sides can reach, inside the range the rest can reach.
This clipping is what keeps intermediates small: a signal convolved with a
kernel keeps the output's stride and the positions the output reads, the
``same``-size intermediate of a factorized layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Iterable, Optional, Tuple


@dataclass(frozen=True)
class Leg:
    """Positions ``p ∈ [0, size)`` contributing ``coef · (p + offset)``."""

    coef: int
    offset: int
    size: int

    def bounds(self) -> Tuple[int, int]:
        """Smallest and largest contributed value."""
        first, last = self.coef * self.offset, self.coef * (self.offset + self.size - 1)
        return min(first, last), max(first, last)

    def negated(self) -> Leg:
        """The leg contributing the opposite values."""
        return Leg(-self.coef, self.offset, self.size)

    def position(self, value: int) -> Optional[int]:
        """The position contributing ``value``, ``None`` if there is none."""
        if value % self.coef:
            return None
        p = value // self.coef - self.offset
        return p if 0 <= p < self.size else None


def merge(inner: Iterable[Leg], outer: Iterable[Leg]) -> Optional[Leg]:
    """The merged leg of ``inner``'s values that ``outer`` can cancel.

    Returns ``None`` when no value can be cancelled (the part is zero).
    """
    inner, outer = list(inner), list(outer)
    g_in = math.gcd(*(abs(leg.coef) for leg in inner))
    g_out = math.gcd(*(abs(leg.coef) for leg in outer))
    step = g_in * g_out // math.gcd(g_in, g_out)
    sign = -1 if any(leg.coef < 0 for leg in inner) else 1
    low = max(
        sum(leg.bounds()[0] for leg in inner), -sum(leg.bounds()[1] for leg in outer)
    )
    high = min(
        sum(leg.bounds()[1] for leg in inner), -sum(leg.bounds()[0] for leg in outer)
    )
    if sign > 0:
        first, last = -(-low // step), high // step
    else:
        first, last = -(high // step), (-low) // step
    if last < first:
        return None
    return Leg(sign * step, first, last - first + 1)


@dataclass(frozen=True)
class Part:
    """What contracting a set of nodes leaves.

    Attributes:
        letters: Open letters (plain and convolution), in a canonical order.
        legs: Merged leg of every open convolution letter.
        sizes: Size of every open letter.
        empty: A convolution letter has no value the rest can cancel: the
            part is zero.
    """

    letters: str
    legs: Tuple[Tuple[str, Leg], ...]
    sizes: Tuple[int, ...]
    empty: bool = False

    def leg(self, letter: str) -> Optional[Leg]:
        """The merged leg of ``letter``, ``None`` for a plain letter."""
        return dict(self.legs).get(letter)

    @property
    def numel(self) -> int:
        """Number of entries."""
        return math.prod(self.sizes)


def members(mask: int) -> Tuple[int, ...]:
    """Node indices in a bit mask."""
    return tuple(i for i in range(mask.bit_length()) if mask >> i & 1)


@lru_cache(maxsize=65536)
def part(network, mask: int) -> Part:
    """The open letters and merged legs of the nodes in ``mask``."""
    inside = members(mask)
    everyone = range(len(network.subscripts))
    plain = dict(network.sizes)
    node_legs = [dict(legs) for legs in network.legs]
    letters, legs, sizes, empty = [], [], [], False
    held = set("".join(network.subscripts[i] for i in inside))
    # one order for every part: the output's letters first, so that spatial
    # letters keep the output's order in every intermediate
    for letter in dict.fromkeys(network.subscripts[-1] + "".join(network.subscripts)):
        if letter not in held:
            continue
        outside = [
            j for j in everyone if not mask >> j & 1 and letter in network.subscripts[j]
        ]
        if not outside:
            continue
        letters.append(letter)
        if letter in plain:
            sizes.append(plain[letter])
            continue
        merged = merge(
            (node_legs[i][letter] for i in inside if letter in node_legs[i]),
            (node_legs[j][letter] for j in outside),
        )
        if merged is None:
            empty, merged = True, Leg(1, 0, 1)
        legs.append((letter, merged))
        sizes.append(merged.size)
    return Part("".join(letters), tuple(legs), tuple(sizes), empty)


def target(network, node: int, mask: int) -> Part:
    """The result of contracting ``mask`` into ``node``'s coordinates.

    Letters of ``node`` that ``mask`` lacks are left out (the caller expands
    the result over them).
    """
    held = set("".join(network.subscripts[i] for i in members(mask)))
    legs: Dict[str, Leg] = dict(network.legs[node])
    plain = dict(network.sizes)
    letters = [c for c in network.subscripts[node] if c in held]
    return Part(
        "".join(letters),
        tuple((c, legs[c].negated()) for c in letters if c in legs),
        tuple(legs[c].size if c in legs else plain[c] for c in letters),
    )
