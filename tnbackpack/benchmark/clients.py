"""``python -m tnbackpack.benchmark --clients``: BackPACK's clients, stock vs switched.

Each workflow of laplace-torch, cockpit and vivit runs unmodified on a small
CIFAR-sized CNN, once with stock BackPACK and once under
:func:`tnbackpack.enable`; the two variants are timed interleaved (round-robin,
order rotated, medians, :mod:`.timing`) in one process with one thread, by
the process's CPU time: on a shared machine other processes' load inflates
wall time, not that.
Workflows whose client is not installed are listed as skipped. Output: a
markdown table (``docs/benchmarks/clients.md`` by default).

The clients need the shims of :mod:`.client_shims` beside CPU torch 2.13
(a stand-in for a torchvision that does not load; ``Tensor.symeig``).
"""

from __future__ import annotations

import datetime
import gc
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch
from torch import nn

from .client_shims import stub_broken_torchvision, symeig_shim
from .timing import time_interleaved

#: Inputs of the benchmark CNN (CIFAR-10 sized) and its classes.
INPUT_SHAPE = (3, 32, 32)
CLASSES = 10


def cnn() -> nn.Sequential:
    """Three 3x3 convolutions (two strided) and a linear layer, seeded."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, CLASSES),
    )


def batch(size: int, seed: int = 1):
    """Random inputs and labels of ``size`` samples, seeded."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, *INPUT_SHAPE, generator=gen)
    return x, torch.randint(0, CLASSES, (size,), generator=gen)


@dataclass
class Workflow:
    """A client workflow: ``prepare()`` builds what one timed ``run`` needs."""

    client: str
    name: str
    prepare: Callable[[int], Callable[[], None]]


# ------------------------------------------------------------------ laplace
def _laplace(structure: str, predict: bool) -> Callable[[int], Callable[[], None]]:
    def prepare(size: int) -> Callable[[], None]:
        import laplace
        from laplace.curvature import BackPackGGN

        x, y = batch(2 * size)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=size
        )

        def fit():
            la = laplace.Laplace(
                cnn(),
                "classification",
                subset_of_weights="all",
                hessian_structure=structure,
                backend=BackPackGGN,
            )
            la.fit(loader)
            return la

        if not predict:
            return fit

        def predictive():
            la(x[:size], pred_type="glm", link_approx="probit")

        # predict once right away: laplace-torch's BackPACK Jacobians of an
        # object fail if another object was fitted before its first prediction
        la = fit()
        predictive()
        return predictive

    return prepare


# ------------------------------------------------------------------ cockpit
def cockpit_step(tracker, model, optimizer, x, y, global_step: int) -> None:
    """One SGD step of a classifier, tracked the way cockpit's documentation does.

    ``model`` and its mean cross-entropy must be extended; the tests use it too.
    """
    optimizer.zero_grad()
    out = model(x)
    loss = extend_loss()(out, y)
    info = {
        "batch_size": x.shape[0],
        "individual_losses": nn.functional.cross_entropy(out, y, reduction="none"),
        "loss": loss,
        "optimizer": optimizer,
    }
    with tracker(global_step, info=info):
        loss.backward(create_graph=tracker.create_graph(global_step))
    optimizer.step()


def extend_loss() -> nn.Module:
    """BackPACK's extended mean cross-entropy."""
    from backpack import extend

    return extend(nn.CrossEntropyLoss())


def _cockpit(preset: str) -> Callable[[int], Callable[[], None]]:
    def prepare(size: int) -> Callable[[], None]:
        from backpack import extend
        from cockpit import Cockpit
        from cockpit.utils.configuration import configuration

        x, y = batch(size)
        model = extend(cnn())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        tracker = Cockpit(model.parameters(), quantities=configuration(preset))
        steps = iter(range(10**9))
        return lambda: cockpit_step(tracker, model, optimizer, x, y, next(steps))

    return prepare


# -------------------------------------------------------------------- vivit
def _vivit(directional: bool) -> Callable[[int], Callable[[], None]]:
    def prepare(size: int) -> Callable[[], None]:
        from backpack import backpack, extend
        from vivit.linalg.eigvalsh import EigvalshComputation
        from vivit.optim.directional_derivatives import (
            DirectionalDerivativesComputation,
        )

        x, y = batch(size)
        model = extend(cnn())
        loss_fn = extend(nn.CrossEntropyLoss())

        def run():
            group = {"params": list(model.parameters())}
            if directional:
                group["criterion"] = lambda evals: list(range(len(evals)))[-10:]
                computation = DirectionalDerivativesComputation()
                extensions = computation.get_extensions()
            else:
                computation = EigvalshComputation()
                extensions = [computation.get_extension()]
            hook = computation.get_extension_hook([group])
            model.zero_grad()
            with symeig_shim(), backpack(*extensions, extension_hook=hook):
                loss_fn(model(x), y).backward()
            computation.get_result(group)

        return run

    return prepare


WORKFLOWS: List[Workflow] = [
    Workflow("laplace", "fit, diag GGN (2 batches)", _laplace("diag", False)),
    Workflow("laplace", "fit, Kronecker (KFLR, 2 batches)", _laplace("kron", False)),
    Workflow("laplace", "GLM predictive (diag)", _laplace("diag", True)),
    Workflow("cockpit", "economy, one step", _cockpit("economy")),
    Workflow("cockpit", "business, one step", _cockpit("business")),
    Workflow("vivit", "eigvalsh (GGN spectrum)", _vivit(False)),
    Workflow("vivit", "directional derivatives (top 10)", _vivit(True)),
]


def _installed(client: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            __import__(client)
    except ImportError:
        return False
    return True


@dataclass
class ClientRow:
    """Median milliseconds of one workflow, stock and switched."""

    client: str
    workflow: str
    stock_ms: Optional[float]
    tn_ms: Optional[float]
    note: str = ""

    @property
    def speedup(self) -> Optional[float]:
        """Stock time over switched time, ``None`` if either is missing."""
        if self.stock_ms is None or self.tn_ms is None:
            return None
        return self.stock_ms / self.tn_ms


def _switched(prepare_run: Callable[[], None]) -> Callable[[], None]:
    import tnbackpack

    def run():
        with tnbackpack.enabled():
            prepare_run()

    return run


def measure(
    workflow: Workflow, size: int, repeats: int, max_seconds: float
) -> ClientRow:
    """Time ``workflow`` stock and switched, interleaved."""
    import tnbackpack

    if not _installed(workflow.client):
        return ClientRow(workflow.client, workflow.name, None, None, "not installed")
    stock_run = workflow.prepare(size)
    with tnbackpack.enabled():
        tn_prepared = workflow.prepare(size)
    variants = {"stock": stock_run, "tn": _switched(tn_prepared)}
    timings = time_interleaved(
        variants,
        gc.collect,
        repeats=repeats,
        max_seconds=max_seconds,
        clock=time.process_time,
    )
    note = "; ".join(f"{k}: {v}" for k, v in timings.errors.items())
    return ClientRow(
        workflow.client,
        workflow.name,
        timings.median_ms("stock"),
        timings.median_ms("tn"),
        note,
    )


def markdown(rows: List[ClientRow], size: int, threads: int) -> str:
    """The committed table, with how it was measured."""
    from importlib.metadata import version

    import tnbackpack

    def ms(value: Optional[float]) -> str:
        return "–" if value is None else f"{value:.1f}"

    lines = [
        "| client | workflow | stock BackPACK (CPU ms) "
        "| `tnbackpack.enable()` (CPU ms) | speedup | note |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        speedup = "–" if row.speedup is None else f"{row.speedup:.2f}×"
        lines.append(
            f"| {row.client} | {row.workflow} | {ms(row.stock_ms)} | "
            f"{ms(row.tn_ms)} | {speedup} | {row.note} |"
        )
    backpack_version = version("backpack-for-pytorch")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    return (
        f"Measured {stamp} UTC by `python -m tnbackpack.benchmark --clients` "
        f"(batch {size}, {threads} thread(s), float32, CPU time of the process, "
        f"medians of interleaved rounds; torch {torch.__version__}, "
        f"BackPACK {backpack_version}, "
        f"tnbackpack {tnbackpack.__version__}, {platform.machine()}). Model: "
        "three 3x3 convolutions (16, 32, 32 channels, two of stride 2) and a "
        "linear layer on 3x32x32 inputs, 10 classes.\n\n" + "\n".join(lines) + "\n"
    )


def run_clients(
    output: Path,
    size: int = 32,
    threads: int = 1,
    repeats: int = 5,
    max_seconds: float = 30.0,
    names: Optional[List[str]] = None,
) -> List[ClientRow]:
    """Measure every workflow, print and write the table; return the rows."""
    torch.set_num_threads(threads)
    stub_broken_torchvision()
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # full-backward-hook and deprecation chatter
        for workflow in WORKFLOWS:
            if names and workflow.client not in names:
                continue
            row = measure(workflow, size, repeats, max_seconds)
            speed = "" if row.speedup is None else f"{row.speedup:.2f}x"
            print(f"{row.client:8s} {row.workflow:36s} {speed} {row.note}")
            rows.append(row)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(markdown(rows, size, threads))
    print(f"wrote {output}")
    return rows
