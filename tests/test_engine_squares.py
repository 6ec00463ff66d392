"""Squares of per-sample weight VJPs (diagonal GGN, sum of squared gradients,
squared per-sample gradient norms) against squared torch.func per-sample grads."""

import pytest
from engine_cases import (
    cached_layer,
    cached_per_sample_grads,
    case_params,
    close,
    squares_reference,
)

from tnbackpack.tn import functional as engine

#: (per_sample, sum_weight): summed squares, per-sample squares, squared norms
REDUCTIONS = [(False, False), (True, False), (True, True)]


def check_squares(name, route, simplified):
    """All reductions, with and without a vector axis, for one route."""
    layer = cached_layer(name)
    for vectors in (False, True):
        grad_output, per_sample_grads, _ = cached_per_sample_grads(name, vectors)
        for per_sample, sum_weight in REDUCTIONS:
            result = engine.weight_vjp_squares(
                layer.spec, layer.x, grad_output, vectors=vectors,
                per_sample=per_sample, sum_weight=sum_weight, route=route,
                simplified=simplified,
            )
            expected = squares_reference(
                per_sample_grads, vectors, per_sample, sum_weight
            )
            close(result, expected)


@pytest.mark.parametrize(
    "name, route, simplified", case_params("materialize", "contract", "auto")
)
def test_weight_vjp_squares(name, route, simplified):
    check_squares(name, route, simplified)


@pytest.mark.parametrize(
    "name", ["c2-basic", "t2-basic", "c3-groups-reflect", "c2-dense", "c4-basic"]
)
def test_materialized_squares_in_chunks(name, monkeypatch):
    """A block budget below one sample forces one chunk per sample."""
    monkeypatch.setattr(engine, "MAX_BLOCK_ELEMENTS", 1)
    check_squares(name, "materialize", True)


@pytest.mark.parametrize("name", ["c2-depthwise", "t2-depthwise", "c1-depthwise"])
def test_materialized_squares_in_patch_bounded_chunks(name, monkeypatch):
    """A patch budget below one sample's patches also forces one chunk per sample."""
    monkeypatch.setattr(engine, "MAX_PATCH_ELEMENTS", 1)
    check_squares(name, "materialize", True)


def test_squares_reject_bad_options():
    layer = cached_layer("c2-basic")
    grad_output = layer.random_output_like()
    with pytest.raises(ValueError, match="route"):
        engine.weight_vjp_squares(layer.spec, layer.x, grad_output, route="fast")
    with pytest.raises(ValueError, match="sum_weight"):
        engine.weight_vjp_squares(layer.spec, layer.x, grad_output, sum_weight=True)
