"""Plan the contractions of a conv_einsum network: order, kernel per step, cost.

Every quantity is the contraction of all nodes but one into that one: the
forward contracts the operands into the output node ``Y``; the gradient of
operand ``t`` contracts the other operands and ``Y`` (holding the output's
gradient) into ``t``. An intermediate is identified by its set of nodes
(:func:`.legs.part`), so the contractions share intermediates: the gradients
are planned after the forward, with the forward's intermediates and those of
the gradients planned before free, and each reuses what is cheaper to reuse.

The order is found by dynamic programming over subsets (exact for the small
networks of factorized layers, greedy beyond :data:`EXACT_NODES` nodes). A
step's cost is its estimated time: FLOPs at the rate of the kernel it is
dispatched to, plus the bytes it reads and writes at the memory bandwidth
(:func:`step_cost`); the rates are measured constants of a CPU core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, FrozenSet, Iterable, Optional, Tuple

from .legs import Part, members, part, target
from .semantics import Network
from .steps import Layout, Side, layout

#: Networks with at most this many nodes are planned exactly.
EXACT_NODES = 10

#: Rates of one CPU core (float32), measured on the development machine
#: (AMD EPYC, AVX-512, oneDNN/MKL of the torch 2.13 CPU wheel) in process CPU
#: time: 1×1 products of ResNet shapes ran at ~60 GFLOP/s, dense 3×3
#: convolutions at ~55 GFLOP/s, streaming kernels (depthwise convolutions,
#: copies) at ~10 GB/s. With them the estimate of each step of the CP layer
#: at 512 ch @ 7² was 3.6 ms for a 1×1 product against 3.4-3.6 ms measured.
MATMUL_FLOPS = 6.5e10
CONV_FLOPS = 5.5e10
BANDWIDTH = 1.0e10
#: Per-call overhead (seconds): dispatch, permutes of small tensors.
OVERHEAD = 2e-5
#: A matrix product with a contracted dimension below this runs at a
#: proportionally lower FLOP rate (it is memory-bound).
INNER_KNEE = 32


@dataclass(frozen=True)
class Step:
    """One planned step: ``left`` and ``right`` node sets into their union.

    Attributes:
        left, right: Node sets (bit masks) of the two operands.
        method: ``einsum``, ``conv``, ``wgrad``, ``transposed`` or ``pattern``.
        layout: Roles of the letters for the convolution methods.
        flops: Multiply-adds times two.
        bytes: Bytes read and written (operands and result).
        seconds: Estimated time.
        out: The result's letters and legs.
        a, b: The operands' letters and legs as the step uses them (at the
            top step, letters of one operand only are first moved to the
            result's coordinates).
        cuts: Per operand, ``(letter, start, length)`` cut from it first
            (see :func:`align`).
    """

    left: int
    right: int
    method: str
    layout: Optional[Layout]
    flops: int
    bytes: int
    seconds: float
    out: Part
    a: Side
    b: Side
    cuts: Tuple = ((), ())

    @property
    def result(self) -> int:
        """Node set of the result."""
        return self.left | self.right


@dataclass(frozen=True)
class Contraction:
    """The steps contracting every node but ``node`` into ``node``."""

    node: int
    steps: Tuple[Step, ...]

    @property
    def seconds(self) -> float:
        """Estimated time of the steps."""
        return sum(step.seconds for step in self.steps)


def _side(network: Network, mask: int, other: int, out: Part) -> Side:
    """Side of ``mask``, its letters missing from ``other`` in ``out``'s legs."""
    own, rest = part(network, mask), part(network, other)
    legs = dict(own.legs)
    sizes = list(own.sizes)
    for letter, leg in out.legs:
        if letter in legs and letter not in rest.letters:
            legs[letter] = leg
            sizes[own.letters.index(letter)] = leg.size
    return Side(own.letters, tuple(sizes), tuple(legs.items()))


def step_cost(
    a: Side, b: Side, out: Part, itemsize: int
) -> Tuple[str, Optional[Layout], int, int, float]:
    """Method, layout, FLOPs, bytes and estimated seconds of one step."""
    legs_a, legs_b = dict(a.legs), dict(b.legs)
    shared_conv = [c for c in a.letters if c in legs_a and c in legs_b]
    moved = itemsize * (math.prod(a.sizes) + math.prod(b.sizes) + out.numel)
    if not shared_conv:
        sizes = dict(zip(a.letters, a.sizes))
        sizes.update(zip(b.letters, b.sizes))
        flops = 2 * math.prod(sizes.values())
        inner = math.prod(
            sizes[c] for c in a.letters if c in b.letters and c not in out.letters
        )
        rate = MATMUL_FLOPS * min(1.0, inner / INNER_KNEE)
        seconds = flops / rate + moved / BANDWIDTH + OVERHEAD
        return "einsum", None, flops, moved, seconds
    lay = layout(a, b, out)
    if lay is None:
        sizes = dict(zip(a.letters, a.sizes))
        sizes.update(zip(b.letters, b.sizes))
        flops = (
            2
            * math.prod(sizes[c] for c in sizes if c not in shared_conv)
            * math.prod(
                dict(zip(a.letters, a.sizes))[c]
                * dict(zip(b.letters, b.sizes))[c]
                * (dict(zip(out.letters, out.sizes)).get(c, 1))
                for c in shared_conv
            )
        )
        seconds = flops / MATMUL_FLOPS * 4 + 3 * moved / BANDWIDTH + OVERHEAD
        return "pattern", None, flops, moved, seconds
    signal, kernel = (b, a) if lay.swap else (a, b)
    n_batch = _prod(signal, lay.batch)
    groups = _prod(signal, lay.group)
    cin, cout = _prod(signal, lay.cin), _prod(kernel, lay.cout)
    positions = math.prod(lay.in_sizes if lay.method == "transposed" else lay.out_sizes)
    flops = 2 * n_batch * groups * cin * cout * positions * math.prod(lay.kernel_sizes)
    if lay.method == "wgrad":
        flops = (
            2
            * n_batch
            * groups
            * cin
            * cout
            * math.prod(lay.out_sizes)
            * math.prod(lay.kernel_sizes)
        )
    rate = CONV_FLOPS
    padded = (
        0
        if lay.method == "transposed"
        else itemsize
        * math.prod(signal.sizes)
        * any(left != right or left < 0 for left, right in lay.pad)
    )
    seconds = flops / rate + (moved + 2 * padded) / BANDWIDTH + OVERHEAD
    return lay.method, lay, flops, moved + padded, seconds


def _prod(side: Side, letters: str) -> int:
    return math.prod(side.size(c) for c in letters)


@lru_cache(maxsize=65536)
def _pair(network: Network, left: int, right: int, top: int, itemsize: int) -> Step:
    mask = left | right
    out = target(network, top, mask) if top >= 0 else part(network, mask)
    a, b = _side(network, left, right, out), _side(network, right, left, out)
    a, b, cuts = align(a, b, out)
    method, lay, flops, moved, seconds = step_cost(a, b, out, itemsize)
    return Step(left, right, method, lay, flops, moved, seconds, out, a, b, cuts)


def align(a: Side, b: Side, out: Part) -> Tuple[Side, Side, Tuple]:
    """Turn 1×1 convolution letters into plain contracted letters.

    A shared convolution letter that the step sums out, with opposite unit
    legs (``p_a + f_a = p_b + f_b``), pairs equal positions: the pattern is
    an identity on the positions both legs hold (DESIGN §1, "1×1, stride 1:
    drop it"). Both sides are cut to those positions and the letter becomes
    an ordinary contracted index, so the step is a matrix product.

    Returns:
        The sides, and per side the cuts ``(letter, start, length)``.
    """
    legs_a, legs_b = dict(a.legs), dict(b.legs)
    sizes_a, sizes_b = list(a.sizes), list(b.sizes)
    cuts_a, cuts_b = [], []
    for c in a.letters:
        if c in out.letters or c not in legs_a or c not in legs_b:
            continue
        leg_a, leg_b = legs_a[c], legs_b[c]
        low = max(leg_a.offset, leg_b.offset)
        high = min(leg_a.offset + leg_a.size, leg_b.offset + leg_b.size)
        if leg_a.coef != -leg_b.coef or high <= low:
            continue
        del legs_a[c], legs_b[c]
        cuts_a.append((c, low - leg_a.offset, high - low))
        cuts_b.append((c, low - leg_b.offset, high - low))
        sizes_a[a.letters.index(c)] = sizes_b[b.letters.index(c)] = high - low
    if not cuts_a:
        return a, b, ((), ())
    return (
        Side(a.letters, tuple(sizes_a), tuple(legs_a.items())),
        Side(b.letters, tuple(sizes_b), tuple(legs_b.items())),
        (tuple(cuts_a), tuple(cuts_b)),
    )


def contraction(
    network: Network, node: int, itemsize: int, free: FrozenSet[int] = frozenset()
) -> Contraction:
    """The cheapest steps contracting all nodes but ``node`` into ``node``.

    Args:
        network: The network.
        node: The node to contract into (the output node for the forward).
        itemsize: Bytes per entry.
        free: Node sets whose intermediates are already computed.
    """
    everyone = (1 << len(network.subscripts)) - 1
    full = everyone & ~(1 << node)
    nodes = members(full)
    if len(nodes) == 1:
        return Contraction(node, ())
    if len(nodes) <= EXACT_NODES:
        steps = _exact(network, full, node, itemsize, free)
    else:
        steps = _greedy(network, full, node, itemsize, free)
    return Contraction(node, steps)


def _exact(network, full, node, itemsize, free) -> Tuple[Step, ...]:
    best: Dict[int, Tuple[float, Tuple[Step, ...]]] = {}
    nodes = members(full)
    for i in nodes:
        best[1 << i] = (0.0, ())
    # subsets of ``full`` in order of size
    subsets = sorted(
        (m for m in _submasks(full) if bin(m).count("1") > 1),
        key=lambda m: bin(m).count("1"),
    )
    for mask in subsets:
        if mask in free and mask != full:
            best[mask] = (0.0, ())
            continue
        top = node if mask == full else -1
        choice = None
        low = mask & -mask
        sub = (mask - 1) & mask
        while sub:
            if sub & low:  # each split once: the left half holds the lowest node
                other = mask ^ sub
                if other:
                    step = _pair(network, sub, other, top, itemsize)
                    cost = best[sub][0] + best[other][0] + step.seconds
                    if choice is None or cost < choice[0]:
                        choice = (cost, best[sub][1] + best[other][1] + (step,))
            sub = (sub - 1) & mask
        best[mask] = choice
    return best[full][1]


def _submasks(mask: int) -> Iterable[int]:
    sub = mask
    while sub:
        yield sub
        sub = (sub - 1) & mask


def _greedy(network, full, node, itemsize, free) -> Tuple[Step, ...]:
    groups = [1 << i for i in members(full)]
    steps = []
    while len(groups) > 1:
        options = []
        for i, a in enumerate(groups):
            for b in groups[i + 1 :]:
                top = node if a | b == full else -1
                shares = set(part(network, a).letters) & set(part(network, b).letters)
                if not shares and top < 0:
                    continue
                step = _pair(network, a, b, top, itemsize)
                options.append((0.0 if (a | b) in free else step.seconds, step))
        if not options:
            a, b = groups[0], groups[1]
            options = [
                (0.0, _pair(network, a, b, node if a | b == full else -1, itemsize))
            ]
        _, step = min(options, key=lambda o: o[0])
        groups = [g for g in groups if g not in (step.left, step.right)] + [step.result]
        if step.result not in free:
            steps.append(step)
    return tuple(steps)


@dataclass(frozen=True)
class Plan:
    """Forward and gradient contractions of one network.

    Attributes:
        forward: Contraction into the output node.
        gradients: Contraction into each operand whose gradient is needed.
        saved: Forward intermediates (node sets) the gradients reuse.
    """

    forward: Contraction
    gradients: Tuple[Contraction, ...]
    saved: FrozenSet[int]


@lru_cache(maxsize=1024)
def plan(network: Network, itemsize: int, wanted: Tuple[int, ...] = ()) -> Plan:
    """Plan the forward and the gradients of the operands in ``wanted``.

    The gradients are planned one after the other, with every intermediate
    of the forward and of the gradients planned before counted as free.
    """
    forward = contraction(network, network.output_node, itemsize)
    available = {step.result for step in forward.steps}
    from_forward = set(available)
    gradients = []
    for node in wanted:
        grad = contraction(network, node, itemsize, frozenset(available))
        gradients.append(grad)
        available |= {step.result for step in grad.steps}
    used = set()
    for grad in gradients:
        for step in grad.steps:
            used |= {step.left, step.right}
    return Plan(forward, tuple(gradients), frozenset(used & from_forward))
