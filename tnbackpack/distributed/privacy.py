"""DP-SGD's clipped, noised, averaged gradient, across processes.

Each process clips the per-sample gradients of its shard (``grad_batch`` from
``BatchGrad`` with a sum-reduced loss) to norm ``C`` and sums them; one
all-reduce adds the sums (and counts the samples) over processes; then every
process adds the *same* Gaussian noise of standard deviation ``σ·C``, drawn
from a generator seeded identically everywhere, and divides by the global
batch size. Clipping is per sample, so this equals one process clipping the
whole batch (up to the order of floating-point additions), and the noise is
added once, exactly as in one process with the same generator.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .groups import private_group, resolve_group, run_collective

__all__ = ["PrivateGradient", "generator_checksum"]


def generator_checksum(generator: torch.Generator) -> int:
    """A number that differs between generators in different states."""
    state = generator.get_state().to(torch.int64)
    weights = torch.arange(1, state.numel() + 1, dtype=torch.int64)
    return int((state * weights).sum())


class PrivateGradient:
    """Set ``.grad`` to DP-SGD's clipped, noised mean gradient of all processes.

    Call it after a backward pass of a sum-reduced loss inside
    ``with backpack(BatchGrad())``. Under DDP, run that backward pass inside
    ``ddp_model.no_sync()``: DDP's own gradient all-reduce would be wasted
    (the result here replaces ``.grad``).

    Args:
        parameters: The trained parameters; their order is the order in which
            noise is drawn.
        clip: ``C``, the largest norm of a sample's gradient.
        noise_multiplier: ``σ``; the noise has standard deviation ``σ·C``.
        generator: Source of the noise; seed it identically on every process
            (checked at every call).
        process_group: The processes to average over (default: all, if
            ``torch.distributed`` is initialized; else this process alone).
        timeout: Seconds a collective may wait for the other processes.

    Raises:
        ValueError: If ``clip`` or ``noise_multiplier`` is out of range.
    """

    def __init__(
        self,
        parameters: Iterable[nn.Parameter],
        clip: float,
        noise_multiplier: float,
        generator: torch.Generator,
        process_group: Optional[Any] = None,
        timeout: float = 300.0,
    ) -> None:
        if clip <= 0:
            raise ValueError(f"clip must be positive, got {clip}")
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        self.params = [p for p in parameters if p.requires_grad]
        self.clip = clip
        self.noise_multiplier = noise_multiplier
        self.generator = generator
        group = resolve_group(process_group)
        self.group = None if group is None else private_group(group, timeout)
        self.rank = 0 if group is None else dist.get_rank(group)

    def __call__(self) -> Tensor:
        """Clip, sum, all-reduce, noise, average; set every ``.grad``.

        Returns:
            The norms of this process's per-sample gradients before clipping.

        Raises:
            ValueError: If a parameter has no ``grad_batch``, or the noise
                generators of the processes are in different states.
            RuntimeError: If a collective fails or times out.
        """
        missing = [i for i, p in enumerate(self.params) if not hasattr(p, "grad_batch")]
        if missing:
            raise ValueError(
                f"parameters {missing} have no grad_batch: run the backward pass "
                f"inside `with backpack(BatchGrad())`"
            )
        batches = [p.grad_batch for p in self.params]
        norms = torch.stack([g.flatten(1).square().sum(1) for g in batches]).sum(0)
        norms = norms.sqrt()
        scale = (self.clip / (norms + 1e-12)).clamp(max=1.0)
        sums = torch.cat(
            [torch.einsum("n,n...->...", scale, g).flatten() for g in batches]
        )
        count = len(norms)
        if self.group is not None:
            count = self._all_reduce(sums, count)
        for param, piece in zip(
            self.params, sums.split([p.numel() for p in self.params])
        ):
            noise = torch.randn(
                param.shape, generator=self.generator, dtype=param.dtype
            ).to(param.device)
            param.grad = (
                piece.view_as(param) + self.noise_multiplier * self.clip * noise
            ) / count
        return norms

    def _all_reduce(self, sums: Tensor, count: int) -> int:
        """Sum ``sums`` in place over processes; return the global sample count."""
        meta = torch.tensor(
            [count, generator_checksum(self.generator)], device=sums.device
        )
        table = [torch.empty_like(meta) for _ in range(dist.get_world_size(self.group))]
        run_collective(
            "PrivateGradient",
            self.rank,
            "exchanging batch sizes",
            dist.all_gather,
            table,
            meta,
            group=self.group,
        )
        checksums = [int(row[1]) for row in table]
        if len(set(checksums)) > 1:
            raise ValueError(
                "PrivateGradient: the noise generators are in different states on "
                f"different processes (checksums by rank: {checksums}); seed them "
                "identically (torch.Generator().manual_seed(s) with the same s)"
            )
        run_collective(
            "PrivateGradient",
            self.rank,
            "summing clipped gradients",
            dist.all_reduce,
            sums,
            group=self.group,
        )
        return int(sum(int(row[0]) for row in table))
