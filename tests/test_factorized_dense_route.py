"""BatchGrad of factorized convs by both routes: stage walk and dense projection.

Each route is forced (``factorized_dense.ROUTE``) and compared with
``vmap(grad)`` of the same network whose factorized layer is a rebuilt-kernel
convolution (float64), on CP/Tucker/TT/TR layers with stride, padding,
dilation and groups.
"""

from __future__ import annotations

import pytest
import torch
from factorized_cases import Case
from hypothesis import assume, given, settings
from test_factorized_extensions import (
    CASES,
    cases,
    check_all,
    data,
    ids,
    per_sample_gradients,
)
from test_second_order_reference import run
from torch import nn

from tnbackpack import extensions as ext
from tnbackpack.extensions import factorized_dense
from tnbackpack.nn import FactorizedConv2d


@pytest.fixture
def counted(monkeypatch):
    """Count calls of the dense route's projection."""
    calls = []
    original = factorized_dense.per_sample_factor_gradients

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(factorized_dense, "per_sample_factor_gradients", spy)
    return calls


@pytest.mark.parametrize("route", ["walk", "dense"])
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_batch_grad_by_route(case: Case, route: str, monkeypatch, counted):
    """Per-sample factor and bias gradients equal torch.func's on either route."""
    monkeypatch.setattr(factorized_dense, "ROUTE", route)
    model, reference, x, y = data(case)
    results = run(model, nn.CrossEntropyLoss(), x, y, ext.BatchGrad())
    truth = per_sample_gradients(reference, nn.CrossEntropyLoss(), x, y)
    check_all(results["grad_batch"], truth)
    assert len(counted) == (route == "dense")


def _both_routes(case: Case) -> None:
    """BatchGrad by each forced route equals torch.func's."""
    try:
        case.layer().dense_spec().output_size(case.size())
    except ValueError:
        assume(False)  # the kernel is longer than the padded input
    model, reference, x, y = data(case)
    truth = per_sample_gradients(reference, nn.CrossEntropyLoss(), x, y)
    previous = factorized_dense.ROUTE
    try:
        for route in ("walk", "dense"):
            factorized_dense.ROUTE = route
            results = run(model, nn.CrossEntropyLoss(), x, y, ext.BatchGrad())
            check_all(results["grad_batch"], truth)
    finally:
        factorized_dense.ROUTE = previous


@settings(max_examples=5, deadline=None)
@given(case=cases())
def test_sweep_both_routes(case: Case):
    """Random layers (every factorization, dimension, hyper-parameter)."""
    _both_routes(case)


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(case=cases())
def test_sweep_both_routes_slow(case: Case):
    _both_routes(case)


def test_other_first_order_extensions_keep_the_walk(monkeypatch, counted):
    """Only BatchGrad takes the dense route; the others' results stay correct."""
    monkeypatch.setattr(factorized_dense, "ROUTE", "dense")
    case = CASES[1]
    model, reference, x, y = data(case)
    results = run(model, nn.CrossEntropyLoss(), x, y, ext.SumGradSquared())
    truth = per_sample_gradients(reference, nn.CrossEntropyLoss(), x, y)
    check_all(
        results["sum_grad_squared"], {k: g.square().sum(0) for k, g in truth.items()}
    )
    assert not counted


def test_bad_route_raises(monkeypatch):
    monkeypatch.setattr(factorized_dense, "ROUTE", "fast")
    model, _, x, y = data(CASES[0])
    with pytest.raises(ValueError, match="ROUTE must be one of"):
        run(model, nn.CrossEntropyLoss(), x, y, ext.BatchGrad())


@pytest.mark.parametrize(
    "factorization, rank, expected",
    [
        ("cp", 16, "walk"),  # benchmark rows (64 channels at 32², N=32)
        ("tr", (8, 8, 8, 4), "walk"),
        ("cp", 64, "dense"),
        ("tucker", (64, 64), "dense"),  # full-rank Tucker: stages cost more
        ("cp", 256, "dense"),  # rank 4x the channels
    ],
)
def test_auto_route_by_flops(factorization, rank, expected):
    """``auto`` picks the measured-faster route by its cost count (shapes only)."""
    layer = FactorizedConv2d(64, 64, 3, rank, factorization, padding=1)
    x = torch.empty(32, 64, 32, 32, device="meta")
    assert factorized_dense.choose(layer, x, x) == expected
