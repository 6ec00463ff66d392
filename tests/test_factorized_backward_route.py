"""First-order extensions of factorized layers from the layer's own backward.

Inside a first-order extension's context, a BackPACK-extended factorized
layer's backward returns per-sample factor gradients (kept-batch contractions
of its network); the extensions read them instead of walking the stages.
References: ``vmap(grad)`` of the same network with the kernel rebuilt in the
test (:mod:`factorized_cases`), and the stage walk forced by ``ROUTE``.
"""

from __future__ import annotations

import pytest
import torch
from factorized_cases import Case
from test_factorized_extensions import CASES, check_all, data, ids, per_sample_gradients
from test_second_order_reference import run
from torch import nn

from tnbackpack import backpack, extend
from tnbackpack import extensions as ext
from tnbackpack.extensions import factorized, factorized_dense
from tnbackpack.nn.factorized_conv import FactorizedConvNd


@pytest.fixture
def walks(monkeypatch):
    """Count stage walks."""
    calls = []
    original = factorized.FactorizedConvExtension._walk

    def spy(self, *args, **kwargs):
        calls.append(type(self.rule).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(factorized.FactorizedConvExtension, "_walk", spy)
    return calls


def _layer(model: nn.Module) -> FactorizedConvNd:
    (layer,) = [m for m in model.modules() if isinstance(m, FactorizedConvNd)]
    return layer


FIRST_ORDER = (ext.BatchGrad, ext.BatchL2Grad, ext.SumGradSquared, ext.Variance)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_no_walk_and_same_as_walk(case: Case, walks, monkeypatch):
    """All four first-order extensions at once: no walk, the walk's numbers."""
    model, _, x, y = data(case)
    ours = run(model, nn.CrossEntropyLoss(), x, y, *(e() for e in FIRST_ORDER))
    assert walks == []
    assert _layer(model).per_sample_request.gradients is not None
    monkeypatch.setattr(factorized_dense, "ROUTE", "walk")
    model, _, x, y = data(case)
    walked = run(model, nn.CrossEntropyLoss(), x, y, *(e() for e in FIRST_ORDER))
    assert walks and _layer(model).per_sample_request.gradients is None
    for savefield in ours:
        check_all(ours[savefield], walked[savefield])


def test_frozen_factor_and_subsampling(walks):
    """A frozen factor gets nothing; subsampled BatchGrad keeps the chosen rows."""
    case = CASES[2]
    model, reference, x, y = data(case)
    layer = _layer(model)
    frozen = next(iter(layer.factors))
    layer.factors[frozen].requires_grad_(False)
    results = run(model, nn.CrossEntropyLoss(), x, y, ext.BatchGrad(subsampling=[2, 0]))
    assert walks == []
    truth = per_sample_gradients(reference, nn.CrossEntropyLoss(), x, y)
    truth = {k: v[[2, 0]] for k, v in truth.items() if not k.endswith(frozen)}
    check_all(results["grad_batch"], truth)


def test_second_order_only_leaves_nothing(walks):
    """Without a first-order extension the backward makes no per-sample gradients."""
    model, _, x, y = data(CASES[0])
    run(model, nn.CrossEntropyLoss(), x, y, ext.DiagGGNExact())
    assert _layer(model).per_sample_request.gradients is None
    assert walks  # DiagGGNExact walks the stages


def test_outside_backpack_and_stale(walks):
    """A plain backward makes none, and clears those of an earlier backward."""
    model, _, x, y = data(CASES[0])
    model, loss_fn = extend(model), extend(nn.CrossEntropyLoss())
    layer = _layer(model)
    loss = loss_fn(model(x), y)
    with backpack(ext.BatchGrad()):
        loss.backward(retain_graph=True)
    assert layer.per_sample_request.gradients is not None
    loss.backward()
    assert layer.per_sample_request.gradients is None


def test_grad_unchanged(walks):
    """``.grad`` from the per-sample backward equals a plain backward's."""
    model, _, x, y = data(CASES[1])
    model, loss_fn = extend(model), extend(nn.CrossEntropyLoss())
    loss_fn(model(x), y).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with backpack(ext.BatchGrad()):
        loss_fn(model(x), y).backward()
    assert walks == [] and _layer(model).per_sample_request.gradients is not None
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("groups", [1, 2])
def test_first_layer_hook_makes_them_once(groups, walks, monkeypatch):
    """Input needing no gradient: the hook makes them, the backward only sums."""
    from tnbackpack.nn import FactorizedConv2d
    from tnbackpack.tn.conv_einsum import per_sample

    taken = []
    original = per_sample.PerSampleRequest.take_ahead

    def spy(self, grad_output):
        result = original(self, grad_output)
        taken.append(sorted(result))
        return result

    monkeypatch.setattr(per_sample.PerSampleRequest, "take_ahead", spy)
    torch.manual_seed(6)
    layer = FactorizedConv2d(4, 4, 3, 2, "tt", padding=1, groups=groups).double()
    model = extend(nn.Sequential(layer, nn.Flatten(), nn.Linear(4 * 36, 3).double()))
    x = torch.randn(5, 4, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    with backpack(ext.BatchGrad()):
        extend(nn.CrossEntropyLoss())(model(x), y).backward()
    assert walks == [] and taken == [[1, 2, 3, 4]]
    reference = {n: p.grad_batch for n, p in model.named_parameters()}
    monkeypatch.setattr(factorized_dense, "ROUTE", "walk")
    model.zero_grad()
    with backpack(ext.BatchGrad()):
        extend(nn.CrossEntropyLoss())(model(x), y).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad_batch, reference[name])
        torch.testing.assert_close(param.grad, reference[name].sum(0))


def test_first_layer_second_backward_not_stale(walks):
    """A second backward of a retained graph never reads the first one's."""
    from tnbackpack.nn import FactorizedConv2d

    torch.manual_seed(7)
    layer = FactorizedConv2d(4, 4, 3, 2, "cp", padding=1).double()
    model = extend(nn.Sequential(layer, nn.Flatten(), nn.Linear(4 * 36, 3).double()))
    x = torch.randn(5, 4, 6, 6, dtype=torch.float64)
    out = model(x)
    with backpack(ext.BatchGrad(), retain_graph=True):
        out[:, 0].sum().backward(retain_graph=True)
        first = layer.factor_tensors()[0].grad_batch.clone()
        out[:, 1].sum().backward()
        second = layer.factor_tensors()[0].grad_batch
    assert walks  # the second takes the walk: the first's gradients are stale
    assert not torch.allclose(first, second)
    # the second equals a fresh computation of the second output alone
    with backpack(ext.BatchGrad()):
        model(x)[:, 1].sum().backward()
    torch.testing.assert_close(second, layer.factor_tensors()[0].grad_batch)
