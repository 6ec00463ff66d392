"""K-FAC(reduce) training of the demo CNN on digits across processes.

Launch with torchrun (one CPU thread per process)::

    torchrun --nproc-per-node 2 examples/train_distributed.py [--epochs 3]
    python examples/train_distributed.py          # one process only

Every step the global batch of 64 samples is split evenly over the processes;
the model is wrapped in ``DistributedDataParallel`` (gradients averaged) and
``KFACPreconditioner`` averages the Kronecker factors and shares the
eigendecompositions. Before the distributed run, rank 0 trains the same model
on the whole batches alone (the other processes wait in
``init_process_group``), so the output compares the two: test accuracy,
mean time per step (eigendecomposition refreshes included) and the largest
difference between the final parameters. KFAC draws Monte-Carlo samples of
the loss Hessian, different ones on a shard than on the whole batch, so the
two trajectories differ; with ``--curvature kflr`` (exact GGN square root)
they compute the same steps up to rounding.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import KFAC_LR, SEED, accuracy, batches, cnn, digits  # noqa: E402

from tnbackpack import backpack, extend  # noqa: E402
from tnbackpack.extensions import KFAC, KFLR  # noqa: E402
from tnbackpack.optim import KFACPreconditioner  # noqa: E402

warnings.filterwarnings("ignore", message="Full backward hook is firing")
BATCH = 64
OPTIONS = dict(damping=1e-2, update_every=10, ema=0.95, kl_clip=1e-2, lr=KFAC_LR)


def train(
    data: Tuple[Tensor, Tensor, Tensor, Tensor],
    epochs: int,
    rank: int = 0,
    world_size: int = 1,
    curvature: str = "kfac",
) -> Dict[str, object]:
    """Train on this process's share of every batch; returns what ``report`` shows."""
    X_train, y_train, X_test, y_test = data
    torch.manual_seed(SEED)  # same initialization on every process and run
    model = extend(cnn())  # extend the inner module, then wrap it
    trained = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    loss_function = extend(nn.CrossEntropyLoss())
    preconditioner = KFACPreconditioner(trained, savefield=curvature, **OPTIONS)
    extension = {"kfac": KFAC, "kflr": KFLR}[curvature]
    optimizer = torch.optim.SGD(model.parameters(), lr=KFAC_LR)
    seconds: List[float] = []
    sent: List[Dict[str, int]] = []
    share = BATCH // world_size
    for epoch in range(epochs):
        for index in batches(len(X_train), BATCH, epoch):
            if len(index) < BATCH:
                continue  # equal shares make the average exact
            mine = index[rank * share : (rank + 1) * share]
            start = time.perf_counter()
            optimizer.zero_grad()
            loss = loss_function(trained(X_train[mine]), y_train[mine])
            with backpack(extension(kfac_approx="reduce")):
                loss.backward()
            preconditioner.step()
            optimizer.step()
            seconds.append(time.perf_counter() - start)
            if preconditioner.sync is not None:
                sent.append(dict(preconditioner.sync.sent))
    return {
        "accuracy": accuracy(model, X_test, y_test),
        "ms": 1e3 * statistics.mean(seconds[3:] or seconds),  # 3 warm-up steps
        "params": [p.detach().clone() for p in model.parameters()],
        "sent": sent,
        "steps": len(seconds),
    }


def report(single: Optional[Dict], multi: Optional[Dict], world_size: int) -> None:
    """Print accuracy, time per step and communication of both runs."""
    rows = [(1, single), (world_size, multi)] if multi else [(1, single)]
    print(f"K-FAC(reduce) factors, global batch {BATCH}, one thread per process")
    for processes, run in rows:
        if run is None:
            continue
        print(
            f"  {processes} process(es): test accuracy {100 * run['accuracy']:.1f}%, "
            f"{run['ms']:.2f} ms per step (mean of {run['steps']})"
        )
    if single and multi:
        ratio = multi["ms"] / single["ms"]
        print(f"  time per step, {world_size} processes / 1 process: {ratio:.2f}")
        gap = max(
            (a - b).abs().max().item()
            for a, b in zip(single["params"], multi["params"])
        )
        print(f"  largest difference of the final parameters: {gap:.1e}")
    if multi and multi["sent"]:
        sent = multi["sent"]
        factors = statistics.median(s["factors"] for s in sent)
        eigen = sum(s["eigen"] for s in sent) / len(sent)
        print(
            f"  rank 0 sent per step: factors {factors / 1e3:.0f} kB (all-reduce "
            f"payload), eigendecompositions {eigen / 1e3:.0f} kB on average"
        )


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Optional[Dict]]:
    """Train on 1 process (rank 0) and, under torchrun, on all; print both."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one epoch")
    parser.add_argument(
        "--curvature",
        choices=("kfac", "kflr"),
        default="kfac",
        help="kfac: Monte-Carlo GGN (as the demo); kflr: exact GGN square root",
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the 1-process run"
    )
    args = parser.parse_args(argv)
    epochs = 1 if args.quick else args.epochs
    torch.set_num_threads(1)
    data = digits()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    single = multi = None
    if rank == 0 and not (args.no_baseline and world_size > 1):
        single = train(
            data, epochs, curvature=args.curvature
        )  # before the others join: a quiet machine
    if world_size > 1:
        dist.init_process_group("gloo")
        try:
            multi = train(data, epochs, dist.get_rank(), world_size, args.curvature)
        finally:
            dist.destroy_process_group()
    if rank == 0:
        report(single, multi, world_size)
    return {"single": single, "multi": multi}


if __name__ == "__main__":
    main()
