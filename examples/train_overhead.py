"""Overhead of KFAC(reduce) + BatchL2Grad in a training loop, vs plain backward.

All-CNN-C (DeepOBS, CIFAR-100 shapes: 3x32x32 inputs, 100 classes), batch 32,
random data, SGD, one CPU thread. The two loops train two copies of the same
network; their steps are interleaved (plain step, extended step, plain step,
...) so that a change in machine load hits both alike. Two warm-up steps each
(engine plans and caches) are not counted.

    python examples/train_overhead.py [--steps 20] [--batch 32] [--threads 1]

Prints the per-step times and the ratio extended / plain (target: <= 1.5).
"""

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from tnbackpack import backpack, extend
from tnbackpack.benchmark.cases import deepobs_allcnnc
from tnbackpack.extensions import KFAC, BatchL2Grad


def step(model, loss_function, optimizer, x, y, extensions=()):
    """One SGD step; returns its wall time in seconds."""
    start = time.perf_counter()
    optimizer.zero_grad()
    loss = loss_function(model(x), y)
    if extensions:
        with backpack(*extensions):
            loss.backward()
    else:
        loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def conv_operands(model, convs, x):
    """Input and a random output gradient of every conv (for the floor)."""
    operands = []

    def keep(module, args, output):
        operands.append((module, args[0], torch.randn_like(output)))

    handles = [conv.register_forward_hook(keep) for conv in convs]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return operands


def extra_conv_work(operands):
    """Wall time of the work an extended step must add at the least.

    KFAC's sampled column is backpropagated through every conv but the first
    (one input VJP each); the per-sample gradients cost at least one summed
    weight VJP each. Both timed with PyTorch's own backward kernels.
    """
    start = time.perf_counter()
    for index, (conv, x, grad_output) in enumerate(operands):
        kwargs = dict(stride=conv.stride, padding=conv.padding)
        torch.nn.grad.conv2d_weight(x, conv.weight.shape, grad_output, **kwargs)
        if index > 0:
            torch.nn.grad.conv2d_input(x.shape, conv.weight, grad_output, **kwargs)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    plain_model = deepobs_allcnnc()
    extended_model = extend(copy.deepcopy(plain_model))
    plain_loss, extended_loss = nn.CrossEntropyLoss(), extend(nn.CrossEntropyLoss())
    plain_sgd = torch.optim.SGD(plain_model.parameters(), lr=0.01)
    extended_sgd = torch.optim.SGD(extended_model.parameters(), lr=0.01)
    extensions = (KFAC(kfac_approx="reduce"), BatchL2Grad())

    convs = [m for m in plain_model if isinstance(m, nn.Conv2d)]
    operands = conv_operands(plain_model, convs, torch.randn(args.batch, 3, 32, 32))
    plain_times, extended_times, floor_times = [], [], []
    for index in range(args.warmup + args.steps):
        x = torch.randn(args.batch, 3, 32, 32)
        y = torch.randint(100, (args.batch,))
        plain = step(plain_model, plain_loss, plain_sgd, x, y)
        extended = step(extended_model, extended_loss, extended_sgd, x, y, extensions)
        floor = extra_conv_work(operands)
        if index >= args.warmup:
            plain_times.append(plain)
            extended_times.append(extended)
            floor_times.append(plain + floor)

    conv = extended_model[0]
    assert len(conv.weight.kfac) == 2 and conv.weight.batch_l2.shape == (args.batch,)
    total_ratio = sum(extended_times) / sum(plain_times)
    median_ratio = statistics.median(extended_times) / statistics.median(plain_times)
    print(
        f"All-CNN-C, batch {args.batch}, {args.threads} thread(s), {args.steps} steps"
    )
    for label, times in (
        ("plain backward", plain_times),
        ("KFAC(reduce) + BatchL2Grad", extended_times),
    ):
        print(f"{label + ':':28s} {1e3 * statistics.median(times):8.1f} ms/step")
    print(
        f"ratio (total time):  {total_ratio:.2f}x   (median step: {median_ratio:.2f}x)"
    )
    print("target: <= 1.5x", "met" if total_ratio <= 1.5 else "NOT met")
    floor_ratio = sum(floor_times) / sum(plain_times)
    print(
        f"floor: plain step + one input VJP (KFAC's sampled column) and one weight "
        f"VJP (the per-sample gradients' arithmetic) per conv, by PyTorch's kernels: "
        f"{floor_ratio:.2f}x"
    )


if __name__ == "__main__":
    main()
