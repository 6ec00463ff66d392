"""Process groups for tnbackpack's collectives: which processes, and private ones."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, Optional

import torch.distributed as dist

__all__ = ["resolve_group", "private_group", "run_collective"]


def resolve_group(process_group: Optional[Any]) -> Optional[Any]:
    """The group to work across, or ``None`` if there is nobody to talk to.

    Args:
        process_group: A group, or ``None`` for the default group if
            ``torch.distributed`` is initialized.

    Raises:
        ValueError: If a group is given but ``torch.distributed`` is not
            initialized.
    """
    initialized = dist.is_available() and dist.is_initialized()
    if process_group is None:
        if not initialized:
            return None
        process_group = dist.group.WORLD
    elif not initialized:
        raise ValueError(
            "process_group was given but torch.distributed is not initialized: "
            "call torch.distributed.init_process_group first"
        )
    return None if dist.get_world_size(process_group) == 1 else process_group


def private_group(group: Any, timeout: float) -> Any:
    """A new group over ``group``'s ranks, with its own ``timeout`` (seconds).

    Its messages never interleave with those of other users of ``group``
    (e.g. DDP's gradient all-reduces). Over all processes it is an ordinary
    ``new_group``, which every process creates in the same order. Over a
    subgroup only its members call this (``use_local_synchronization``);
    torch then names the group after the ranks and the number of groups the
    process knows, so the members must have created the same groups before.

    Raises:
        ValueError: If ``timeout`` is not positive.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    ranks = dist.get_process_group_ranks(group)
    return dist.new_group(
        ranks=ranks,
        timeout=timedelta(seconds=timeout),
        backend=dist.get_backend(group),
        use_local_synchronization=len(ranks) < dist.get_world_size(),
    )


def run_collective(
    owner: str, rank: int, what: str, function: Callable, *args: Any, **kwargs: Any
) -> Any:
    """Run a collective; if it fails, say who and what, and suggest the cause.

    Raises:
        RuntimeError: From the collective (e.g. its timeout), with context.
    """
    try:
        return function(*args, **kwargs)
    except RuntimeError as error:
        raise RuntimeError(
            f"{owner} on rank {rank}: {what} failed: {error}. Did every process "
            f"construct it and call it the same number of times?"
        ) from error
