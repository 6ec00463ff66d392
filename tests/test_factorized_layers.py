"""FactorizedConv{1,2,3}d: forward, attributes, ranks, initialization, errors.

The reference is PyTorch's own convolution of the kernel rebuilt in the test
(:mod:`factorized_cases`), for the output and for the gradients w.r.t. the
input and every factor.
"""

from __future__ import annotations

import math

import pytest
import torch
from factorized_cases import DENSE, LAYERS, RebuiltConv, rebuilt_kernel
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from tnbackpack.nn import FACTORIZATIONS

RANKS = {"cp": 3, "tucker": (2, 3), "tt": 2, "tr": 2}


def check_against_rebuilt(layer: nn.Module, x: torch.Tensor) -> None:
    """Output and gradients (input, factors, bias) match the rebuilt-kernel conv."""
    reference = RebuiltConv(layer)
    x = x.clone().requires_grad_(True)
    out, expected = layer(x), reference(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    weights = torch.randn_like(expected)
    inputs = [x, *layer.parameters()]
    ours = torch.autograd.grad((out * weights).sum(), inputs)
    theirs = torch.autograd.grad((expected * weights).sum(), inputs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


FIXED = [
    (2, "cp", {}),
    (2, "tucker", {"stride": 2, "padding": 1, "groups": 2}),
    (2, "tt", {"padding": "same", "padding_mode": "circular", "dilation": (2, 1)}),
    (2, "tr", {"padding": (1, 2), "padding_mode": "reflect", "stride": (1, 2)}),
    (1, "cp", {"padding": "same", "padding_mode": "replicate", "groups": 2}),
    (1, "tr", {"stride": 3, "bias": False}),
    (3, "tucker", {"padding": "valid", "dilation": (1, 1, 2)}),
    (3, "tt", {"stride": (1, 2, 1), "padding": 1, "padding_mode": "circular"}),
    (3, "cp", {"groups": 4}),
    (3, "tr", {"padding": "same"}),
]


@pytest.mark.parametrize("ndim, factorization, kwargs", FIXED)
def test_forward_and_gradients(ndim, factorization, kwargs):
    torch.manual_seed(0)
    layer = LAYERS[ndim](
        4, 8, 3, RANKS[factorization], factorization, **kwargs
    ).double()
    x = torch.randn(2, 4, *(7, 6, 5)[:ndim], dtype=torch.float64)
    check_against_rebuilt(layer, x)


@st.composite
def layer_configs(draw):
    ndim = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    factorization = draw(st.sampled_from(FACTORIZATIONS))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    same = draw(st.booleans())
    if same:
        stride, padding = 1, "same"
    else:
        stride = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
        padding = tuple(draw(st.integers(0, 1)) for _ in range(ndim))
    count = {"cp": 1, "tucker": 2, "tt": ndim + 1, "tr": ndim + 2}[factorization]
    rank = tuple(draw(st.integers(1, 3)) for _ in range(count))
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    kwargs.update(padding_mode=mode, bias=draw(st.booleans()))
    return ndim, factorization, kernel, rank, kwargs


@given(config=layer_configs(), seed=st.integers(0, 2**16))
def test_forward_sweep(config, seed):
    """Random layers of every factorization, dimension and hyper-parameter."""
    ndim, factorization, kernel, rank, kwargs = config
    torch.manual_seed(seed)
    layer = LAYERS[ndim](2, 4, kernel, rank, factorization, **kwargs).double()
    size = (6, 5, 4)[:ndim]
    try:  # PyTorch rejects kernels longer than the padded input, so do we
        layer.dense_spec().output_size(size)
    except ValueError:
        assume(False)
    x = torch.randn(2, 2, *size, dtype=torch.float64)
    check_against_rebuilt(layer, x)


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_full_weight_to_conv_and_equation(factorization):
    torch.manual_seed(1)
    layer = LAYERS[2](
        4, 6, (3, 2), RANKS[factorization], factorization, groups=2
    ).double()
    factors = dict(layer.factors)
    torch.testing.assert_close(layer.full_weight(), rebuilt_kernel(layer, factors))
    conv = layer.to_conv()
    x = torch.randn(3, 4, 6, 5, dtype=torch.float64)
    torch.testing.assert_close(conv(x), layer(x))
    assert layer.equation.endswith("->ngohw|hw")
    assert all(isinstance(p, nn.Parameter) for p in factors.values())
    assert set(dict(layer.named_parameters())) == {*factors, "bias"}


def test_equations_of_the_design_table():
    """Without groups, the strings of DESIGN §7 (factor layouts: PyTorch's)."""
    make = LAYERS[2]
    assert make(4, 6, 3, 2, "cp").equation == "nchw,rc,rh,rw,or->nohw|hw"
    assert make(4, 6, 3, 2, "tucker").equation == "nchw,ac,bahw,ob->nohw|hw"
    assert make(4, 6, 3, 2, "tt").equation == "nchw,ac,bah,dbw,od->nohw|hw"
    assert make(4, 6, 3, 2, "tr").equation == "nchw,azc,bah,dbw,odz->nohw|hw"


def test_attributes_are_pytorchs():
    kwargs = dict(
        stride=2, padding=1, dilation=(1, 2), groups=2, padding_mode="reflect"
    )
    layer = LAYERS[2](4, 6, 3, 2, "cp", **kwargs)
    conv = nn.Conv2d(4, 6, 3, **kwargs)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                 "dilation", "groups", "padding_mode"):  # fmt: skip
        assert getattr(layer, name) == getattr(conv, name), name
    assert layer.bias.shape == conv.bias.shape
    assert LAYERS[1](2, 2, 3, 1, "tt", padding="same").padding == "same"


def test_ranks():
    make = LAYERS[2]
    assert make(4, 6, 3, 5, "cp").rank == (5,)
    assert make(4, 6, 3, 2, "tucker").rank == (2, 2)
    assert make(4, 6, 3, (1, 2, 3), "tt").rank == (1, 2, 3)
    assert make(4, 6, 3, 2, "tr").rank == (2, 2, 2, 2)
    dense = 6 * 4 * 9
    for factorization in FACTORIZATIONS:
        for ratio in (0.3, 0.8):
            layer = make(4, 6, 3, ratio, factorization)
            assert layer.num_factor_parameters() <= ratio * dense, factorization
            bigger = [r + 1 for r in layer.rank]
            if factorization != "tucker":
                more = make(4, 6, 3, tuple(bigger), factorization)
                assert more.num_factor_parameters() > ratio * dense


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((4, 6, 3, 2, "svd"), {}, "factorization must be one of"),
        ((4, 6, 3, (1, 2), "tt"), {}, "takes 3 rank"),
        ((4, 6, 3, 0, "cp"), {}, "at least 1"),
        ((4, 6, 3, -0.5, "cp"), {}, "compression ratio must be positive"),
        ((4, 6, 3, True, "cp"), {}, "rank must be"),
        ((4, 6, 3, 2, "cp"), {"groups": 4}, "multiple of groups"),
        ((4, 6, 3, 2, "cp"), {"padding": "same", "stride": 2}, "stride 1"),
        ((4, 6, 3, 2, "cp"), {"padding_mode": "mirror"}, "padding_mode"),
    ],
)
def test_errors_name_the_layer(args, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        LAYERS[2](*args, **kwargs)
    assert "FactorizedConv2d" in str(info.value)


def test_bad_input_is_a_value_error():
    layer = LAYERS[2](4, 6, 3, 2, "cp")
    with pytest.raises(ValueError, match="4 input channels"):
        layer(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match="2 spatial axes"):
        layer(torch.randn(1, 4, 5))


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_initialization_matches_pytorch_output_variance(factorization):
    """Over fresh layers, the kernel entries have PyTorch's variance 1/(3·fan_in),
    so the output variance of a unit-variance input is that of nn.Conv2d."""
    torch.manual_seed(0)
    c, o, k = 8, 16, 3
    x = torch.randn(8, c, 3, 3)
    ours, theirs = [], []
    # products of normal factors are heavy-tailed: many layers for a stable mean
    for _ in range(600):
        layer = LAYERS[2](c, o, k, RANKS[factorization], factorization, bias=False)
        ours.append(layer(x).var().item())
        theirs.append(nn.Conv2d(c, o, k, bias=False)(x).var().item())
    ratio = sum(ours) / sum(theirs)
    assert abs(ratio - 1) < 0.2, ratio
    fan_in = c * k * k
    weights = torch.cat([
        LAYERS[2](c, o, k, RANKS[factorization], factorization).full_weight().flatten()
        for _ in range(600)
    ])  # fmt: skip
    assert abs(weights.var().item() * 3 * fan_in - 1) < 0.15
    assert (
        abs(weights.mean().item())
        < 3 * math.sqrt(weights.var().item() / weights.numel()) * 5
    )


def test_dense_classes_match():
    for ndim, cls in LAYERS.items():
        assert cls.ndim == ndim and DENSE[ndim] is type(cls(2, 2, 1, 1).to_conv())


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
def test_to_stages(factorization):
    kwargs = dict(padding="same", padding_mode="circular", groups=2, dilation=(2, 1))
    layer = LAYERS[2](4, 6, (3, 2), RANKS[factorization], factorization, **kwargs)
    x = torch.randn(2, 4, 7, 6)
    torch.testing.assert_close(layer.to_stages()(x), layer(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ring"):
        LAYERS[2](4, 6, 3, 2, "tr").to_stages()
