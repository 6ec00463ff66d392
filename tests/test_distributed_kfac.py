"""K-FAC and DP-SGD across 2 and 3 gloo processes against one process.

Each spawn runs several scenarios (a spawn costs seconds); see
``distributed_cases``. With ``R`` processes each holding ``B/R`` samples of a
mean-reduced loss, the averaged factors of KFLR (exact GGN square root) equal
those of one process on all ``B`` samples for every ``kfac_approx``; so do
the preconditioned updates and the trajectories. KFAC's Monte-Carlo ``B``
factors are not equal (different samples), its ``A`` factors are. The
parameters must also stay bitwise identical across processes.
"""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch
from distributed_cases import MODELS, batch, cnn, run, spawn
from test_examples import load
from test_optim import DAMPING, dense_reference
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from tnbackpack import backpack, extend
from tnbackpack.extensions import KFLR, KFRA

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook"),
    pytest.mark.skipif(
        not torch.distributed.is_available(), reason="no torch.distributed"
    ),
]
RTOL = 1e-9

TRAINING = dict(damping=1e-2, ema=0.5, update_every=2, kl_clip=1e-2, lr=0.1)
PLAN = [
    # DDP wrapper given, several buckets, inverses spread over ranks
    ("kfac", dict(TRAINING, bucket_cap_mb=0.05)),
    # inner module given, every rank inverts everything, no factors at step 1
    (
        "kfac",
        dict(
            TRAINING,
            approx="expand",
            pass_wrapper=False,
            distribute_inverses=False,
            skip_extension=(1,),
        ),
    ),
    # BackPACK's convention; one step checked against a dense solve
    ("kfac", dict(approx="backpack", steps=1, damping=DAMPING, ema=0.0)),
    # Monte-Carlo KFAC: A exact, B not
    ("kfac", dict(extension="kfac", steps=1, seed_per_rank=True)),
    ("private", dict(dtype="float64")),
    ("private", dict(dtype="float32")),
    # two backward passes per step: the second one's factors count
    ("kfac", dict(TRAINING, steps=2, extra_pass=True, bucket_cap_mb=0.05)),
    # factorized layers (CP with groups, Tucker-2) beside ordinary ones
    ("kfac", dict(TRAINING, network="factorized", bucket_cap_mb=0.05)),
]


@pytest.fixture(scope="module")
def two():
    return spawn(2, PLAN)


@pytest.fixture(scope="module")
def reference():
    return run(0, 1, PLAN)


def close(actual: List[Tensor], expected: List[Tensor], rtol: float = RTOL) -> None:
    for a, e in zip(actual, expected, strict=True):
        scale = e.abs().max().clamp(min=1e-30)
        assert ((a - e).abs().max() / scale).item() < rtol


def identical_across_ranks(results: list, index: int, key: str) -> None:
    for rank_result in results[1:]:
        for mine, theirs in zip(rank_result[index][key], results[0][index][key]):
            for a, b in zip(mine, theirs):
                assert torch.equal(a, b), "processes diverged"


def no_errors(results: list) -> None:
    for rank, rank_results in enumerate(results):
        for entry in rank_results:
            assert "error" not in entry, f"rank {rank}: {entry.get('traceback')}"


def full_batch_factors(approx: str, network: str = "cnn") -> Dict[str, List[Tensor]]:
    """KFLR factors of the whole first batch, stacked ``[G, d, d]``."""
    model = extend(MODELS[network]())
    X, y = batch(0)
    with backpack(KFLR(kfac_approx=approx)):
        extend(nn.CrossEntropyLoss())(model(X), y).backward()
    return {
        name: [f if f.ndim == 3 else f.unsqueeze(0) for f in p.kflr]
        for name, p in model.named_parameters()
    }


@pytest.mark.parametrize("index", [0, 1, 2])
def test_kflr_two_processes_equal_one(two, reference, index):
    no_errors(two)
    expected = reference[index]
    approx = PLAN[index][1].get("approx", "reduce")
    factors = full_batch_factors(approx)
    for rank_results in two:
        result = rank_results[index]
        for name, averaged in result["factors"].items():
            close(averaged, factors[name])
        for step, params in enumerate(result["params"]):
            close(params, expected["params"][step])
    identical_across_ranks(two, index, "params")


def test_second_backward_pass_replaces_factors(two, reference):
    """Buckets sent during the first pass are sent again with the new factors."""
    no_errors(two)
    for rank_results in two:
        for step, params in enumerate(rank_results[6]["params"]):
            close(params, reference[6]["params"][step])
    identical_across_ranks(two, 6, "params")


def test_factorized_layers_two_processes_equal_one(two, reference):
    """Each factor of a CP / Tucker-2 layer is averaged as its stage's weight.

    The averaged factors equal the whole batch's, the preconditioned update
    and the trajectory those of one process; buckets leave from backward.
    """
    no_errors(two)
    expected = reference[7]
    factors = full_batch_factors("reduce", "factorized")
    assert any(f[0].shape[0] > 1 for f in factors.values())  # stage groups
    for rank_results in two:
        result = rank_results[7]
        assert result["factors"].keys() == factors.keys()
        for name, averaged in result["factors"].items():
            close(averaged, factors[name])
        close(result["update"], expected["update"])
        for step, params in enumerate(result["params"]):
            close(params, expected["params"][step])
        assert result["launched_in_backward"] == result["buckets"] > 1
    identical_across_ranks(two, 7, "params")


def test_factors_sent_during_backward(two):
    """All buckets of the first step leave from backward hooks, not from step()."""
    no_errors(two)
    for rank_results in two:
        result = rank_results[0]
        assert result["buckets"] > 1
        assert result["launched_in_backward"] == result["buckets"]


def test_backpack_update_is_dense_solve(two, reference):
    """One step, no running average: ``(B ⊗ A + λ I)⁻¹ g`` with full-batch terms."""
    no_errors(two)
    model = cnn()
    factors = full_batch_factors("backpack")
    grads = reference[2]["grads"]  # full-batch gradient (checked below)
    X, y = batch(0)
    nn.CrossEntropyLoss()(model(X), y).backward()
    close(grads, [p.grad for p in model.parameters()])
    modules = {name: m for name, m in model.named_modules()}
    expected = []
    for (name, _), g in zip(model.named_parameters(), grads):
        module = modules[name.rsplit(".", 1)[0]]
        expected.append(
            dense_reference(module, g, factors[name], name.endswith("weight"))
        )
    for rank_results in two:
        close(rank_results[2]["update"], expected, rtol=1e-8)


def test_monte_carlo_kfac_input_factors_exact(two, reference):
    no_errors(two)
    expected = reference[3]["factors"]
    for rank_results in two:
        factors = rank_results[3]["factors"]
        for name, (B, *A) in factors.items():
            assert B.shape == expected[name][0].shape
            if A:  # A does not depend on the sampled loss Hessian
                close(A, expected[name][1:])
        # B does: other samples on a shard than in the whole batch
        B_diff = max(
            ((f[0] - expected[n][0]).norm() / expected[n][0].norm()).item()
            for n, f in factors.items()
        )
        assert B_diff > 1e-3


def reference_private_grads(dtype: torch.dtype, steps: int = 2) -> List[List[Tensor]]:
    """DP-SGD by torch.func: per-sample gradients, clip, sum, noise, mean."""
    model = cnn().to(dtype)
    generator = torch.Generator().manual_seed(7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    out = []

    def loss(params, x, y):
        logits = functional_call(model, params, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, y.unsqueeze(0), reduction="sum")

    for step in range(steps):
        X, y = batch(step, dtype)
        params = {n: p.detach() for n, p in model.named_parameters()}
        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, X, y)
        norms = sum(g.flatten(1).square().sum(1) for g in per_sample.values()).sqrt()
        scale = (1.0 / (norms + 1e-12)).clamp(max=1.0)
        grads = []
        for p, g in zip(model.parameters(), per_sample.values()):
            noise = 0.5 * torch.randn(p.shape, generator=generator, dtype=dtype)
            p.grad = ((scale.view(-1, *[1] * p.ndim) * g).sum(0) + noise) / len(X)
            grads.append(p.grad.clone())
        out.append(grads)
        optimizer.step()
    return out


def test_private_gradients_two_processes_equal_one(two):
    no_errors(two)
    expected = reference_private_grads(torch.float64)
    for rank_results in two:
        for step, grads in enumerate(rank_results[4]["grads"]):
            close(grads, expected[step], rtol=1e-10)
    identical_across_ranks(two, 4, "grads")


def test_private_gradients_match_dp_sgd_example(two):
    """float32, against ``examples/dp_sgd.py``'s own single-process step."""
    no_errors(two)
    dp_sgd = load("dp_sgd")
    model = extend(cnn().float())
    loss_function = extend(nn.CrossEntropyLoss(reduction="sum"))
    generator = torch.Generator().manual_seed(7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(2):
        X, y = batch(step, torch.float32)
        dp_sgd.private_step(model, loss_function, X, y, generator)
        for rank_results in two:
            close(
                rank_results[5]["grads"][step],
                [p.grad for p in model.parameters()],
                rtol=1e-5,
            )
        optimizer.step()


def test_three_processes_equal_one(reference):
    plan = [PLAN[0], PLAN[4]]
    three = spawn(3, plan)
    no_errors(three)
    factors = full_batch_factors("reduce")
    for rank_results in three:
        for name, averaged in rank_results[0]["factors"].items():
            close(averaged, factors[name])
        for step, params in enumerate(rank_results[0]["params"]):
            close(params, reference[0]["params"][step])
        for step, grads in enumerate(rank_results[1]["grads"]):
            close(grads, reference[4]["grads"][step], rtol=1e-10)
    identical_across_ranks(three, 0, "params")


@pytest.mark.parametrize(
    "make, field, exact_b",
    [
        (lambda: KFLR(kfac_approx="backpack"), "kflr", True),
        (lambda: KFLR(kfac_approx="expand"), "kflr", True),
        (lambda: KFRA(kfac_approx="reduce"), "kfra", False),
    ],
    ids=["kflr-backpack", "kflr-expand", "kfra"],
)
def test_which_factors_average_exactly(make, field, exact_b):
    """In one process: the mean of two half-batch factors vs the whole batch.

    What the distributed preconditioner relies on. KFRA backpropagates a
    batch-averaged matrix whose averages nest (cross-sample terms), so its
    ``B`` is exact only at the last layer; ``A`` always is.
    """

    def factors(X, y):
        model = extend(cnn())
        with backpack(make()):
            extend(nn.CrossEntropyLoss())(model(X), y).backward()
        return {n: getattr(p, field) for n, p in model.named_parameters()}

    X, y = batch(0)
    full = factors(X, y)
    halves = [factors(X[:6], y[:6]), factors(X[6:], y[6:])]
    inexact = []
    for name, expected in full.items():
        averaged = [(a + b) / 2 for a, b in zip(*(h[name] for h in halves))]
        if name.endswith("weight"):
            close(averaged[1:], expected[1:])  # A
        error = (averaged[0] - expected[0]).norm() / expected[0].norm()
        if error > 1e-12:
            inexact.append(name)
    if exact_b:
        assert not inexact
    else:
        assert "0.weight" in inexact and "7.weight" not in inexact
