"""Distributed K-FAC: time per step on 1 vs N processes, bytes sent per step.

Launch with torchrun; one CPU thread per process::

    torchrun --nproc-per-node 2 examples/bench_distributed.py [--rounds 7]

1. **Time per step** of the demo CNN on digits (global batch 64), four ways,
   interleaved round by round so that changes in machine load hit all alike:
   SGD and K-FAC(reduce) on one process (rank 0 alone on the whole batch; the
   others wait at a barrier) and on all processes (DDP, each on its share).
   A round is 10 steps (one eigendecomposition refresh); the table shows the
   median over rounds of the mean time per step, and the ratios.
2. **Bytes per step per rank** as layer sizes grow: a CNN of two 3×3
   convolutions with ``c`` channels (``A`` is ``9c × 9c``), measured from
   :attr:`FactorSync.sent`, next to the volumes of kfac-pytorch's
   implementation for the same layers (read from its source, defaults:
   full factors unless ``symmetry_aware``; COMM-OPT broadcasts ``Q_A, d_A,
   Q_G`` and the ``d_G d_Aᵀ`` outer product per refresh; MEM-OPT broadcasts
   the preconditioned gradient every step instead). Payload bytes: a ring
   all-reduce of ``P`` bytes moves about ``2P(R−1)/R`` in and out of each rank.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import KFAC_LR, SEED, cnn, digits  # noqa: E402

from tnbackpack import backpack, extend  # noqa: E402
from tnbackpack.extensions import KFAC  # noqa: E402
from tnbackpack.optim import KFACPreconditioner  # noqa: E402

warnings.filterwarnings("ignore", message="Full backward hook is firing")
BATCH, STEPS = 64, 10
OPTIONS = dict(damping=1e-2, update_every=STEPS, ema=0.95, kl_clip=1e-2, lr=KFAC_LR)


class Trainer:
    """One of the four contenders: its model, data share and step function."""

    def __init__(self, kfac: bool, group, rank: int, world_size: int) -> None:
        torch.manual_seed(SEED)
        self.model = extend(cnn())
        distributed = world_size > 1
        self.trained = (
            nn.parallel.DistributedDataParallel(self.model, process_group=group)
            if distributed
            else self.model
        )
        self.loss_function = extend(nn.CrossEntropyLoss())
        self.pre = (
            KFACPreconditioner(self.trained, process_group=group, **OPTIONS)
            if kfac
            else None
        )
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05)
        self.share = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)

    def steps(self, X: torch.Tensor, y: torch.Tensor) -> float:
        """Mean seconds per step over ``STEPS`` steps on consecutive batches."""
        start = time.perf_counter()
        for step in range(STEPS):
            index = slice(step * BATCH, (step + 1) * BATCH)
            Xs, ys = X[index][self.share], y[index][self.share]
            self.optimizer.zero_grad()
            loss = self.loss_function(self.trained(Xs), ys)
            if self.pre is None:
                loss.backward()
            else:
                with backpack(KFAC(kfac_approx="reduce")):
                    loss.backward()
                self.pre.step()
            self.optimizer.step()
        return (time.perf_counter() - start) / STEPS


def time_per_step(rounds: int, rank: int, world_size: int) -> Optional[Dict]:
    X, y = digits()[:2]
    solo = dist.new_group([0])  # a 1-process group: no communication
    trainers = {}
    for kfac in (False, True):
        if rank == 0:
            trainers[("1", kfac)] = Trainer(kfac, solo, 0, 1)
        trainers[("N", kfac)] = Trainer(kfac, dist.group.WORLD, rank, world_size)
    samples: Dict[tuple, List[float]] = {key: [] for key in trainers}
    for _ in range(rounds + 1):  # the first round warms up
        for kfac in (False, True):
            if rank == 0:
                samples[("1", kfac)].append(trainers[("1", kfac)].steps(X, y))
            dist.barrier()
            samples[("N", kfac)].append(trainers[("N", kfac)].steps(X, y))
            dist.barrier()
    return {key: statistics.median(s[1:]) for key, s in samples.items()}


def conv_net(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.Flatten(),
    )


def kfac_pytorch_bytes(channels: int, element: int = 4) -> Dict[str, float]:
    """kfac-pytorch's volumes for ``conv_net`` (bias folded into ``A``)."""
    d_a, d_g = 9 * channels + 1, channels
    full = 2 * (d_a**2 + d_g**2)  # two layers
    triangles = 2 * (d_a * (d_a + 1) // 2 + d_g * (d_g + 1) // 2)
    eigen = 2 * (d_a**2 + d_a + d_g**2 + d_g * d_a)
    gradient = 2 * d_g * d_a
    return {
        "factors": element * full,
        "factors_symmetric": element * triangles,
        "eigen": element * eigen,
        "gradient": element * gradient,
    }


def bytes_per_step(widths: Sequence[int], rank: int, world_size: int) -> List[Dict]:
    rows = []
    for channels in widths:
        torch.manual_seed(SEED)
        model = extend(conv_net(channels))
        pre = KFACPreconditioner(model, **dict(OPTIONS, update_every=1))
        X = torch.randn(8, channels, 8, 8)
        with backpack(KFAC(kfac_approx="reduce")):
            extend(nn.MSELoss())(model(X), torch.zeros(8, channels * 64)).backward()
        pre.step()
        eigen = torch.tensor(float(pre.sync.sent["eigen"]))
        dist.all_reduce(eigen)  # every rank's share of the broadcasts
        rows.append(
            {
                "channels": channels,
                "factors": pre.sync.sent["factors"],
                "eigen_total": eigen.item(),
                "eigen_rank": pre.sync.sent["eigen"],
                "kfac_pytorch": kfac_pytorch_bytes(channels),
            }
        )
        pre.remove_hooks()
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64, 128])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    try:
        times = time_per_step(args.rounds, rank, world_size)
        volumes = bytes_per_step(args.widths, rank, world_size)
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return
    print(f"Time per step, demo CNN on digits, global batch {BATCH}, 1 thread/process")
    print(f"(median over {args.rounds} rounds of {STEPS} steps, interleaved)")
    print(f"| optimizer | 1 process (ms) | {world_size} processes (ms) | ratio |")
    print("|---|---|---|---|")
    for kfac, name in ((False, "SGD"), (True, "K-FAC(reduce)")):
        one, many = 1e3 * times[("1", kfac)], 1e3 * times[("N", kfac)]
        print(f"| {name} | {one:.2f} | {many:.2f} | {many / one:.2f} |")
    print("\nBytes per step per rank (payload, float32), two 3x3 convs c -> c")
    print(
        "| c | A size | tnbackpack factors | kfac-pytorch factors (full / symmetric) "
        "| tnbackpack eigen, all owners | kfac-pytorch eigen (COMM-OPT) "
        "| kfac-pytorch gradient (MEM-OPT) |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in volumes:
        other = row["kfac_pytorch"]
        kb = {key: f"{value / 1e3:.0f}" for key, value in other.items()}
        print(
            f"| {row['channels']} | {9 * row['channels']} "
            f"| {row['factors'] / 1e3:.0f} kB "
            f"| {kb['factors']} / {kb['factors_symmetric']} kB "
            f"| {row['eigen_total'] / 1e3:.0f} kB | {kb['eigen']} kB "
            f"| {kb['gradient']} kB |"
        )


if __name__ == "__main__":
    main()
