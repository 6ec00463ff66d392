"""Both gradient routes of conv_einsum (``function.BACKWARD``) against references.

``planned``: each gradient its own planned contraction; ``recorded``: autograd
through the forward plan's kernels; ``auto``: the faster one, measured once per
network. References rebuild the kernel with ``torch.einsum`` and run PyTorch's
convolution (autograd through it), as in :mod:`test_conv_einsum_layers`.
"""

import pytest
import torch
import torch.nn.functional as F
from conv_einsum_cases import assert_matches
from test_conv_einsum_layers import LAYERS, rand

from tnbackpack import conv_einsum
from tnbackpack.tn.conv_einsum import PerSampleRequest, function


def _check(name, stride, padding):
    torch.manual_seed(0)
    equation, factor_shapes, rebuild = LAYERS[name]
    x = rand(2, 3, 7, 6)
    factors = [rand(*s) for s in factor_shapes(3, 4, 2)]

    def reference(x, *fs):
        return F.conv2d(x, torch.einsum(rebuild, *fs), stride=stride, padding=padding)

    def ours(*ops):
        return conv_einsum(equation, *ops, stride=stride, padding=padding)

    assert_matches(ours, reference, [x, *factors])


@pytest.mark.parametrize("route", ["planned", "recorded", "recorded_nchw"])
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_routes_match_rebuilt_kernel(route, name, stride, padding, monkeypatch):
    monkeypatch.setattr(function, "BACKWARD", route)
    _check(name, stride, padding)


def test_auto_measures_once_and_remembers(monkeypatch):
    """With every network measured, the choice is cached per network and grads."""
    monkeypatch.setattr(function, "MEASURE_ABOVE", 0.0)
    monkeypatch.setattr(function, "_ROUTES", {})
    _check("cp", 1, 1)
    assert len(function._ROUTES) == 1
    assert set(function._ROUTES.values()) <= set(function.BACKWARDS) - {"auto"}
    _check("cp", 1, 1)
    assert len(function._ROUTES) == 1
    _check("tt", 2, 0)
    assert len(function._ROUTES) == 2


def test_small_networks_are_not_measured(monkeypatch):
    monkeypatch.setattr(function, "_ROUTES", {})
    _check("tucker2", 1, 1)
    assert function._ROUTES == {}


def test_recorded_route_twice_differentiable(monkeypatch):
    monkeypatch.setattr(function, "BACKWARD", "recorded")
    equation, factor_shapes, rebuild = LAYERS["tr"]
    torch.manual_seed(3)
    ops = [rand(2, 3, 6, 6)] + [rand(*s) for s in factor_shapes(3, 4, 2)]
    ops = [op.requires_grad_() for op in ops]
    out = conv_einsum(equation, *ops, padding=1)
    (g,) = torch.autograd.grad(out.square().sum(), ops[1], create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), ops[0])
    ref_ops = [op.detach().clone().requires_grad_() for op in ops]
    ref = F.conv2d(ref_ops[0], torch.einsum(rebuild, *ref_ops[1:]), padding=1)
    (rg,) = torch.autograd.grad(ref.square().sum(), ref_ops[1], create_graph=True)
    (rgg,) = torch.autograd.grad(rg.sum(), ref_ops[0])
    torch.testing.assert_close(gg, rgg, rtol=1e-10, atol=1e-10)


def test_per_sample_requests_take_the_planned_route(monkeypatch):
    monkeypatch.setattr(function, "BACKWARD", "recorded")
    equation, factor_shapes, _ = LAYERS["cp"]
    ops = [rand(2, 3, 6, 6)] + [
        rand(*s).requires_grad_() for s in factor_shapes(3, 4, 2)
    ]
    request = PerSampleRequest("n", (1, 2, 3, 4))
    conv_einsum(equation, *ops, padding=1, per_sample=request).sum().backward()
    assert set(request.gradients) == {1, 2, 3, 4}


def test_bad_route(monkeypatch):
    monkeypatch.setattr(function, "BACKWARD", "fast")
    x = rand(2, 3, 6, 6)
    w = rand(4, 3, 3, 3).requires_grad_()
    with pytest.raises(ValueError, match="BACKWARD must be one of"):
        conv_einsum("nchw,ochw->nohw|hw", x, w)


def test_torch_func_transforms():
    """``grad``, ``vmap(grad)`` and ``jacrev`` of conv_einsum match the rebuilt conv."""
    from torch.func import grad, jacrev, vmap

    equation, factor_shapes, rebuild = LAYERS["tt"]
    torch.manual_seed(4)
    x = rand(3, 3, 6, 5)
    factors = [rand(*s) for s in factor_shapes(3, 4, 2)]

    def ours(fs, xn):
        out = conv_einsum(equation, xn[None], *fs, padding=1, stride=(2, 1))
        return out.square().sum()

    def reference(fs, xn):
        kernel = torch.einsum(rebuild, *fs)
        return F.conv2d(xn[None], kernel, padding=1, stride=(2, 1)).square().sum()

    for transform in (grad, jacrev):
        for got, want in zip(
            transform(ours)(factors, x[0]), grad(reference)(factors, x[0])
        ):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    per_sample = vmap(grad(ours), in_dims=(None, 0))(factors, x)
    expected = vmap(grad(reference), in_dims=(None, 0))(factors, x)
    for got, want in zip(per_sample, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_factorized_layer_under_vmap_grad():
    """``vmap(grad)`` through ``functional_call`` of a FactorizedConv2d."""
    from torch.func import functional_call, grad, vmap

    from tnbackpack.nn import FactorizedConv2d

    torch.manual_seed(5)
    layer = FactorizedConv2d(4, 6, 3, (2, 3), "tucker", padding=1).double()
    x = rand(3, 4, 5, 5)
    params = {n: p.detach() for n, p in layer.named_parameters()}

    def loss(p, xn):
        return functional_call(layer, p, (xn[None],)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for n in range(3):
        layer.zero_grad()
        layer(x[n : n + 1]).square().sum().backward()
        for name, param in layer.named_parameters():
            torch.testing.assert_close(
                per_sample[name][n], param.grad, rtol=1e-10, atol=1e-10
            )
