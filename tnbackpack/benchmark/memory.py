"""Peak extra memory of one backward pass, measured in a fresh subprocess.

What is measured: the peak, during ``loss.backward()`` (forward already done),
of the bytes allocated by PyTorch's CPU allocator since the backward started,
net of what the backward itself freed. Results left on the parameters
(``.grad``, BackPACK's savefields) count, since they are alive at the end.

How: ``torch.profiler`` with ``profile_memory=True`` records every allocation
and free of the CPU allocator with its size and a timestamp; a running sum in
time order gives the peak. This was chosen over ``ru_maxrss`` because

* ``ru_maxrss`` is a process-wide high-water mark: it never goes down, so
  each (case, extension, implementation) would need its own process (a few
  hundred interpreter starts with torch and BackPACK imports), and the forward
  pass's own temporaries would hide a smaller backward peak;
* it counts pages, not tensors: glibc keeps freed small blocks in its heap and
  hands them out again, so a backward that reuses the forward's freed memory
  shows up as zero, and the result depends on allocation history;
* the profiler's sums are exact and deterministic, independent of the load
  other processes put on the machine.

Its blind spot: memory not allocated through PyTorch's allocator (oneDNN's
internal scratch space, Python objects) is not counted; for the tensors that
dominate here (unfolded inputs, backpropagated square roots, per-sample
results) it is exact. Frees of tensors that existed before the backward (the
autograd graph's saved activations) are not credited, in all variants alike.

Each case still runs in its own subprocess: a case that exhausts memory
kills that process only (the run reports it and goes on), and no state of the
timing process (caches, allocator pools) leaks into the measurement. Within a
process the measurements are independent because only allocations made
during the profiled backward are summed.

Run as ``python -m tnbackpack.benchmark.memory --case NAME --batch N
--extensions A,B`` it prints one JSON line per measurement:
``{"variant": "plain" | "<ext>|<implementation>", "mb": float}``
or ``{"variant": ..., "error": "..."}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Union

import torch
from backpack.extensions.backprop_extension import BackpropExtension
from torch.profiler import ProfilerActivity, profile

from .cases import CASES
from .extensions import extension_pairs
from .timing import describe_error
from .workload import Workload

MemoryResult = Union[float, str]  # megabytes, or an error text

_MB = 2.0**20


def backward_peak_mb(
    workload: Workload, extension: Optional[BackpropExtension]
) -> float:
    """Peak extra megabytes allocated during one backward (forward not counted)."""
    # the list gives up its reference inside the backward, as `del` did
    pending = [workload.forward(plain=extension is None)]
    peak = peak_mb(lambda: workload.backward(pending.pop(), extension))
    workload.clear()
    return peak


def peak_mb(work: Callable[[], None]) -> float:
    """Peak extra megabytes PyTorch's CPU allocator holds while ``work`` runs.

    Results ``work`` leaves alive count; what it frees of memory allocated
    before it started is not credited.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    running = itertools.accumulate(nbytes for _, nbytes in events)
    return max(itertools.chain([0], running)) / _MB


def variant_key(extension: str, implementation: str) -> str:
    """Key of a measurement: ``"<extension>|<implementation>"``."""
    return f"{extension}|{implementation}"


def _measure_all(case: str, batch: int, extensions: List[str]) -> None:
    """Child process: print one JSON line per measured variant.

    tnbackpack's extension is measured twice: its first backward (``|cold``,
    which also builds the engine's cached index patterns and contraction
    plans, kept for later steps) and its second (the steady state of a
    training loop, reported in the table). BackPACK keeps no such caches, and
    counting only allocations made during the backward makes its numbers
    independent of what ran before, so it and the plain backward run once.
    """
    workload = Workload(CASES[case], batch)
    pairs, _ = extension_pairs(tuple(extensions))
    jobs = [("plain", None)]
    for pair in pairs:
        jobs += [
            (variant_key(pair.name, "tnbackpack|cold"), pair.tnbackpack),
            (variant_key(pair.name, "tnbackpack"), pair.tnbackpack),
            (variant_key(pair.name, "backpack"), pair.backpack),
        ]
    for key, factory in jobs:
        try:
            extension = factory() if factory is not None else None
            record = {"variant": key, "mb": backward_peak_mb(workload, extension)}
        except Exception as error:  # noqa: BLE001 - reported in the table
            workload.clear()
            record = {"variant": key, "error": describe_error(error)}
        print(json.dumps(record), flush=True)


def measure_in_subprocess(
    case: str,
    batch: int,
    extensions: List[str],
    threads: int,
    timeout: float = 1800.0,
) -> Dict[str, MemoryResult]:
    """Peak extra MB per variant of ``case``, from a fresh Python process.

    Variants whose line never arrived (the child crashed, e.g. out of memory,
    or timed out) get an error text naming the exit code.
    """
    command = [
        sys.executable,
        "-m",
        "tnbackpack.benchmark.memory",
        f"--case={case}",
        f"--batch={batch}",
        f"--threads={threads}",
        f"--extensions={','.join(extensions)}",
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        stdout, failure = done.stdout, f"crashed (exit code {done.returncode})"
    except subprocess.TimeoutExpired as expired:
        stdout, failure = expired.stdout or "", f"timed out after {timeout:.0f} s"
        if isinstance(stdout, bytes):
            stdout = stdout.decode()
    results: Dict[str, MemoryResult] = {}
    for line in stdout.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # stray output of a library
        results[record["variant"]] = record.get("mb", record.get("error"))
    implementations = ("tnbackpack|cold", "tnbackpack", "backpack")
    expected = ["plain"] + [
        variant_key(e, i) for e in extensions for i in implementations
    ]
    for key in expected:
        results.setdefault(key, failure)
    return results


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the child process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", required=True, choices=sorted(CASES))
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--extensions", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _measure_all(args.case, args.batch, [e for e in args.extensions.split(",") if e])


if __name__ == "__main__":
    main()
