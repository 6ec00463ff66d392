"""Data-parallel K-FAC: average Kronecker factors over processes, share inverses.

:class:`~tnbackpack.optim.KFACPreconditioner` creates a :class:`FactorSync`
when ``torch.distributed`` is initialized (or a process group is given). Each
process computes its factors with the extensions on its own shard of the
batch; then, per step:

1. **Factors** (every step that has them): one all-reduce per bucket of
   factors (the upper triangles only: factors are symmetric), launched
   asynchronously from a backward hook as soon as every factor of the bucket
   has arrived, so it overlaps with the rest of the backward pass. Buckets
   hold the parameters in reverse registration order (the order backward
   produces them) up to ``bucket_cap_mb``. Sums are divided by the number of
   processes: with equal shards and a mean-reduced loss this gives the
   factors of the whole batch.
2. **Metadata** (every step, before waiting for the factors): one small
   all-gather on a second communicator of which factors each process has and
   whether they fit. A process whose factor is missing or has the wrong
   shape makes every process raise the same clear error (after the factor
   messages are drained) instead of hanging or mixing unrelated tensors.
3. **Eigendecompositions** (on the steps that refresh them): each
   parameter's factors are eigendecomposed on one process, chosen by
   :func:`assign_by_cost`, and one broadcast per process sends its results to
   the others. With ``distribute_inverses=False`` every process
   eigendecomposes everything instead and nothing is sent.

The preconditioned gradients are then computed locally and are identical on
every process (the gradients themselves are averaged by DDP).

The communicators are private: two groups created over the ranks of the
user's group with ``use_local_synchronization``, so that their messages never
interleave with DDP's gradient all-reduces, and with their own ``timeout``.
Before the first step the processes compare their parameter layouts and
refuse to start if the models differ.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .groups import private_group, resolve_group, run_collective

__all__ = ["FactorSync", "assign_by_cost", "inverse_cost", "packed_size"]

Shape = Tuple[int, int, int]

ABSENT, PRESENT, MISFIT = 0, 1, 2  # per-factor status exchanged every step


def packed_size(shape: Shape) -> int:
    """Entries of the upper triangles of a stacked ``[G, d, d]`` factor."""
    groups, size, _ = shape
    return groups * size * (size + 1) // 2


def inverse_cost(shapes: Sequence[Shape]) -> int:
    """Cost model of eigendecomposing one parameter's factors: ``Σ G·d³``."""
    return sum(groups * size**3 for groups, size, _ in shapes)


def assign_by_cost(costs: Sequence[float], world_size: int) -> List[int]:
    """Owner rank of each task: longest processing time first.

    Tasks are taken in order of decreasing cost (ties: lower index first) and
    each goes to the rank with the least total cost so far (ties: lower rank).
    The largest load is at most 4/3 of the optimum (Graham, 1969). The result
    depends only on the arguments, so every process computes the same one.
    """
    owners = [0] * len(costs)
    loads = [0.0] * world_size
    for task in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[task] = rank
        loads[rank] += costs[task]
    return owners


@cache
def _triu(size: int) -> Tuple[Tensor, Tensor]:
    """Row and column indices of a ``size × size`` upper triangle (cached)."""
    rows, cols = torch.triu_indices(size, size)
    return rows, cols


class _Bucket:
    """Parameters whose factors travel in one all-reduce."""

    def __init__(self, blocks: List[int]) -> None:
        self.blocks = blocks
        self.work: Optional[Any] = None
        self.buffer: Optional[Tensor] = None


class FactorSync:
    """The communication of one :class:`~tnbackpack.optim.KFACPreconditioner`.

    Created by the preconditioner (see :meth:`create`); not used directly.

    Attributes:
        rank: This process's rank in the group.
        world_size: Number of processes.
        owners: For each preconditioned parameter, the rank that
            eigendecomposes its factors.
        sent: Bytes this process contributed to the last step's messages:
            ``factors`` (all-reduce payload), ``eigen`` (broadcast from this
            rank) and ``metadata``. An all-reduce of ``P`` bytes moves about
            ``2·P·(R−1)/R`` bytes in and out of each process (ring algorithm).
    """

    def __init__(
        self,
        preconditioner: Any,
        shapes: List[List[Shape]],
        group: Any,
        distribute_inverses: bool,
        bucket_cap_mb: float,
        timeout: float,
    ) -> None:
        self.pre = preconditioner
        self.blocks = preconditioner.blocks
        self.shapes = shapes
        self.distribute_inverses = distribute_inverses
        self.timeout = timeout
        self.ranks = dist.get_process_group_ranks(group)
        self.rank = dist.get_rank(group)
        self.world_size = len(self.ranks)
        self.data_group = private_group(group, timeout)
        self.meta_group = private_group(group, timeout)
        self._check_layouts()
        self.buckets = self._make_buckets(bucket_cap_mb)
        self.bucket_of = {
            i: b for b, bucket in enumerate(self.buckets) for i in bucket.blocks
        }
        self.owners = assign_by_cost([inverse_cost(s) for s in shapes], self.world_size)
        self.sent: Dict[str, int] = {"factors": 0, "eigen": 0, "metadata": 0}
        self._reset_round()
        self._hooks = []
        by_module: Dict[int, List[int]] = {}
        for index, block in enumerate(self.blocks):
            by_module.setdefault(id(block.module), []).append(index)
        for indices in by_module.values():
            module = self.blocks[indices[0]].module
            # Registered after `extend`'s hook, so BackPACK has stored the
            # factors when it runs; if not, step() picks them up instead.
            hook = self._make_hook(indices)
            self._hooks.append(module.register_full_backward_hook(hook))

    @classmethod
    def create(
        cls,
        preconditioner: Any,
        shapes: List[List[Shape]],
        process_group: Optional[Any],
        distribute_inverses: bool = True,
        bucket_cap_mb: float = 25.0,
        timeout: float = 300.0,
    ) -> Optional[FactorSync]:
        """A :class:`FactorSync`, or ``None`` when there is nothing to share.

        Args:
            preconditioner: The owner; its ``blocks``, ``savefield`` and
                ``_read_factors`` are used.
            shapes: Expected ``[G, d, d]`` shape of each block's factors.
            process_group: The group to average over; ``None``: the default
                group if ``torch.distributed`` is initialized.
            distribute_inverses: Spread the eigendecompositions over ranks.
            bucket_cap_mb: Largest factor all-reduce, in MiB.
            timeout: Seconds before a collective gives up.

        Raises:
            ValueError: If an option is out of range, ``process_group`` is
                given without an initialized ``torch.distributed``, or the
                processes' models differ.
        """
        if bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        group = resolve_group(process_group)
        if group is None or not shapes:
            return None
        return cls(
            preconditioner,
            shapes,
            group,
            distribute_inverses,
            bucket_cap_mb,
            timeout,
        )

    # ----------------------------------------------------------------- set-up
    def _check_layouts(self) -> None:
        """Refuse to start if the processes' preconditioned parameters differ."""
        mine = [
            (block.name, tuple(block.param.shape), str(block.param.dtype))
            for block in self.blocks
        ]
        layouts: List[Any] = [None] * self.world_size
        self._collective(
            "comparing the models",
            dist.all_gather_object,
            layouts,
            mine,
            group=self.meta_group,
        )
        for rank, layout in enumerate(layouts):
            if layout == mine:
                continue
            extra = [p for p in layout if p not in mine] + [
                p for p in mine if p not in layout
            ]
            raise ValueError(
                f"KFACPreconditioner: rank {rank}'s model differs from rank "
                f"{self.rank}'s (parameters (name, shape, dtype) in one but not "
                f"the other: {extra[:4]}); every process needs the same model"
            )

    def _make_buckets(self, cap_mb: float) -> List[_Bucket]:
        cap = cap_mb * 2**20
        buckets: List[_Bucket] = []
        current: List[int] = []
        size, dtype = 0, None
        for index in reversed(range(len(self.blocks))):  # backward order
            param = self.blocks[index].param
            nbytes = sum(map(packed_size, self.shapes[index])) * param.element_size()
            if current and (size + nbytes > cap or param.dtype != dtype):
                buckets.append(_Bucket(current))
                current, size = [], 0
            current.append(index)
            size += nbytes
            dtype = param.dtype
        if current:
            buckets.append(_Bucket(current))
        return buckets

    def _make_hook(self, indices: List[int]):
        def hook(module, grad_input, grad_output) -> None:
            for index in indices:
                self._capture(index)
            self._launch_ready()

        return hook

    def remove_hooks(self) -> None:
        """Remove the backward hooks (factors are then all sent in ``step``)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ---------------------------------------------------------- one round
    def _reset_round(self) -> None:
        count = len(self.blocks)
        self._factors: List[Optional[List[Tensor]]] = [None] * count
        self._source: List[Optional[object]] = [None] * count
        self._status = [ABSENT] * count
        self._errors: Dict[int, str] = {}
        self._launched = 0  # buckets 0 .. _launched-1 are on their way
        self._stale: set = set()
        self._round_bytes = 0

    def _capture(self, index: int) -> None:
        """Take the factors that the last backward pass stored for a block."""
        block = self.blocks[index]
        stored = getattr(block.param, self.pre.savefield, None)
        if stored is None or stored is self._source[index]:
            return
        if self._source[index] is not None and self.bucket_of[index] < self._launched:
            self._stale.add(self.bucket_of[index])  # a second backward pass
        self._source[index] = stored
        try:
            factors = self.pre._read_factors(block, remove=False)
            shapes = [tuple(f.shape) for f in factors]
            if shapes != self.shapes[index]:
                raise ValueError(
                    f"{block.name}: factors of shapes {shapes}, expected "
                    f"{self.shapes[index]} (stacked per group)"
                )
        except ValueError as error:
            self._status[index], self._errors[index] = MISFIT, str(error)
            self._factors[index] = None
            return
        self._status[index], self._factors[index] = PRESENT, factors

    def _launch_ready(self) -> None:
        """Send, in bucket order, every bucket whose factors are all here."""
        while self._launched < len(self.buckets) and all(
            self._status[i] == PRESENT for i in self.buckets[self._launched].blocks
        ):
            self._launch(self._launched)
            self._launched += 1

    def _launch(self, bucket_index: int) -> None:
        bucket = self.buckets[bucket_index]
        param = self.blocks[bucket.blocks[0]].param
        sizes = [sum(map(packed_size, self.shapes[i])) for i in bucket.blocks]
        buffer = torch.zeros(sum(sizes), dtype=param.dtype, device=param.device)
        for index, piece in zip(bucket.blocks, buffer.split(sizes)):
            if self._factors[index] is None:
                continue  # absent or misfit here: zeros (the step then raises)
            parts = piece.split([packed_size(s) for s in self.shapes[index]])
            for factor, part in zip(self._factors[index], parts):
                rows, cols = _triu(factor.shape[-1])
                part.view(factor.shape[0], -1).copy_(factor[:, rows, cols])
        bucket.buffer = buffer
        bucket.work = self._collective(
            "launching a factor all-reduce",
            dist.all_reduce,
            buffer,
            group=self.data_group,
            async_op=True,
        )
        self._round_bytes += buffer.numel() * buffer.element_size()

    def average_factors(self) -> List[Optional[List[Tensor]]]:
        """The factors averaged over processes, per block (``None``: none).

        Removes the factors from the parameters, as the single-process
        preconditioner does.

        Raises:
            ValueError: If some process lacks a factor that others have, or
                a process's factor does not fit its parameter (on every
                process).
            RuntimeError: If a collective fails or times out (e.g. a process
                did not call ``step``).
        """
        for index in range(len(self.blocks)):
            self._capture(index)
            if self._source[index] is not None:
                delattr(self.blocks[index].param, self.pre.savefield)
        stale = [int(b in self._stale) for b in range(len(self.buckets))]
        device = self.blocks[0].param.device  # NCCL needs it on the GPU
        meta = torch.tensor(self._status + stale, dtype=torch.int64, device=device)
        gathered = [torch.empty_like(meta) for _ in range(self.world_size)]
        self._collective(
            "exchanging which factors each process has",
            dist.all_gather,
            gathered,
            meta,
            group=self.meta_group,
        )
        table = torch.stack(gathered).cpu()
        status = table[:, : len(self.blocks)]
        stale_anywhere = table[:, len(self.blocks) :].any(0)
        needed = [
            b
            for b, bucket in enumerate(self.buckets)
            if (status[:, bucket.blocks] != ABSENT).any()
        ]
        # Everyone sends the needed buckets in index order (those launched in
        # backward are a prefix of them), then re-sends the ones that a second
        # backward pass replaced somewhere.
        for b in needed:
            if b >= self._launched:
                self._launch(b)
        for b in needed:
            if stale_anywhere[b]:
                self._wait(b)
                self._launch(b)
        for b in needed:
            self._wait(b)
        error = self._mismatch(status)
        averaged: List[Optional[List[Tensor]]] = [None] * len(self.blocks)
        if error is None:
            for b in needed:
                self._unpack(self.buckets[b], status, averaged)
        self.sent = {
            "factors": self._round_bytes,
            "eigen": 0,
            "metadata": meta.numel() * meta.element_size(),
        }
        self._reset_round()
        for bucket in self.buckets:
            bucket.buffer, bucket.work = None, None
        if error is not None:
            raise ValueError(error)
        return averaged

    def _wait(self, bucket_index: int) -> None:
        bucket = self.buckets[bucket_index]
        if bucket.work is not None:
            self._collective("waiting for a factor all-reduce", bucket.work.wait)
            bucket.work = None

    def _mismatch(self, status: Tensor) -> Optional[str]:
        """The error message if the processes' factors do not agree."""
        for index, block in enumerate(self.blocks):
            column = status[:, index].tolist()
            misfit = [r for r, s in enumerate(column) if s == MISFIT]
            if misfit:
                detail = f": {self._errors[index]}" if index in self._errors else ""
                return (
                    f"KFACPreconditioner: the Kronecker factors of {block.name} do "
                    f"not fit the parameter on rank(s) {misfit}{detail}"
                )
            absent = [r for r, s in enumerate(column) if s == ABSENT]
            if 0 < len(absent) < self.world_size:
                present = [r for r in range(self.world_size) if r not in absent]
                return (
                    f"KFACPreconditioner: Kronecker factors of {block.name} "
                    f"(savefield '{self.pre.savefield}') arrived on rank(s) "
                    f"{present} but are missing on rank(s) {absent}: every process "
                    f"must run the same extension through the same layers before "
                    f"step()"
                )
        return None

    def _unpack(
        self,
        bucket: _Bucket,
        status: Tensor,
        out: List[Optional[List[Tensor]]],
    ) -> None:
        sizes = [sum(map(packed_size, self.shapes[i])) for i in bucket.blocks]
        summed = bucket.buffer / self.world_size
        for index, piece in zip(bucket.blocks, summed.split(sizes)):
            if (status[:, index] == ABSENT).all():
                continue
            parts = piece.split([packed_size(s) for s in self.shapes[index]])
            factors = []
            for shape, part in zip(self.shapes[index], parts):
                rows, cols = _triu(shape[-1])
                full = part.new_zeros(shape)
                upper = part.view(shape[0], -1)
                full[:, rows, cols] = upper
                full[:, cols, rows] = upper
                factors.append(full)
            out[index] = factors

    # ------------------------------------------------------ eigendecompositions
    def eigendecompose(self, due: List[Any]) -> None:
        """Eigendecompose the ``due`` blocks, each on its owner, and share them.

        ``due`` must be the same on every process (it is: the running factors
        are).
        """
        from ..optim import eigendecompose  # the one implementation

        position = {id(block): i for i, block in enumerate(self.blocks)}
        by_owner: Dict[int, List[Any]] = {}
        for block in due:
            by_owner.setdefault(self.owners[position[id(block)]], []).append(block)
        for block in by_owner.get(self.rank, []):
            block.eigen = eigendecompose(block.factors)
        pending = []
        for owner in sorted(by_owner):
            blocks = by_owner[owner]
            factors = [f for block in blocks for f in block.factors]
            sizes = [f.shape[0] * f.shape[1] * (f.shape[1] + 1) for f in factors]
            buffer = factors[0].new_empty(sum(sizes))
            if owner == self.rank:
                pieces = iter(buffer.split(sizes))
                for block in blocks:
                    for values, vectors in block.eigen:
                        torch.cat(
                            [values.flatten(), vectors.flatten()], out=next(pieces)
                        )
                self.sent["eigen"] += buffer.numel() * buffer.element_size()
            work = self._collective(
                "broadcasting eigendecompositions",
                dist.broadcast,
                buffer,
                src=self.ranks[owner],
                group=self.data_group,
                async_op=True,
            )
            pending.append((blocks, sizes, buffer, work))
        for blocks, sizes, buffer, work in pending:
            self._collective("waiting for eigendecompositions", work.wait)
            # The owner too takes the received layout (eigh's eigenvectors are
            # column-major): the same strides give bitwise the same products,
            # so the parameters stay identical on every process.
            pieces = iter(buffer.split(sizes))
            for block in blocks:
                block.eigen = []
                for factor in block.factors:
                    groups, size = factor.shape[:2]
                    values, vectors = next(pieces).split(
                        [groups * size, groups * size * size]
                    )
                    block.eigen.append(
                        (values.view(groups, size), vectors.view(groups, size, size))
                    )

    def _collective(self, what: str, function, *args, **kwargs):
        return run_collective(
            "KFACPreconditioner", self.rank, what, function, *args, **kwargs
        )
