"""Misbehaving processes get clear errors, not hangs; the plumbing's unit tests."""

from __future__ import annotations

import itertools

import pytest
import torch
from distributed_cases import cnn, spawn
from hypothesis import given, settings
from hypothesis import strategies as st

from tnbackpack.distributed import assign_by_cost, inverse_cost, packed_size
from tnbackpack.optim import KFACPreconditioner

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")


@pytest.fixture(scope="module")
def failures():
    results = spawn(2, [("failures", {})])
    for rank_results in results:
        assert "traceback" not in rank_results[0], rank_results[0]["traceback"]
    return [rank_results[0] for rank_results in results]


def test_missing_factor_raises_on_every_rank(failures):
    assert failures[0]["buckets"] > 1  # rank 0 sent some from backward
    for result in failures:
        kind, message = result["missing"]["error"]
        assert kind == "ValueError"
        assert "2.weight" in message and "missing on rank(s) [1]" in message


def test_misfit_factor_raises_on_every_rank(failures):
    for result in failures:
        kind, message = result["misfit"]["error"]
        assert kind == "ValueError"
        assert "2.weight" in message and "rank(s) [1]" in message
    assert "(2, 17, 17)" in failures[1]["misfit"]["error"][1]


def test_communicators_recover_after_errors(failures):
    assert all(result["recovered"]["error"] is None for result in failures)
    mine, theirs = (result["factors"] for result in failures)
    for name in mine:
        for a, b in zip(mine[name], theirs[name]):
            assert torch.equal(a, b)


def test_preconditioner_before_extend(failures):
    """Hooks then run before BackPACK's: nothing leaves in backward, same factors."""
    for result in failures:
        assert result["early_launched"] == 0 and result["late_launched"] > 0
        for name, factors in result["late"].items():
            for a, b in zip(result["early"][name], factors):
                assert torch.equal(a, b)


def test_different_models_refused(failures):
    for result in failures:
        kind, message = result["layout"]["error"]
        assert kind == "ValueError" and "differs" in message


def test_absent_process_times_out(failures):
    kind, message = failures[0]["timeout"]["error"]
    assert kind == "RuntimeError"
    assert "rank 0" in message and "call it the same number of times" in message
    assert failures[0]["timeout"]["seconds"] < 15  # timeout=2 s, not forever


def test_single_process_has_no_communicator():
    assert KFACPreconditioner(cnn()).sync is None


def test_group_without_init_refused():
    with pytest.raises(ValueError, match="not initialized"):
        KFACPreconditioner(cnn(), process_group=object())


def test_packed_size_and_cost():
    assert packed_size((2, 3, 3)) == 12
    assert inverse_cost([(2, 3, 3), (1, 4, 4)]) == 2 * 27 + 64


@settings(max_examples=60)
@given(
    st.lists(st.integers(1, 50), min_size=1, max_size=7),
    st.integers(1, 3),
)
def test_assignment_within_graham_bound(costs, world_size):
    """Largest load ≤ (4/3 − 1/(3R)) × the optimum, found by brute force."""
    owners = assign_by_cost(costs, world_size)
    assert owners == assign_by_cost(costs, world_size)  # deterministic

    def largest(assignment):
        loads = [0] * world_size
        for cost, owner in zip(costs, assignment):
            loads[owner] += cost
        return max(loads)

    best = min(
        largest(a) for a in itertools.product(range(world_size), repeat=len(costs))
    )
    assert largest(owners) <= (4 / 3 - 1 / (3 * world_size)) * best + 1e-9
