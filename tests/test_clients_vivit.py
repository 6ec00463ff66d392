"""vivit on tnbackpack's conv rules through ``tnbackpack.enable()``.

vivit's ``ViViTGGN`` extensions bring their own conv module extensions built
on BackPACK's ``Conv2DDerivatives``; the switch routes those derivatives to the
engine, and the ``BatchGrad``/``SqrtGGNExact`` that vivit's directional
derivatives construct get tnbackpack's rules. GGN eigenvalues (``eigvalsh``)
and directional derivatives along the top eigenvectors equal stock BackPACK's
where it is right and the torch.func truth with circular padding (stock
BackPACK's top eigenvalues are off there). vivit 1.0.0 calls
``Tensor.symeig`` (removed in torch 2): the tests run it inside
:func:`tnbackpack.benchmark.client_shims.symeig_shim`. Skipped without vivit
(the optional ``clients`` extra).
"""

from __future__ import annotations

import copy

import clients_common as common
import pytest
import torch
from clients_common import switched_off  # noqa: F401
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

from tnbackpack.benchmark.client_shims import symeig_shim

vivit = pytest.importorskip("vivit")

from backpack import backpack, extend  # noqa: E402
from vivit.linalg.eigvalsh import EigvalshComputation  # noqa: E402
from vivit.optim.directional_derivatives import (  # noqa: E402
    DirectionalDerivativesComputation,
)

import tnbackpack  # noqa: E402

TOP = 3
TOL = {"rtol": 1e-9, "atol": 1e-11}


def cnn(padding_mode: str) -> nn.Sequential:
    return common.cnn(padding_mode, groups=2, size=4)


def data():
    return common.data(4, 4)


def top_indices(evals):
    return list(range(len(evals)))[-TOP:]


def run_vivit(padding_mode: str):
    """vivit's GGN eigenvalues, and ``γ``, ``λ`` along the top eigenvectors."""
    x, y = data()
    model = extend(cnn(padding_mode))
    loss_fn = extend(nn.CrossEntropyLoss())
    group = {"params": list(model.parameters())}
    eigvalsh = EigvalshComputation()
    hook = eigvalsh.get_extension_hook([group])
    with symeig_shim(), backpack(eigvalsh.get_extension(), extension_hook=hook):
        loss_fn(model(x), y).backward()
    evals = eigvalsh.get_result(group)
    model.zero_grad()
    group = {"params": list(model.parameters()), "criterion": top_indices}
    directional = DirectionalDerivativesComputation()
    hook = directional.get_extension_hook([group])
    with symeig_shim(), backpack(*directional.get_extensions(), extension_hook=hook):
        loss_fn(model(x), y).backward()
    gammas, lambdas = directional.get_result(group)
    return evals, gammas, lambdas


def truth(padding_mode: str):
    """GGN eigen-pairs (mean loss), per-sample gradients and GGNs, by torch.func."""
    model = copy.deepcopy(cnn(padding_mode))
    x, y = data()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    loss_fn = nn.CrossEntropyLoss()

    def forward(t, inputs):
        params = {n: p.reshape(s) for n, p, s in zip(names, t.split(sizes), shapes)}
        return functional_call(model, params, (inputs,))

    jac = jacrev(forward)(theta, x)  # [N, C, P]
    out = forward(theta, x)
    blocks = torch.einsum("ncnd->ncd", hessian(lambda o: loss_fn(o, y))(out))
    per_sample_ggn = torch.einsum("ncp,ncd,ndq->npq", jac, blocks, jac)
    evals, evecs = torch.linalg.eigh(per_sample_ggn.sum(0))

    def sample_loss(t, xn, yn):
        return loss_fn(forward(t, xn[None]), yn[None])

    per_sample_grad = vmap(grad(sample_loss), (None, 0, 0))(theta, x, y)
    return evals, evecs, per_sample_grad, per_sample_ggn


def check_against_truth(result, padding_mode: str) -> None:
    evals, gammas, lambdas = result
    true_evals, evecs, sample_grads, sample_ggns = truth(padding_mode)
    count = len(evals)
    torch.testing.assert_close(evals, true_evals[-count:], **TOL)
    top = evecs[:, -TOP:]
    batch = sample_grads.shape[0]
    # vivit's per-sample directional derivatives are those of N·(mean loss)
    true_lambdas = batch * torch.einsum("pk,npq,qk->nk", top, sample_ggns, top)
    torch.testing.assert_close(lambdas, true_lambdas, **TOL)
    true_gammas = sample_grads @ top  # an eigenvector's sign is arbitrary
    signs = torch.sign((gammas * true_gammas).sum(0))
    torch.testing.assert_close(gammas * signs, true_gammas, **TOL)


def test_equal_to_stock_backpack_where_it_is_right():
    stock = run_vivit("zeros")
    with tnbackpack.enabled():
        switched = run_vivit("zeros")
    torch.testing.assert_close(switched[0], stock[0], **TOL)
    torch.testing.assert_close(switched[1].abs(), stock[1].abs(), **TOL)
    torch.testing.assert_close(switched[2], stock[2], **TOL)
    check_against_truth(switched, "zeros")


def test_equal_to_torch_func_where_backpack_is_wrong():
    with tnbackpack.enabled():
        check_against_truth(run_vivit("circular"), "circular")
    stock_evals = run_vivit("circular")[0]
    true_evals = truth("circular")[0][-len(stock_evals) :]
    assert (stock_evals - true_evals).abs().max() > 1e-3 * true_evals.max()
