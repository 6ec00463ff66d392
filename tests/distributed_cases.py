"""Scenarios run both in spawned gloo processes and in one process, for comparison.

Every scenario function takes ``(rank, world_size, **config)``, trains or steps
a small float64 CNN (grouped and transposed convolutions) on rank ``rank``'s
contiguous shard of a fixed batch, and returns tensors to compare. With
``world_size == 1`` and no process group it is the single-process reference.
:func:`spawn` runs a list of scenarios in ``world_size`` fresh processes
(one spawn for all of them: a spawn costs seconds) and returns every rank's
results.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from tnbackpack import backpack, extend
from tnbackpack.extensions import KFAC, KFLR, BatchGrad
from tnbackpack.nn import FactorizedConv2d
from tnbackpack.optim import KFACPreconditioner

BATCH = 12  # divisible by 2 and 3
CLASSES = 3
Result = Dict[str, Any]


def cnn() -> nn.Sequential:
    """float64 CNN: conv, grouped conv, grouped transposed conv, linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, groups=2),
        nn.ReLU(),
        nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 12 * 12, CLASSES),
    ).double()


def factorized_cnn() -> nn.Sequential:
    """float64 CNN of :func:`cnn`'s shapes with factorized middle layers.

    A grouped CP layer (its stages with their own groups: depthwise over
    ``G·R`` channels) and a Tucker-2 layer beside an ordinary convolution.
    """
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        FactorizedConv2d(4, 6, 3, 2, "cp", groups=2),
        nn.ReLU(),
        FactorizedConv2d(6, 4, 3, (2, 3), "tucker", padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, CLASSES),
    ).double()


MODELS = {"cnn": cnn, "factorized": factorized_cnn}


def batch(step: int, dtype: torch.dtype = torch.float64) -> Tuple[Tensor, Tensor]:
    """The whole batch of step ``step``."""
    generator = torch.Generator().manual_seed(100 + step)
    X = torch.randn(BATCH, 2, 8, 8, generator=generator, dtype=dtype)
    y = torch.randint(0, CLASSES, (BATCH,), generator=generator)
    return X, y


def shard(tensor: Tensor, rank: int, world_size: int) -> Tensor:
    size = len(tensor) // world_size
    return tensor[rank * size : (rank + 1) * size]


def wrap(model: nn.Module) -> nn.Module:
    """DDP around ``model`` under torch.distributed, else ``model``."""
    if dist.is_initialized():
        return nn.parallel.DistributedDataParallel(model)
    return model


EXTENSIONS = {"kflr": KFLR, "kfac": KFAC}


def kfac_training(
    rank: int,
    world_size: int,
    extension: str = "kflr",
    approx: str = "reduce",
    steps: int = 3,
    pass_wrapper: bool = True,
    skip_extension: Tuple[int, ...] = (),
    seed_per_rank: bool = False,
    extra_pass: bool = False,
    network: str = "cnn",
    **options: Any,
) -> Result:
    """SGD preconditioned by K-FAC; parameters after every step, first factors.

    Args:
        extension: ``"kflr"`` (exact GGN square root) or ``"kfac"`` (one MC
            sample).
        pass_wrapper: Give the preconditioner the DDP wrapper (else the
            extended inner module).
        skip_extension: Steps whose backward pass runs without extension.
        seed_per_rank: Seed torch's generator (MC samples) by rank.
        extra_pass: Before each step's backward pass, one more on other
            data (its factors are replaced, as in one process).
        network: Key of :data:`MODELS`.
        options: Keyword arguments of the preconditioner.
    """
    model = extend(MODELS[network]())
    wrapped = wrap(model)
    loss_function = extend(nn.CrossEntropyLoss())
    preconditioner = KFACPreconditioner(
        wrapped if pass_wrapper else model,
        savefield=extension,
        **options,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result: Result = {"params": [], "sent": []}
    for step in range(steps):
        if seed_per_rank:
            torch.manual_seed(1000 * step + rank)
        if extra_pass:
            X, y = (shard(t, rank, world_size) for t in batch(50 + step))
            with backpack(EXTENSIONS[extension](kfac_approx=approx)):
                loss_function(wrapped(X), y).backward()
        X, y = (shard(t, rank, world_size) for t in batch(step))
        optimizer.zero_grad()
        loss = loss_function(wrapped(X), y)
        if step in skip_extension:
            loss.backward()
        else:
            with backpack(EXTENSIONS[extension](kfac_approx=approx)):
                loss.backward()
        result.setdefault("grads", [p.grad.clone() for p in model.parameters()])
        if preconditioner.sync is not None:  # buckets sent from backward hooks
            result.setdefault("launched_in_backward", preconditioner.sync._launched)
            result.setdefault("buckets", len(preconditioner.sync.buckets))
        preconditioner.step()
        if step == 0:
            result["factors"] = {
                name: [f.clone() for f in factors]
                for name, factors in preconditioner.state().items()
            }
            result["update"] = [p.grad.clone() for p in model.parameters()]
        if preconditioner.sync is not None:
            result["sent"].append(dict(preconditioner.sync.sent))
        optimizer.step()
        result["params"].append([p.detach().clone() for p in model.parameters()])
    return result


def private_training(
    rank: int, world_size: int, dtype: str = "float64", steps: int = 2
) -> Result:
    """DP-SGD steps with :class:`PrivateGradient` (DDP, ``no_sync``)."""
    from tnbackpack.distributed import PrivateGradient

    model = extend(cnn().to(getattr(torch, dtype)))
    wrapped = wrap(model)
    loss_function = extend(nn.CrossEntropyLoss(reduction="sum"))
    generator = torch.Generator().manual_seed(7)
    private = PrivateGradient(model.parameters(), 1.0, 0.5, generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    result: Result = {"grads": [], "norms": []}
    for step in range(steps):
        X, y = (shard(t, rank, world_size) for t in batch(step, model[0].weight.dtype))
        optimizer.zero_grad()
        context = wrapped.no_sync() if dist.is_initialized() else _nothing()
        with context, backpack(BatchGrad()):
            loss_function(wrapped(X), y).backward()
        result["norms"].append(private())
        result["grads"].append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
    return result


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: Any) -> None:
        return None


def _kflr_backward(model: nn.Module, rank: int, world_size: int) -> None:
    X, y = (shard(t, rank, world_size) for t in batch(0))
    model.zero_grad()
    with backpack(KFLR(kfac_approx="reduce")):
        extend(nn.CrossEntropyLoss())(model(X), y).backward()


def _outcome(action: Callable[[], Any]) -> Dict[str, Any]:
    """What ``action`` raised (type and message) and how long it took."""
    start = time.perf_counter()
    try:
        action()
        error = None
    except Exception as caught:
        error = (type(caught).__name__, str(caught))
    return {"error": error, "seconds": time.perf_counter() - start}


def failures(rank: int, world_size: int) -> Result:
    """Rank 1 misbehaves in several ways; every rank records what it saw.

    Rank 1 removes its hooks (its factors are read in ``step``) while rank 0
    sends its buckets from backward, so the cases also check that mixed
    launch orders meet.
    """
    result: Result = {}
    # A group of rank 0 alone: processes then know different numbers of
    # groups, which must not derail the preconditioner's own groups.
    dist.new_group([0])
    model = extend(cnn())
    pre = KFACPreconditioner(model, savefield="kflr", bucket_cap_mb=0.01, timeout=20)
    result["buckets"] = len(pre.sync.buckets)
    if rank == 1:
        pre.remove_hooks()
    layer = model[2]  # the grouped convolution

    _kflr_backward(model, rank, world_size)
    if rank == 1:
        del layer.weight.kflr
    result["missing"] = _outcome(pre.step)

    _kflr_backward(model, rank, world_size)
    if rank == 1:
        B, A = layer.weight.kflr
        layer.weight.kflr = [B, A[:, :-1, :-1]]
    result["misfit"] = _outcome(pre.step)

    # after the errors the communicators still work
    _kflr_backward(model, rank, world_size)
    result["recovered"] = _outcome(pre.step)
    result["factors"] = pre.state()

    other = cnn() if rank == 0 else nn.Sequential(nn.Linear(4, 5)).double()
    result["layout"] = _outcome(lambda: KFACPreconditioner(other, timeout=20))

    # Preconditioner before `extend`: its hooks run before BackPACK's, so
    # the factors are all sent from step(); same result.
    early_model = cnn()
    early = KFACPreconditioner(early_model, savefield="kflr", ema=0.0)
    extend(early_model)
    _kflr_backward(early_model, rank, world_size)
    result["early_launched"] = early.sync._launched
    early.step()
    late_model = extend(cnn())
    late = KFACPreconditioner(late_model, savefield="kflr", ema=0.0)
    _kflr_backward(late_model, rank, world_size)
    result["late_launched"] = late.sync._launched
    late.step()
    result["early"], result["late"] = early.state(), late.state()

    impatient = KFACPreconditioner(model, savefield="kflr", timeout=2)
    _kflr_backward(model, rank, world_size)
    if rank == 0:  # rank 1 never calls step()
        result["timeout"] = _outcome(impatient.step)
    dist.barrier()
    return result


SCENARIOS: Dict[str, Callable[..., Result]] = {
    "kfac": kfac_training,
    "private": private_training,
    "failures": failures,
}


def run(rank: int, world_size: int, plan: List[Tuple[str, Dict[str, Any]]]) -> list:
    """Run every scenario of ``plan``; an exception is returned, not raised."""
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    results = []
    for name, config in plan:
        try:
            results.append(SCENARIOS[name](rank, world_size, **config))
        except Exception as error:  # reported to the parent
            results.append(
                {
                    "error": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc(),
                }
            )
    return results


def _entry(rank: int, world_size: int, port: int, folder: str, plan: list) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        torch.save(run(rank, world_size, plan), os.path.join(folder, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spawn(world_size: int, plan: List[Tuple[str, Dict[str, Any]]]) -> List[list]:
    """Run ``plan`` in ``world_size`` gloo processes; results by rank."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(
            _entry,
            args=(world_size, free_port(), folder, plan),
            nprocs=world_size,
            join=True,
        )
        return [
            torch.load(os.path.join(folder, f"{rank}.pt"), weights_only=False)
            for rank in range(world_size)
        ]
