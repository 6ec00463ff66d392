"""Patches (unfold) and KFAC factors of the engine against loop-built references."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from engine_cases import (
    ALL_CASES,
    NAMES,
    cached_layer,
    case_params,
    close,
    kfac_input_reference,
    kfac_output_reference,
    output_from_patches,
    patches_by_loop,
)

from tnbackpack.tn import functional as engine
from tnbackpack.tn import gram
from tnbackpack.tn.spec import ConvSpec

CASES = pytest.mark.parametrize("name", NAMES)

_LOOP_PATCHES = {}


def loop_patches(name):
    """Loop-built patches of a named case, built once."""
    if name not in _LOOP_PATCHES:
        _LOOP_PATCHES[name] = patches_by_loop(cached_layer(name))
    return _LOOP_PATCHES[name]


ROUTES = pytest.mark.parametrize(
    "name, route, simplified", case_params("tn", "strided", "auto")
)


@ROUTES
def test_unfold_matches_loop(name, route, simplified):
    layer = cached_layer(name)
    kwargs = dict(output_size=layer.output_size, simplified=simplified, route=route)
    if route == "strided" and layer.transposed:
        # a transposed layer's patches are no strided view of its input
        with pytest.raises(ValueError, match="transposed"):
            engine.unfold(layer.spec, layer.x, **kwargs)
        return
    close(engine.unfold(layer.spec, layer.x, **kwargs), loop_patches(name))


@pytest.mark.parametrize("name, route, simplified", case_params(None))
def test_weight_times_patches_is_output(name, route, simplified):
    """``y = W̃ · patches + b``: the defining property of the patches."""
    layer = cached_layer(name)
    patches = engine.unfold(
        layer.spec, layer.x, output_size=layer.output_size, simplified=simplified
    )
    y = output_from_patches(layer, patches)
    if layer.bias is not None:
        y = y + layer.bias.reshape(-1, *([1] * layer.spec.ndim))
    close(y, layer.output())


ZERO_PADDED_CONV2D = [
    case["name"]
    for case in ALL_CASES
    if case["module"] == "Conv2d"
    and case["kwargs"].get("padding_mode", "zeros") == "zeros"
    and not isinstance(case["kwargs"].get("padding", 0), str)
    and case["kwargs"].get("groups", 1) == 1
]


@pytest.mark.parametrize("name", ZERO_PADDED_CONV2D, ids=ZERO_PADDED_CONV2D)
def test_unfold_matches_torch_unfold(name):
    """Where ``F.unfold`` applies (2d, symmetric zero padding) it must agree."""
    layer = cached_layer(name)
    spec = layer.spec
    expected = F.unfold(
        layer.x,
        spec.kernel_size,
        dilation=spec.dilation,
        padding=[p for p, _ in spec.padding],
        stride=spec.stride,
    )
    close(engine.unfold(spec, layer.x), expected)


@ROUTES
def test_kfac_input_factor(name, route, simplified):
    layer = cached_layer(name)
    for approx in ("expand", "reduce"):
        kwargs = dict(
            approx=approx,
            output_size=layer.output_size,
            simplified=simplified,
            route=route,
        )
        if route == "strided" and (layer.transposed or approx == "reduce"):
            # no strided view for transposed layers, no Gram matrix for reduce
            reason = "strided" if approx == "reduce" else "transposed"
            with pytest.raises(ValueError, match=reason):
                engine.kfac_input_factor(layer.spec, layer.x, **kwargs)
            continue
        factor = engine.kfac_input_factor(layer.spec, layer.x, **kwargs)
        expected = kfac_input_reference(loop_patches(name), layer.spec.groups, approx)
        close(factor, expected)


@CASES
def test_kfac_output_factor(name):
    layer = cached_layer(name)
    sqrt_ggn = layer.random_output_like(3)
    for approx, route in itertools.product(("expand", "reduce"), ("gram", "tn")):
        factor = engine.kfac_output_factor(layer.spec, sqrt_ggn, approx, route)
        close(factor, kfac_output_reference(sqrt_ggn, layer.spec.groups, approx))


@pytest.mark.parametrize("positions", [5, 70])  # both blockings of the gram route
def test_kfac_output_factor_blocks(positions, monkeypatch):
    """Several blocks of the batch, a partial last one, groups; vs the reference."""
    monkeypatch.setattr(gram, "BLOCK_ELEMENTS", 200)
    spec = ConvSpec.from_kwargs(1, 4, 6, 3, groups=2)
    sqrt_ggn = torch.randn(3, 5, 6, positions, dtype=torch.float64)
    for approx in ("expand", "reduce"):
        factor = engine.kfac_output_factor(spec, sqrt_ggn, approx)
        close(factor, kfac_output_reference(sqrt_ggn, 2, approx))
    with pytest.raises(ValueError, match="route"):
        engine.kfac_output_factor(spec, sqrt_ggn, route="einsum")


def test_kfac_factors_reject_unknown_approximation():
    layer = cached_layer("c2-basic")
    with pytest.raises(ValueError, match="approx"):
        engine.kfac_input_factor(layer.spec, layer.x, approx="backpack")
    with pytest.raises(ValueError, match="approx"):
        engine.kfac_output_factor(layer.spec, layer.random_output_like(1), "mean")


def test_kfac_output_factor_rejects_wrong_channels():
    layer = cached_layer("c2-basic")
    sqrt_ggn = torch.zeros(2, 2, layer.spec.out_channels + 1, 6, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="out_channels"):
        engine.kfac_output_factor(layer.spec, sqrt_ggn)


def test_patch_routes_reject_unknown_route():
    layer = cached_layer("c2-basic")
    with pytest.raises(ValueError, match="route"):
        engine.unfold(layer.spec, layer.x, route="im2col")
    with pytest.raises(ValueError, match="route"):
        engine.kfac_input_factor(layer.spec, layer.x, route="im2col")
