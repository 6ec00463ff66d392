"""Random layers (hypothesis) through every engine quantity and route.

The default run covers a representative sample, reproducibly
(``derandomize=True``); the ``slow`` sweeps draw many more random examples.
"""

import pytest
from engine_cases import (
    autograd_vjps,
    build_layer,
    close,
    input_vjps,
    kfac_input_reference,
    kfac_output_reference,
    output_from_patches,
    patches_by_loop,
    per_sample_grads,
    random_cases,
    squares_reference,
    window_dims,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from tnbackpack.tn import functional as engine


def simplified_variants(layer):
    """Both paths where the rewrite applies, else the (identical) default one."""
    return (True, False) if any(window_dims(layer.spec)) else (True,)


def check_forward_and_vjps(case):
    layer = build_layer(case)
    spec, x, w = layer.spec, layer.x, layer.weight
    grad_output = layer.random_output_like()
    grad_outputs = layer.random_output_like(2)
    gx, gw, gb = autograd_vjps(layer, grad_output)
    per_sample_w, per_sample_b = per_sample_grads(layer, grad_outputs, vectors=True)
    for simplified in simplified_variants(layer):
        y = engine.forward(spec, x, w, layer.bias, layer.output_size, simplified)
        close(y, layer.output())
        close(engine.input_vjp(spec, grad_output, w, x.shape[2:],
                               simplified=simplified), gx)
        close(engine.input_vjp(spec, grad_outputs, w, x.shape[2:], vectors=True,
                               simplified=simplified), input_vjps(layer, grad_outputs))
        close(engine.weight_vjp(spec, x, grad_output, simplified=simplified,
                                route="tn"), gw)
        close(engine.per_sample_weight_vjp(spec, x, grad_outputs, vectors=True,
                                           simplified=simplified, route="tn"),
              per_sample_w)
    if spec.ndim <= 3:
        close(engine.weight_vjp(spec, x, grad_output, route="torch"), gw)
        close(engine.input_vjp(spec, grad_outputs, w, x.shape[2:], vectors=True,
                               route="torch"), input_vjps(layer, grad_outputs))
    routes = ("shifted", "auto") if spec.transposed else ("shifted", "unfold", "auto")
    routes += ("grouped",) if spec.ndim <= 3 else ()
    for route in routes:
        close(engine.per_sample_weight_vjp(spec, x, grad_outputs, vectors=True,
                                           route=route), per_sample_w)
    if layer.bias is not None:
        close(engine.bias_vjp(spec, grad_output), gb)
        close(engine.bias_vjp(spec, grad_outputs, vectors=True, per_sample=True),
              per_sample_b)


def check_patches_and_factors(case):
    layer = build_layer(case)
    spec, x, size = layer.spec, layer.x, layer.output_size
    expected = patches_by_loop(layer)
    routes = [("tn", s) for s in simplified_variants(layer)] + [("auto", True)]
    if not spec.transposed:
        routes.append(("strided", True))
    for route, simplified in routes:
        patches = engine.unfold(spec, x, size, simplified=simplified, route=route)
        close(patches, expected)
        for approx in ("expand", "reduce"):
            if route == "strided" and approx == "reduce":
                continue
            factor = engine.kfac_input_factor(
                spec, x, approx, size, simplified=simplified, route=route
            )
            close(factor, kfac_input_reference(expected, spec.groups, approx))
    y = output_from_patches(layer, expected)
    if layer.bias is not None:
        y = y + layer.bias.reshape(-1, *([1] * spec.ndim))
    close(y, layer.output())
    sqrt_ggn = layer.random_output_like(2)
    for approx in ("expand", "reduce"):
        close(engine.kfac_output_factor(spec, sqrt_ggn, approx),
              kfac_output_reference(sqrt_ggn, spec.groups, approx))


def check_squares(case, route, simplified, vectors, per_sample, sum_weight):
    layer = build_layer(case)
    lead = (3,) if vectors else ()
    grad_output = layer.random_output_like(*lead)
    per_sample_w, _ = per_sample_grads(layer, grad_output, vectors)
    result = engine.weight_vjp_squares(
        layer.spec, layer.x, grad_output, vectors=vectors, per_sample=per_sample,
        sum_weight=sum_weight, route=route, simplified=simplified,
    )
    close(result, squares_reference(per_sample_w, vectors, per_sample, sum_weight))


SQUARE_OPTIONS = dict(
    route=st.sampled_from(["materialize", "contract", "auto"]),
    simplified=st.booleans(),
    vectors=st.booleans(),
    reduction=st.sampled_from([(False, False), (True, False), (True, True)]),
)


# ------------------------------------------------------------ default sweeps
@settings(max_examples=35, derandomize=True)
@given(case=random_cases())
def test_random_forward_and_vjps(case):
    check_forward_and_vjps(case)


@settings(max_examples=25, derandomize=True)
@given(case=random_cases())
def test_random_patches_and_factors(case):
    check_patches_and_factors(case)


@settings(max_examples=30, derandomize=True)
@given(case=random_cases(), **SQUARE_OPTIONS)
def test_random_squares(case, route, simplified, vectors, reduction):
    check_squares(case, route, simplified, vectors, *reduction)


# -------------------------------------------------------------- slow sweeps
@pytest.mark.slow
@settings(max_examples=500)
@given(case=random_cases())
def test_random_forward_and_vjps_slow(case):
    check_forward_and_vjps(case)


@pytest.mark.slow
@settings(max_examples=400)
@given(case=random_cases())
def test_random_patches_and_factors_slow(case):
    check_patches_and_factors(case)


@pytest.mark.slow
@settings(max_examples=500)
@given(case=random_cases(), **SQUARE_OPTIONS)
def test_random_squares_slow(case, route, simplified, vectors, reduction):
    check_squares(case, route, simplified, vectors, *reduction)
