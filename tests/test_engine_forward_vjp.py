"""Forward pass and VJPs of the engine on the fixed cases, against torch."""

import pytest
import torch
from engine_cases import (
    NAMES,
    autograd_vjps,
    cached_layer,
    cached_per_sample_grads,
    case_params,
    close,
    input_vjps,
)

from tnbackpack.tn import functional as engine
from tnbackpack.tn import patches, torch_routes

CASES = pytest.mark.parametrize("name", NAMES)


@pytest.mark.parametrize("name, route, simplified", case_params(None))
def test_forward(name, route, simplified):
    layer = cached_layer(name)
    y = engine.forward(
        layer.spec, layer.x, layer.weight, layer.bias, output_size=layer.output_size,
        simplified=simplified,
    )
    close(y, layer.output())


@CASES
def test_forward_without_bias_argument(name):
    """Leaving out the bias gives the bias-free output."""
    layer = cached_layer(name)
    y = engine.forward(layer.spec, layer.x, layer.weight, output_size=layer.output_size)
    with torch.no_grad():
        expected = layer.apply(layer.x, layer.weight, None)
    close(y, expected)


@pytest.mark.parametrize("name, route, simplified", case_params("tn", "torch", "auto"))
def test_input_vjp(name, route, simplified):
    layer = cached_layer(name)
    if route == "torch" and layer.spec.ndim > 3:
        pytest.skip("PyTorch has convolution kernels for 1 to 3 dimensions")
    input_size = layer.x.shape[2:]
    grad_output = layer.random_output_like()
    gx = engine.input_vjp(
        layer.spec, grad_output, layer.weight, input_size, simplified=simplified,
        route=route,
    )
    close(gx, autograd_vjps(layer, grad_output)[0])

    grad_outputs = layer.random_output_like(3)
    gx = engine.input_vjp(
        layer.spec, grad_outputs, layer.weight, input_size, vectors=True,
        simplified=simplified, route=route,
    )
    close(gx, input_vjps(layer, grad_outputs))


@CASES
def test_input_vjp_in_chunks(name, monkeypatch):
    # One or two rows per kernel call: the chunks' results must tile the whole.
    layer = cached_layer(name)
    if layer.spec.ndim > 3:
        pytest.skip("PyTorch has convolution kernels for 1 to 3 dimensions")
    grad_outputs = layer.random_output_like(3)
    row = max(grad_outputs[0, 0].numel(), layer.x[0].numel())
    monkeypatch.setattr(torch_routes, "MAX_CHUNK_ELEMENTS", 2 * row)
    gx = engine.input_vjp(
        layer.spec, grad_outputs, layer.weight, layer.x.shape[2:], vectors=True,
        route="torch",
    )
    close(gx, input_vjps(layer, grad_outputs))


@pytest.mark.parametrize("name, route, simplified", case_params("tn", "torch", "auto"))
def test_weight_vjp(name, route, simplified):
    layer = cached_layer(name)
    grad_output = layer.random_output_like()
    if route == "torch" and layer.spec.ndim > 3:
        pytest.skip("PyTorch has weight-gradient kernels for 1 to 3 dimensions")
    gw = engine.weight_vjp(
        layer.spec, layer.x, grad_output, simplified=simplified, route=route
    )
    close(gw, autograd_vjps(layer, grad_output)[1])


@pytest.mark.parametrize(
    "name, route, simplified",
    case_params("tn", "shifted", "unfold", "grouped", "auto"),
)
def test_per_sample_weight_vjp(name, route, simplified):
    layer = cached_layer(name)
    if route == "grouped" and layer.spec.ndim > 3:
        pytest.skip("PyTorch has convolution kernels for 1 to 3 dimensions")
    if route == "unfold" and layer.spec.transposed:
        with pytest.raises(ValueError, match="transposed"):
            engine.per_sample_weight_vjp(
                layer.spec, layer.x, layer.random_output_like(), route=route
            )
        return
    for vectors in (False, True):
        grad_output, expected, _ = cached_per_sample_grads(name, vectors)
        gw = engine.per_sample_weight_vjp(
            layer.spec, layer.x, grad_output, vectors=vectors, simplified=simplified,
            route=route,
        )
        close(gw, expected)


@pytest.mark.parametrize("fold_below", [0, 10**9])  # per-vector products / folded
@pytest.mark.parametrize(
    "name", ["c2-basic", "c2-depthwise", "c1-depthwise", "c3-groups-reflect"]
)
def test_unfold_route_both_vector_layouts(name, fold_below, monkeypatch):
    """Both ways the unfold route meets several vectors, dense and depthwise."""
    monkeypatch.setattr(patches, "FOLD_BELOW_POSITIONS", fold_below)
    monkeypatch.setattr(patches, "FOLD_FROM_PATCH_SIZE", 0 if fold_below else 10**9)
    layer = cached_layer(name)
    grad_output, expected, _ = cached_per_sample_grads(name, vectors=True)
    gw = engine.per_sample_weight_vjp(
        layer.spec, layer.x, grad_output, vectors=True, route="unfold"
    )
    close(gw, expected)


def test_per_sample_weight_vjp_rejects_unknown_route():
    layer = cached_layer("c2-basic")
    with pytest.raises(ValueError, match="route"):
        engine.per_sample_weight_vjp(
            layer.spec, layer.x, layer.random_output_like(), route="loop"
        )


@CASES
def test_bias_vjp(name):
    """All flag combinations against torch.func per-sample bias gradients."""
    layer = cached_layer(name)
    if layer.bias is None:
        pytest.skip("layer without bias")
    for vectors in (False, True):
        grad_output, _, per_sample = cached_per_sample_grads(name, vectors)
        for keep_batch in (False, True):
            expected = per_sample if keep_batch else per_sample.sum(-2)
            gb = engine.bias_vjp(
                layer.spec, grad_output, vectors=vectors, per_sample=keep_batch
            )
            close(gb, expected)
    grad_output = layer.random_output_like()
    expected = autograd_vjps(layer, grad_output)[2]
    close(engine.bias_vjp(layer.spec, grad_output), expected)


@pytest.mark.parametrize(
    "name", ["c2-basic", "c2-dense", "c3-groups-reflect", "t2-basic", "c1-circular"]
)
def test_non_contiguous_tensors(name):
    """Strided views (e.g. a transposed or channels-last input) are read right."""
    layer = cached_layer(name)

    def strided(t):
        # same values, memory order of the last two axes swapped
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)

    spec, x, w = layer.spec, strided(layer.x), strided(layer.weight)
    grad_output = layer.random_output_like()
    gx, gw, _ = autograd_vjps(layer, grad_output)
    grad_outputs, per_sample, _ = cached_per_sample_grads(name, True)
    assert not x.is_contiguous()

    close(engine.forward(spec, x, w, layer.bias, layer.output_size), layer.output())
    close(engine.input_vjp(spec, strided(grad_output), w, x.shape[2:]), gx)
    close(engine.weight_vjp(spec, x, strided(grad_output)), gw)
    for route in ("tn", "shifted"):
        result = engine.per_sample_weight_vjp(
            spec, x, strided(grad_outputs), vectors=True, route=route
        )
        close(result, per_sample)
