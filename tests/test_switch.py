"""``tnbackpack.enable()``: BackPACK's own extension classes on tnbackpack's conv rules.

Checks that instances of BackPACK's classes (made before or after the call,
under any name) give tnbackpack's numbers (and the torch.func truth where
BackPACK 1.7.1 is wrong), keep their types, that ``disable()`` restores
BackPACK's behaviour, that users' own rules win, and that BackPACK's conv
derivatives answer with the engine.
"""

from __future__ import annotations

import copy

import pytest
import torch
from backpack import backpack, extend
from backpack import extensions as bp
from backpack.core.derivatives.conv2d import Conv2DDerivatives
from backpack.core.derivatives.convnd import ConvNDDerivatives
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.firstorder.base import FirstOrderModuleExtension
from backpack.extensions.firstorder.batch_grad import BatchGrad as AliasedBatchGrad
from torch import nn
from torch.func import functional_call, vjp

import tnbackpack
from tnbackpack import extensions as tn
from tnbackpack import switch

DTYPE = torch.float64
KRONECKER = ("KFAC", "KFLR", "KFRA")


@pytest.fixture(autouse=True)
def switched_off():
    switch.disable()
    yield
    switch.disable()


def net(groups: int = 2, seed: int = 0) -> nn.Sequential:
    """Convolutions BackPACK gets wrong or refuses: circular, grouped, transposed."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular"),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=groups),
        nn.Sigmoid(),
        nn.ConvTranspose2d(4, 2, 2, stride=2),
        nn.Flatten(),
        nn.Linear(2 * 8 * 8, 3),
    ).to(DTYPE)


def data(seed: int = 1):
    torch.manual_seed(seed)
    return torch.randn(3, 2, 4, 4, dtype=DTYPE), torch.randint(0, 3, (3,))


def run(extension, seed: int = 2, groups: int = 2):
    """The extension's savefields per parameter name, after one backward pass."""
    model = extend(net(groups))
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = data()
    loss = loss_fn(model(x), y)
    torch.manual_seed(seed)
    with backpack(extension):
        loss.backward()
    return {n: getattr(p, extension.savefield) for n, p in model.named_parameters()}


def assert_same(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        a, e = actual[name], expected[name]
        pairs = zip(a, e) if isinstance(e, list) else [(a, e)]
        for x, y in pairs:
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", tn.__all__)
def test_instance_made_before_enable_uses_tn_rules(name):
    extension = getattr(bp, name)()  # a client's instance, made before the switch
    groups = 1 if name in KRONECKER else 2  # BackPACK's promise: 2-d factors
    tnbackpack.enable()
    actual = run(extension, groups=groups)
    assert type(extension) is getattr(bp, name)
    assert extension.savefield == getattr(tn, name)().savefield
    tnbackpack.disable()
    assert_same(actual, run(getattr(tn, name)(), groups=groups))


@pytest.mark.parametrize("name", KRONECKER)
def test_backpack_kronecker_refuses_grouped_layers_clearly(name):
    """Stacked per-group factors are no 2-d pair: a clear error, not a shape error."""
    tnbackpack.enable()
    with pytest.raises(NotImplementedError, match=r"Conv2d\(4, 4.*groups=2.*stacked"):
        run(getattr(bp, name)())
    stacked = run(getattr(tn, name)())["2.weight"]  # tnbackpack's own class
    assert stacked[0].shape == (2, 2, 2) and stacked[1].shape == (2, 18, 18)


def test_instance_made_after_enable_under_another_name():
    tnbackpack.enable()
    actual = run(AliasedBatchGrad())
    assert_same(actual, run(tn.BatchGrad()))


def test_per_sample_gradients_are_right_where_backpack_is_wrong():
    """Circular padding: BackPACK's gradients are wrong, the switched ones exact."""
    model = net()
    x, y = data()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    params = {n: p.detach() for n, p in model.named_parameters()}

    def sample_loss(p, xn, yn):
        return loss_fn(functional_call(model, p, (xn[None],)), yn[None])

    truth = torch.func.vmap(torch.func.grad(sample_loss), (None, 0, 0))(params, x, y)
    # BackPACK's mean-reduced per-sample gradients are 1/N of the summed loss's
    scale = 1.0 / x.shape[0]
    with tnbackpack.enabled():
        switched = run(bp.BatchGrad())
    stock = run(bp.BatchGrad())
    torch.testing.assert_close(switched["0.weight"], truth["0.weight"] * scale)
    assert not torch.allclose(stock["0.weight"], truth["0.weight"] * scale)


def test_disable_restores_backpack():
    lookup = getattr(BackpropExtension, switch._LOOKUP)
    methods = {m: ConvNDDerivatives.__dict__[m] for m in switch.DERIVATIVE_METHODS}
    stock = run(bp.DiagGGNExact())
    tnbackpack.enable()
    tnbackpack.enable()  # idempotent
    assert tnbackpack.is_enabled()
    tnbackpack.disable()
    assert not tnbackpack.is_enabled()
    assert getattr(BackpropExtension, switch._LOOKUP) is lookup
    assert {m: ConvNDDerivatives.__dict__[m] for m in methods} == methods
    assert_same(run(bp.DiagGGNExact()), stock)
    tnbackpack.disable()  # idempotent


def test_context_manager_restores_the_previous_state():
    with tnbackpack.enabled():
        assert tnbackpack.is_enabled()
    assert not tnbackpack.is_enabled()
    tnbackpack.enable()
    with tnbackpack.enabled():
        pass
    assert tnbackpack.is_enabled()


class MarkerRule(FirstOrderModuleExtension):
    """A user's own conv rule: every weight gets a tensor of sevens."""

    def __init__(self):
        super().__init__(params=["weight", "bias"])

    def weight(self, ext, module, g_inp, g_out, backproped):
        return torch.full_like(module.weight, 7.0).unsqueeze(0)

    def bias(self, ext, module, g_inp, g_out, backproped):
        return torch.full_like(module.bias, 7.0).unsqueeze(0)


class MyBatchGrad(bp.BatchGrad):
    def __init__(self):
        super().__init__()
        self.set_module_extension(nn.Conv2d, MarkerRule(), overwrite=True)


def test_users_own_rule_wins():
    tnbackpack.enable()
    results = run(MyBatchGrad())
    assert (results["0.weight"] == 7).all() and (results["2.weight"] == 7).all()
    # the layers the user left alone are on tnbackpack's rules
    expected = run(tn.BatchGrad())["4.weight"]
    assert_same({"4.weight": results["4.weight"]}, {"4.weight": expected})


def test_tnbackpack_extensions_keep_their_options():
    tnbackpack.enable()
    actual = run(tn.KFAC(kfac_approx="reduce"))
    tnbackpack.disable()
    assert_same(actual, run(tn.KFAC(kfac_approx="reduce")))


def test_backpack_derivatives_use_the_engine():
    """``Conv2DDerivatives`` products against torch.func on a circular conv."""
    torch.manual_seed(3)
    plain = nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular").to(DTYPE)
    conv = extend(copy.deepcopy(plain))
    x = torch.randn(2, 2, 5, 5, dtype=DTYPE)
    out = conv(x.clone().requires_grad_())
    mat = torch.randn(4, *out.shape, dtype=DTYPE)
    _, input_pullback = vjp(plain, x)
    _, weight_pullback = vjp(
        lambda w: functional_call(plain, {"weight": w}, (x,)), plain.weight.detach()
    )
    input_truth = torch.stack([input_pullback(m)[0] for m in mat])
    weight_truth = torch.stack([weight_pullback(m)[0] for m in mat])
    derivatives = Conv2DDerivatives()  # made before the switch
    stock = derivatives.jac_t_mat_prod(conv, None, None, mat)
    with tnbackpack.enabled():
        switched = derivatives.jac_t_mat_prod(conv, None, None, mat)
        weight_rows = derivatives.param_mjp("weight", conv, None, None, mat)
    torch.testing.assert_close(switched, input_truth)
    torch.testing.assert_close(weight_rows, weight_truth)
    assert not torch.allclose(stock, input_truth)
