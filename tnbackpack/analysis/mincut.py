"""Minimum cuts of tensor networks: upper bounds on matricization ranks.

A network's axes are hyperedges: an axis held by several operands (product
pooling's shared channel) is one index, and cutting it costs its size once.
For a partition of the open axes into rows and columns, every cut that
separates them factors the matricization through the cut axes, so its rank is
at most the product of their sizes. The minimum over cuts is computed as a
maximum flow with capacities ``log(size)`` on Lawler's graph of the hypergraph
(hyperedge ``e`` becomes ``e_in → e_out`` with capacity ``log|e|``; each
member ``u`` gets ``u → e_in`` and ``e_out → u`` of infinite capacity).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Dict, FrozenSet, List, Sequence, Set, Tuple

import torch

from ..tn.network import TensorNetwork

_INF = float("inf")


class Cut(int):
    """A minimum cut's value (an int: the product of the cut axes' sizes).

    Attributes:
        axes: The cut axes.
        row_side: Positions of the operands on the rows' side of the cut.
    """

    axes: Tuple[str, ...]
    row_side: FrozenSet[int]

    def __new__(cls, value: int, axes: Tuple[str, ...], row_side: FrozenSet[int]):
        """Attach the cut's axes and rows' side to its value."""
        cut = super().__new__(cls, value)
        cut.axes, cut.row_side = axes, row_side
        return cut

    def __str__(self) -> str:
        """The number alone (``print(rank)`` prints ``16``)."""
        return str(int(self))

    def __repr__(self) -> str:
        return f"Cut({int(self)}, axes={self.axes})"


class _FlowGraph:
    """Residual graph for Edmonds-Karp maximum flow."""

    def __init__(self, size: int):
        self.capacity: List[Dict[int, float]] = [dict() for _ in range(size)]

    def add(self, u: int, v: int, capacity: float) -> None:
        self.capacity[u][v] = self.capacity[u].get(v, 0.0) + capacity
        self.capacity[v].setdefault(u, 0.0)

    def _augmenting_path(self, s: int, t: int) -> List[int]:
        parent = {s: s}
        queue = deque([s])
        while queue:
            u = queue.popleft()
            for v, c in self.capacity[u].items():
                if c > 1e-12 and v not in parent:
                    parent[v] = u
                    if v == t:
                        path = [t]
                        while path[-1] != s:
                            path.append(parent[path[-1]])
                        return path[::-1]
                    queue.append(v)
        return []

    def max_flow_source_side(self, s: int, t: int) -> Set[int]:
        """Push a maximum flow; return the nodes reachable from ``s`` after."""
        while True:
            path = self._augmenting_path(s, t)
            if not path:
                break
            flow = min(self.capacity[u][v] for u, v in zip(path, path[1:]))
            if flow == _INF:
                raise ValueError("rows and columns share an axis: no finite cut exists")
            for u, v in zip(path, path[1:]):
                self.capacity[u][v] -= flow
                self.capacity[v][u] += flow
        reached, queue = {s}, deque([s])
        while queue:
            u = queue.popleft()
            for v, c in self.capacity[u].items():
                if c > 1e-12 and v not in reached:
                    reached.add(v)
                    queue.append(v)
        return reached


def min_cut(network: TensorNetwork, rows: Sequence[str]) -> Cut:
    """The minimum cut of ``network`` separating the open axes ``rows`` from the others.

    Args:
        network: A tensor network (its output axes are the open legs).
        rows: The open axes on the rows' side.

    Raises:
        ValueError: If ``rows`` are not open axes of the network.
    """
    rows = list(rows)
    if not set(rows) <= set(network.output):
        raise ValueError(
            f"rows {sorted(set(rows) - set(network.output))} are no open axes"
        )
    sizes = network.sizes()
    names = list(sizes)
    operands = len(network.operands)
    source, sink = operands, operands + 1
    hub = {name: operands + 2 + 2 * k for k, name in enumerate(names)}
    graph = _FlowGraph(operands + 2 + 2 * len(names))
    for name in names:
        graph.add(hub[name], hub[name] + 1, math.log(sizes[name]))
    for node, axes in enumerate(network.axes):
        for name in set(axes):
            graph.add(node, hub[name], _INF)
            graph.add(hub[name] + 1, node, _INF)
    for name in network.output:
        if name in rows:
            graph.add(source, hub[name], _INF)
        else:
            graph.add(hub[name] + 1, sink, _INF)
    reached = graph.max_flow_source_side(source, sink)
    cut = tuple(n for n in names if hub[n] in reached and hub[n] + 1 not in reached)
    value = math.prod(sizes[n] for n in cut)
    return Cut(value, cut, frozenset(k for k in range(operands) if k in reached))


def split_at_cut(
    network: TensorNetwork, rows: Sequence[str], cut: Cut
) -> Tuple[TensorNetwork, TensorNetwork, Tuple[str, ...]]:
    """Factor the matricization through a cut: ``[A]_{rows, cols} = U Vᵀ``.

    ``U`` contracts the rows' side with output ``rows + cut axes``, ``V`` the
    columns' side with output ``cols + cut axes``. An open axis that is itself
    cut gets an identity on the side that holds no operand with it (its cut
    copy is named ``"cut:" + name`` there and on the other side).

    Returns:
        ``U``'s network, ``V``'s network and the cut axis names (in both).
    """
    rows = list(rows)
    cols = [name for name in network.output if name not in rows]
    sizes = network.sizes()
    cut_names = {n: (f"cut:{n}" if n in network.output else n) for n in cut.axes}
    sides = (TensorNetwork([], [], ()), TensorNetwork([], [], ()))
    for k, (operand, axes) in enumerate(zip(network.operands, network.axes)):
        side = 0 if k in cut.row_side else 1
        opposite = cols if side == 0 else rows
        # an open axis of the other side held here is cut: rename it to its cut copy
        renamed = tuple(cut_names[a] if a in opposite else a for a in axes)
        build = network.deferred.get(id(operand))
        sides[side].add(operand, renamed, build=build)
    for name in cut.axes:
        if name in network.output:
            # the side that owns the open axis holds no operand with it
            owner = sides[0] if name in rows else sides[1]
            eye = torch.eye(sizes[name], dtype=network.operands[0].dtype)
            owner.add(eye, (name, cut_names[name]))
    names = tuple(cut_names[n] for n in cut.axes)
    sides[0].output = tuple(rows) + names
    sides[1].output = tuple(cols) + names
    return sides[0], sides[1], names
