"""Per-sample gradients of operands, as contractions of the same network.

The per-sample gradient of operand ``t`` (a factor shared by the batch) is
the gradient of ``t`` in the network where ``t`` carries the batch letter
too (every sample its own copy): :func:`batched` prepends the letter to
``t``'s subscripts, and the gradient contraction of that network into ``t``
keeps the batch letter instead of summing it. Its cost is the summed
gradient's: the products that sum over the batch become batched products.

So a backward can return per-sample gradients of the factors at the price of
the ordinary gradients (their sums are the ordinary gradients), which is
what tnbackpack's first-order extensions of factorized layers ask for
(:class:`PerSampleRequest`).

Intermediates are shared between the contractions, across networks, where
they are the same tensor: a node set's intermediate can be reused in another
network if it has the same letters and legs there (:func:`.legs.part`); the
node sets holding both batch holders of the original network are the ones
that differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

from torch import Tensor

from ..pattern import fold_padding
from .evaluate import execute
from .legs import Part, part
from .planner import Contraction, contraction
from .semantics import Network


class PerSampleRequest:
    """Asks a conv_einsum backward for per-sample gradients of some operands.

    The forward keeps the intermediates that per-sample gradients of the
    ``candidates`` would reuse; the backward calls ``positions`` and computes
    per-sample gradients of those it names (and the ordinary ones of the
    rest), so whether they are wanted can be decided as late as the backward.

    Someone holding the output's gradient before the backward reaches the
    conv_einsum node (a module's backward hook fires first when the module's
    inputs need no gradient) can :meth:`compute` them instead; the backward
    then returns their sums and does not contract them again.

    Attributes:
        batch: The batch letter (held by the output, not by the candidates).
        candidates: Operand positions whose per-sample gradients may be asked.
        positions: Called by the backward: the positions asked now (a subset
            of ``candidates``; empty: none).
        gradients: Filled by the backward: position -> ``[N, *operand]``.
    """

    def __init__(
        self,
        batch: str,
        candidates: Tuple[int, ...],
        positions: Optional[Callable[[], Tuple[int, ...]]] = None,
    ) -> None:
        self.batch = batch
        self.candidates = tuple(candidates)
        self.positions = positions or (lambda: self.candidates)
        self.gradients: Optional[Dict[int, Tensor]] = None
        #: ``(position, dim, left, right, size, padding_mode)`` per padded
        #: signal dimension (set by ``conv_einsum`` for non-zero padding modes).
        self.folds: List[Tuple[int, int, int, int, int, str]] = []
        #: Set by the forward, dropped by the backward: what :meth:`compute`
        #: contracts (network, the wanted positions, the operands as the
        #: network holds them, the saved intermediates).
        self.context: Optional[tuple] = None
        #: Per-sample gradients :meth:`compute` made ahead of the backward
        #: (unfolded), with the output gradient they are for.
        self.ahead: Optional[Tuple[Tensor, Dict[int, Tensor]]] = None

    def compute(self, grad_output: Tensor) -> bool:
        """Make the asked per-sample gradients now, from the output's gradient.

        Returns:
            Whether they were made (``False`` once the backward has run, or
            if nothing is asked).
        """
        if self.context is None:
            return False
        network, wanted, operands, store = self.context
        asked = set(self.positions())
        per_sample = tuple(i for i in wanted if i in asked)
        if not per_sample:
            return False
        tensors = dict(enumerate(operands))
        tensors[network.output_node] = grad_output
        results = gradients(network, (), per_sample, self.batch, tensors, store)
        self.ahead = (grad_output, results)
        self.deliver(dict(results))
        return True

    def take_ahead(self, grad_output: Tensor) -> Dict[int, Tensor]:
        """The per-sample gradients made ahead for ``grad_output`` (unfolded).

        Called by the backward; anything else is dropped (empty result).
        """
        ahead, self.ahead = self.ahead, None
        if ahead is None or not _same_values(ahead[0], grad_output):
            return {}
        return ahead[1]

    def deliver(self, gradients: Dict[int, Tensor]) -> None:
        """Keep per-sample gradients, folded back through padding.

        A signal padded by reading real positions (``reflect``, ``replicate``,
        ``circular``) got its gradient per padded position: each is added to
        the real position it read.
        """
        for position, dim, left, right, size, mode in reversed(self.folds):
            if position in gradients:
                gradients[position] = fold_padding(
                    gradients[position], dim + 1, left, right, size, mode
                )
        self.gradients = gradients


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Whether ``b`` is ``a`` or a view of the same entries (values not compared)."""
    return (
        a.shape == b.shape and a.data_ptr() == b.data_ptr() and a.stride() == b.stride()
    )


@lru_cache(maxsize=1024)
def batched(network: Network, node: int, batch: str) -> Network:
    """``network`` with ``batch`` prepended to the subscripts of ``node``."""
    subscripts = list(network.subscripts)
    if batch not in subscripts[network.output_node]:
        raise ValueError(
            f"conv_einsum: per-sample gradients need the batch letter {batch!r} "
            f"in the output {subscripts[network.output_node]!r}"
        )
    if batch in subscripts[node]:
        raise ValueError(
            f"conv_einsum: operand {node} already holds the batch letter {batch!r}"
        )
    subscripts[node] = batch + subscripts[node]
    return Network(tuple(subscripts), network.sizes, network.legs)


@dataclass(frozen=True)
class Task:
    """One gradient contraction of a mixed backward.

    Attributes:
        network: The network it contracts (the original, or a batched one).
        contraction: Its steps.
        per_sample: Whether the result carries the batch letter first.
    """

    network: Network
    contraction: Contraction
    per_sample: bool


@lru_cache(maxsize=1024)
def plan_mixed(
    network: Network,
    itemsize: int,
    summed: Tuple[int, ...],
    per_sample: Tuple[int, ...],
    batch: str,
    free: FrozenSet[int],
) -> Tuple[Tuple[Task, ...], FrozenSet[int]]:
    """Plan summed gradients of ``summed`` and per-sample ones of ``per_sample``.

    Args:
        network: The network.
        itemsize: Bytes per entry.
        summed: Operands whose ordinary gradient is wanted.
        per_sample: Operands whose per-sample gradient is wanted.
        batch: The batch letter.
        free: Node sets of the original network available from the forward.

    Returns:
        The tasks in execution order, and the forward node sets they reuse.
    """
    available: Dict[int, Part] = {m: part(network, m) for m in free}
    tasks = []
    used = set()
    for node, own in [(n, False) for n in summed] + [(n, True) for n in per_sample]:
        net = batched(network, node, batch) if own else network
        usable = frozenset(m for m, p in available.items() if part(net, m) == p)
        steps = contraction(net, node, itemsize, usable)
        tasks.append(Task(net, steps, own))
        for step in steps.steps:
            used |= {step.left, step.right}
            # the first tensor of a node set stays (as in :func:`run_mixed`)
            available.setdefault(step.result, part(net, step.result))
    return tuple(tasks), frozenset(used & free)


def run_mixed(
    network: Network,
    tasks: Tuple[Task, ...],
    tensors: Dict[int, Tensor],
    store: Dict[int, Tuple[Tensor, str]],
) -> Dict[int, Tensor]:
    """Execute planned tasks; intermediates shared where their parts agree.

    Args:
        network: The original network.
        tasks: From :func:`plan_mixed`.
        tensors: Every node's tensor (the output node holds its gradient).
        store: The forward's saved intermediates (of ``network``).

    Returns:
        Per task node its gradient (``[N, *operand]`` for per-sample tasks).
    """
    # every intermediate with the part it has in the network that made it
    shared = {mask: (value, part(network, mask)) for mask, value in store.items()}
    results = {}
    for task in tasks:
        net = task.network
        local = {
            mask: value
            for mask, (value, owner) in shared.items()
            if part(net, mask) == owner
        }
        made = execute(net, task.contraction, tensors, local)
        results[task.contraction.node] = made
        for mask, value in local.items():
            if mask not in shared:
                shared[mask] = (value, part(net, mask))
    return results


def gradients(
    network: Network,
    summed: Tuple[int, ...],
    per_sample: Tuple[int, ...],
    batch: str,
    tensors: Dict[int, Tensor],
    store: Dict[int, Tuple[Tensor, str]],
) -> Dict[int, Tensor]:
    """Plan (cached) and run summed and per-sample gradients from saved ``store``.

    ``tensors`` holds every operand and, at the output node, its gradient.
    """
    itemsize = tensors[network.output_node].element_size()
    tasks, _ = plan_mixed(
        network, itemsize, summed, per_sample, batch, frozenset(store)
    )
    return run_mixed(network, tasks, tensors, store)
