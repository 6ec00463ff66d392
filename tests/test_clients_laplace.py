"""laplace-torch on tnbackpack's conv rules through ``tnbackpack.enable()``.

laplace-torch's BackPACK backends construct BackPACK's own extensions
(``DiagGGNExact``, ``KFLR``, ``SumGradSquared``, ``BatchGrad``); the switch puts
them on tnbackpack's rules without touching laplace. Checked: equal to stock
BackPACK on plain convolutions; equal to torch.func references (GGN diagonal,
empirical Fisher diagonal, Jacobians) with circular padding and groups, where
stock BackPACK is wrong; a clear error for Kronecker factors of grouped layers,
which laplace's ``Kron`` cannot consume. Skipped without laplace-torch (the
optional ``clients`` extra).
"""

from __future__ import annotations

import clients_common as common
import pytest
import torch
from clients_common import switched_off  # noqa: F401
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

from tnbackpack.benchmark.client_shims import stub_broken_torchvision

stub_broken_torchvision()
laplace = pytest.importorskip("laplace")

from laplace.curvature import BackPackEF, BackPackGGN  # noqa: E402

import tnbackpack  # noqa: E402

TOL = {"rtol": 1e-10, "atol": 1e-12}


def cnn(kind: str) -> nn.Sequential:
    """``plain``: where BackPACK is right; ``hard``: circular padding and groups."""
    hard = kind == "hard"
    return common.cnn("circular" if hard else "zeros", 2 if hard else 1, size=5)


def dataset():
    return common.data(12, 5)


def fitted(kind: str, structure: str, backend, switched: bool, **kwargs):
    """A fitted Laplace approximation and its GLM predictive on four inputs.

    The predictive is taken right away: laplace-torch's BackPACK Jacobians of
    one ``Laplace`` object stop working once another object has been fitted
    (stock BackPACK too; its hooks are global), so every test predicts before
    it fits the next one.
    """
    x, y = dataset()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=4
    )
    la = laplace.Laplace(
        cnn(kind),
        "classification",
        subset_of_weights="all",
        hessian_structure=structure,
        backend=backend,
        **kwargs,
    )
    with common.switch(switched):
        la.fit(loader)
        predictive = la(x[:4], pred_type="glm", link_approx="probit")
    return la, predictive


def flat_model(kind: str):
    model = cnn(kind)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])

    def forward(t, x):
        params = {n: p.reshape(s) for n, p, s in zip(names, t.split(sizes), shapes)}
        return functional_call(model, params, (x,))

    return forward, theta


def ggn_diagonal(kind: str) -> torch.Tensor:
    """``Σ_n diag(J_nᵀ H_n J_n)`` for the summed cross-entropy (laplace's loss)."""
    forward, theta = flat_model(kind)
    x, y = dataset()
    jac = jacrev(forward)(theta, x)  # [N, C, P]
    out = forward(theta, x)
    loss = nn.CrossEntropyLoss(reduction="sum")
    full = hessian(lambda o: loss(o, y))(out)
    blocks = torch.einsum("ncnd->ncd", full)
    return torch.einsum("ncp,ncd,ndp->p", jac, blocks, jac)


def empirical_fisher_diagonal(kind: str) -> torch.Tensor:
    forward, theta = flat_model(kind)
    x, y = dataset()
    loss = nn.CrossEntropyLoss(reduction="sum")

    def sample_loss(t, xn, yn):
        return loss(forward(t, xn[None]), yn[None])

    per_sample = vmap(grad(sample_loss), (None, 0, 0))(theta, x, y)
    return (per_sample**2).sum(0)


# ------------------------------------------------------------- diagonals
@pytest.mark.parametrize("backend", [BackPackGGN, BackPackEF])
def test_diag_equals_stock_backpack_where_it_is_right(backend):
    stock, expected = fitted("plain", "diag", backend, switched=False)
    switched, actual = fitted("plain", "diag", backend, switched=True)
    torch.testing.assert_close(switched.H, stock.H, **TOL)
    torch.testing.assert_close(actual, expected, **TOL)


@pytest.mark.parametrize(
    "backend, reference",
    [(BackPackGGN, ggn_diagonal), (BackPackEF, empirical_fisher_diagonal)],
)
def test_diag_equals_torch_func_where_backpack_is_wrong(backend, reference):
    truth = reference("hard")
    switched, _ = fitted("hard", "diag", backend, switched=True)
    torch.testing.assert_close(switched.H, truth, **TOL)
    stock, _ = fitted("hard", "diag", backend, switched=False)
    assert (stock.H - truth).abs().max() > 1e-3 * truth.abs().max()


def test_jacobians_for_the_predictive_equal_torch_func():
    """The GLM predictive's Jacobians (laplace's BatchGrad loop), circular + groups."""
    la, _ = fitted("hard", "diag", BackPackGGN, switched=True)
    x, _ = dataset()
    forward, theta = flat_model("hard")
    with tnbackpack.enabled():
        jac, out = la.backend.jacobians(x[:4])
    torch.testing.assert_close(jac, jacrev(forward)(theta, x[:4]), **TOL)
    torch.testing.assert_close(out, forward(theta, x[:4]), **TOL)


def test_enable_backprop_predictive_is_differentiable():
    """``enable_backprop=True`` (laplace-bayesopt) needs create_graph=True."""
    x, _ = dataset()
    grads = []
    for switched in (False, True):
        la, _ = fitted("plain", "diag", BackPackGGN, switched, enable_backprop=True)
        inputs = x[:3].clone().requires_grad_()
        with common.switch(switched):
            probs = la(inputs, pred_type="glm", link_approx="probit")
        (g,) = torch.autograd.grad(probs[:, 0].sum(), inputs)
        grads.append(g)
    torch.testing.assert_close(grads[1], grads[0], **TOL)


# ------------------------------------------------------------- Kronecker
def test_kron_equals_stock_backpack_where_it_is_right():
    stock, expected = fitted("plain", "kron", BackPackGGN, switched=False)
    switched, actual = fitted("plain", "kron", BackPackGGN, switched=True)
    torch.testing.assert_close(switched.H.to_matrix(), stock.H.to_matrix(), **TOL)
    torch.testing.assert_close(actual, expected, **TOL)


def test_kron_of_a_grouped_layer_is_a_clear_error():
    with pytest.raises(NotImplementedError, match=r"groups=2.*laplace-torch's Kron"):
        fitted("hard", "kron", BackPackGGN, switched=True)
