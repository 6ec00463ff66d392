"""``backward(create_graph=True)`` on factorized layers: differentiable quantities.

Pattern of :mod:`test_create_graph`: a scalar ``f = Σ_p <R_p, Q_p>`` of the
quantities of the first conv, every factor and the bias (fixed random ``R_p``)
is differentiated by autograd w.r.t. all parameters after the backward pass
with ``create_graph=True``, and compared with ``torch.func.grad`` of the same
``f`` written from first principles on ``conv -> ReLU -> layer -> Sigmoid ->
linear``, where the layer is:

- for BatchGrad and DiagGGNExact, PyTorch's convolution of the kernel rebuilt
  in the test by an explicit einsum (:class:`factorized_cases.RebuiltConv`);
- for KFAC (defined per factor as the Kronecker factors of the stage conv in
  which it acts), the explicit ``nn.Sequential`` of PyTorch stage convs, each
  with a zero bias whose Jacobian gives the stage's output-side factor, and
  patches from one-hot kernels for the input side
  (:func:`test_create_graph.kronecker_reference`). Its parameters are the
  factors reshaped, so its gradients are mapped back by reshaping.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import pytest
import torch
from factorized_cases import Case, RebuiltConv, model_pair, stage_sequence
from test_create_graph import (
    TOL,
    Reference,
    backward_create_graph,
    reference_quantities,
    weighted_sum,
)
from torch import Tensor, nn
from torch.func import grad

from tnbackpack import backpack, extend
from tnbackpack import extensions as tn_extensions

DTYPE = torch.float64
CASES = [
    Case("cp", 2, batch=2, input_size=(4, 4), kwargs={"padding": 1}),
    Case("tucker", (2, 3), batch=2, input_size=(4, 3), kwargs={"stride": (2, 1)}),
]
EXTENSIONS = ["BatchGrad", "DiagGGNExact", "KFAC"]
LAYER = 2  # index of the factorized layer in model_pair's network


def stage_model(model: nn.Sequential) -> Tuple[nn.Sequential, Dict[str, str]]:
    """The network with the layer as biased stage convs; name map factorized -> it.

    Every stage gets a bias (zero where the layer has none) so that the
    reference's bias Jacobian columns are the stage's output-side factor.
    """
    layer = model[LAYER]
    stages = list(stage_sequence(layer))
    for stage in stages[:-1]:
        stage.bias = nn.Parameter(torch.zeros(stage.out_channels, dtype=DTYPE))
    if stages[-1].bias is None:
        stages[-1].bias = nn.Parameter(
            torch.zeros(stages[-1].out_channels, dtype=DTYPE)
        )
    head = [copy.deepcopy(m) for m in model[LAYER + 1 :]]
    built = nn.Sequential(*copy.deepcopy(list(model[:LAYER])), *stages, *head)
    names = {f"{LAYER}.{f}": f"{LAYER + i}.weight" for i, f in enumerate(layer.factors)}
    if layer.bias is not None:
        names[f"{LAYER}.bias"] = f"{LAYER + len(stages) - 1}.bias"
    shift = len(stages) - 1
    for name, _ in model.named_parameters():
        index, attribute = name.split(".", 1)
        if int(index) < LAYER:
            names[name] = name
        elif int(index) > LAYER:
            names[name] = f"{int(index) + shift}.{attribute}"
    return built, names


def check(case: Case, extension: str) -> None:
    model, rebuilt = model_pair(case)
    x = case.x()
    y = torch.randn(case.batch, 3, dtype=DTYPE)
    loss_fn = nn.MSELoss()
    if extension == "KFAC":
        reference_model, names = stage_model(model)
    else:  # same parameter names as the factorized network
        reference_model = copy.deepcopy(rebuilt)
        names = {n: n for n, _ in model.named_parameters()}
    ref = Reference(reference_model, copy.deepcopy(loss_fn), x, y)
    checked = [n for n, _ in model.named_parameters() if int(n.split(".")[0]) <= LAYER]

    run = backward_create_graph(model, loss_fn, x, y, extension, checked)
    params, actual, weights = run.params, run.actual, run.weights

    def reference_values(theta: Tensor) -> Dict[str, object]:
        values = reference_quantities(extension, ref, theta, run.sampled, run.scale)
        return {n: values[names[n]] for n in checked}

    def shaped(value, like_value):
        if isinstance(value, list):
            return [shaped(v, w) for v, w in zip(value, like_value)]
        return value.reshape(like_value.shape)

    expected = reference_values(ref.theta)
    for name in checked:
        got = actual[name]
        want = shaped(expected[name], got)
        pairs = list(zip(got, want)) if isinstance(got, list) else [(got, want)]
        assert any(g.requires_grad for g, _ in pairs), f"{extension}: {name} detached"
        for g, w in pairs:
            torch.testing.assert_close(g.detach(), w.detach(), **TOL)

    def reference_f(theta: Tensor) -> Tensor:
        values = reference_values(theta)
        return weighted_sum({n: shaped(values[n], actual[n]) for n in checked}, weights)

    f = weighted_sum(actual, weights)
    got_grads = torch.autograd.grad(f, list(params.values()), allow_unused=True)
    expected_grads = ref.split(grad(reference_f)(ref.theta))
    for (name, param), g in zip(params.items(), got_grads):
        want = expected_grads[names[name]].reshape(param.shape)
        g = torch.zeros_like(param) if g is None else g
        torch.testing.assert_close(g, want, **TOL, msg=f"{extension}: d f / d {name}")


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
@pytest.mark.parametrize("extension", EXTENSIONS)
def test_factorized_create_graph_matches_double_backward(extension, case):
    check(case, extension)


@pytest.mark.parametrize("extension", EXTENSIONS)
def test_factorized_without_create_graph_nothing_is_recorded(extension):
    """The usual backward pass keeps the detached fast paths."""
    model, _ = model_pair(CASES[0])
    x = CASES[0].x()
    y = torch.randn(x.shape[0], 3, dtype=DTYPE)
    loss_fn = extend(nn.MSELoss())
    extend(model)
    ext = getattr(tn_extensions, extension)()
    with backpack(ext):
        loss_fn(model(x), y).backward()
    for p in model.parameters():
        value = getattr(p, ext.savefield, None)
        for v in value if isinstance(value, list) else [value]:
            assert v is None or not v.requires_grad


LAYER_CASES = [
    Case("cp", 2, kwargs={"padding": 1, "groups": 2}),
    Case(
        "tucker",
        (2, 3),
        ndim=1,
        kwargs={"stride": 2, "padding_mode": "circular", "padding": 1},
    ),
    Case("tt", (2, 3, 2), kwargs={"dilation": (2, 1)}),
    Case("tr", (2, 2, 3, 2), kwargs={"padding": 1, "padding_mode": "reflect"}),
]


@pytest.mark.parametrize("case", LAYER_CASES, ids=[c.id() for c in LAYER_CASES])
def test_layer_double_backward_matches_rebuilt_kernel(case):
    """A gradient penalty through the layer alone (no BackPACK): ``∇_θ ‖∇_{x,θ} L‖²``.

    conv_einsum's own backward is once-differentiable; the layer's must not be.
    """
    layer = case.layer()
    rebuilt = RebuiltConv(layer)  # shares the parameter objects
    params = list(layer.parameters())

    def penalty_gradient(module: nn.Module) -> List[Tensor]:
        gen = torch.Generator().manual_seed(2)
        size = (case.batch, case.in_channels, *case.size())
        x = torch.randn(size, generator=gen, dtype=DTYPE, requires_grad=True)
        out = module(x)
        loss = (out.sin() * torch.linspace(0, 1, out.shape[-1], dtype=DTYPE)).sum()
        first = torch.autograd.grad(loss, [x, *params], create_graph=True)
        penalty = sum((g**2).sum() for g in first)
        return list(torch.autograd.grad(penalty, params))

    got = penalty_gradient(layer)
    want = penalty_gradient(rebuilt)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)
