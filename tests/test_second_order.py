"""Exact second-order quantities of every conv type against torch.func ground truth.

Covered: ``DiagGGNExact``, ``BatchDiagGGNExact``, ``SqrtGGNExact`` (``S Sᵀ`` is
the GGN block of all conv parameters, cross terms included), ``DiagHessian``,
``BatchDiagHessian`` and the MC variants (whose BackPACK-drawn loss square root
is re-drawn independently under the same seed), plus the derivatives object's
input VJP (both routes) and KFRA's ``Jᵀ Ḡ J``. The networks are
``conv -> sigmoid -> layer -> sigmoid -> flatten -> linear`` so the first
convolution's quantities have passed through the layer under test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import assume, given, settings
from test_second_order_reference import (
    FIXED_CASES,
    Case,
    assert_close,
    build_net,
    conv_parameter_names,
    flat,
    ggn,
    is_valid,
    layer_cases,
    loss_parameter_hessian,
    make_loss,
    make_targets,
    output_jacobian,
    per_sample_ggn_diagonal,
    per_sample_hessian_diagonal,
    run,
    sampled_loss_hessian_sqrt,
    with_output_size,
)
from test_second_order_reference import case as make_case
from torch import Tensor, nn
from torch.func import jacrev

from tnbackpack.extensions import (
    BatchDiagGGNExact,
    BatchDiagGGNMC,
    BatchDiagHessian,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
    SqrtGGNExact,
    SqrtGGNMC,
)
from tnbackpack.extensions.derivatives import (
    ConvDerivatives,
    input_vjp,
)
from tnbackpack.extensions.layer import conv_spec
from tnbackpack.tn import functional

CASES = FIXED_CASES + [with_output_size()]
IDS = [str(c) for c in CASES]


# ---------------------------------------------------------------- helpers
def setup(case: Case, dtype: torch.dtype, loss_name: str, activation=nn.Sigmoid):
    """Model, input, loss, targets, a float64 copy for references, conv names."""
    model, x = build_net(case, activation=activation, dtype=dtype)
    reference = copy.deepcopy(model).double()
    loss_fn = make_loss(loss_name)
    y = make_targets(loss_name, case.batch, dtype)
    y_ref = y if loss_name.startswith("ce") else y.double()
    return (
        model,
        x,
        loss_fn,
        y,
        reference,
        x.double(),
        y_ref,
        conv_parameter_names(model),
    )


def check_exact_ggn(case: Case, dtype=torch.float64, loss_name="ce-mean", seed=0):
    torch.manual_seed(seed)
    model, x, loss_fn, y, ref, x_ref, y_ref, names = setup(case, dtype, loss_name)
    full = ggn(ref, loss_fn, x_ref, y_ref, names)
    per_sample = per_sample_ggn_diagonal(ref, loss_fn, x_ref, y_ref, names)
    out = run(model, loss_fn, x, y, DiagGGNExact(), BatchDiagGGNExact(), SqrtGGNExact())
    expect = torch.diagonal(full).to(dtype)
    assert_close(flat(out["diag_ggn_exact"], names), expect, dtype)
    assert_close(
        flat(out["diag_ggn_exact_batch"], names, 1), per_sample.to(dtype), dtype
    )
    sqrt = flat(out["sqrt_ggn_exact"], names, 2)  # [V, N, P]
    assert_close(torch.einsum("vnp,vnq->pq", sqrt, sqrt), full.to(dtype), dtype)


def check_diag_hessian(case: Case, dtype=torch.float64, loss_name="ce-mean", seed=0):
    torch.manual_seed(seed)
    model, x, loss_fn, y, ref, x_ref, y_ref, names = setup(case, dtype, loss_name)
    hess = torch.diagonal(loss_parameter_hessian(ref, loss_fn, x_ref, y_ref, names))
    per_sample = per_sample_hessian_diagonal(ref, loss_fn, x_ref, y_ref, names)
    out = run(model, loss_fn, x, y, DiagHessian(), BatchDiagHessian())
    assert_close(flat(out["diag_h"], names), hess.to(dtype), dtype)
    assert_close(flat(out["diag_h_batch"], names, 1), per_sample.to(dtype), dtype)


def check_monte_carlo(case: Case, mc_samples: int, dtype=torch.float64, seed=0):
    """MC quantities from the loss square root re-drawn under the same seed."""
    torch.manual_seed(seed)
    model, x, loss_fn, y, ref, x_ref, y_ref, names = setup(case, dtype, "ce-mean")
    jac = output_jacobian(ref, x_ref, names)  # [N, C, P]
    torch.manual_seed(seed + 1)
    root = sampled_loss_hessian_sqrt(ref(x_ref), mc_samples, "mean")  # [M, N, C]
    sqrt_ref = torch.einsum("ncp,mnc->mnp", jac, root)
    extensions = (
        DiagGGNMC(mc_samples),
        BatchDiagGGNMC(mc_samples),
        SqrtGGNMC(mc_samples),
    )
    # Each MC extension draws in turn; only the first sees the seeded draw,
    # so run them one at a time.
    for ext in extensions:
        out = run(model, loss_fn, x, y, ext, seed=seed + 1)[ext.savefield]
        for p in model.parameters():
            delattr(p, ext.savefield)
            p.grad = None
        if ext.savefield == "sqrt_ggn_mc":
            actual, expected = flat(out, names, 2), sqrt_ref
        elif ext.savefield == "diag_ggn_mc_batch":
            actual, expected = flat(out, names, 1), sqrt_ref.square().sum(0)
        else:
            actual, expected = flat(out, names), sqrt_ref.square().sum((0, 1))
        assert_close(actual, expected.to(dtype), dtype)


# ---------------------------------------------------------- exact GGN & co
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_exact_ggn_quantities(case):
    check_exact_ggn(case)


@pytest.mark.parametrize("loss_name", ["ce-sum", "mse-mean", "mse-sum"])
def test_exact_ggn_quantities_other_losses(loss_name):
    check_exact_ggn(FIXED_CASES[1], loss_name=loss_name)
    check_exact_ggn(FIXED_CASES[15], loss_name=loss_name)


@pytest.mark.parametrize("case", CASES[::3], ids=IDS[::3])
def test_exact_ggn_quantities_float32(case):
    check_exact_ggn(case, dtype=torch.float32)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_diag_hessian(case):
    check_diag_hessian(case)


@pytest.mark.parametrize("loss_name", ["ce-sum", "mse-mean"])
def test_diag_hessian_other_losses(loss_name):
    check_diag_hessian(FIXED_CASES[4], loss_name=loss_name)


def test_diag_hessian_float32():
    check_diag_hessian(FIXED_CASES[7], dtype=torch.float32)
    check_diag_hessian(FIXED_CASES[15], dtype=torch.float32)


@pytest.mark.parametrize("mc_samples", [1, 3])
@pytest.mark.parametrize("index", [2, 6, 8, 15, 19])
def test_monte_carlo_quantities(index, mc_samples):
    check_monte_carlo(FIXED_CASES[index], mc_samples)


def test_monte_carlo_quantities_float32():
    check_monte_carlo(FIXED_CASES[5], 2, dtype=torch.float32)


def test_sqrt_ggn_subsampling():
    """With ``subsampling`` the square root is the full one's selected samples."""
    torch.manual_seed(4)
    spec = copy.deepcopy(FIXED_CASES[6])
    spec.batch = 4
    model, x, loss_fn, y, ref, x_ref, y_ref, names = setup(
        spec, torch.float64, "ce-mean"
    )
    full = run(model, loss_fn, x, y, SqrtGGNExact())["sqrt_ggn_exact"]
    for p in model.parameters():
        delattr(p, "sqrt_ggn_exact")
    sub = run(model, loss_fn, x, y, SqrtGGNExact(subsampling=[0, 2]))["sqrt_ggn_exact"]
    for name in names:
        assert_close(sub[name], full[name][:, [0, 2]])


def test_multi_conv_net_with_max_pooling():
    """conv -> ReLU -> conv -> maxpool -> flatten -> linear, every conv parameter."""
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"),
        nn.ReLU(),
        nn.Conv2d(3, 4, 2, padding="same"),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 2, 3),
    ).double()
    x = torch.randn(3, 2, 6, 5, dtype=torch.float64)
    loss_fn, y = make_loss("ce-mean"), make_targets("ce-mean", 3, torch.float64)
    names = conv_parameter_names(model)
    ref = copy.deepcopy(model)
    full = ggn(ref, loss_fn, x, y, names)
    per_sample = per_sample_ggn_diagonal(ref, loss_fn, x, y, names)
    out = run(model, loss_fn, x, y, DiagGGNExact(), BatchDiagGGNExact(), SqrtGGNExact())
    assert_close(flat(out["diag_ggn_exact"], names), torch.diagonal(full))
    assert_close(flat(out["diag_ggn_exact_batch"], names, 1), per_sample)
    sqrt = flat(out["sqrt_ggn_exact"], names, 2)
    assert_close(torch.einsum("vnp,vnq->pq", sqrt, sqrt), full)


@settings(max_examples=8)
@given(layer_cases())
def test_exact_ggn_sweep(case):
    assume(is_valid(case))
    check_exact_ggn(case)


@settings(max_examples=4)
@given(layer_cases(max_ndim=2))
def test_diag_hessian_sweep(case):
    assume(is_valid(case))
    check_diag_hessian(case)


@settings(max_examples=3)
@given(layer_cases(max_ndim=2))
def test_monte_carlo_sweep(case):
    assume(is_valid(case))
    check_monte_carlo(case, mc_samples=2)


@pytest.mark.slow
@settings(max_examples=200)
@given(layer_cases())
def test_exact_ggn_sweep_slow(case):
    assume(is_valid(case))
    check_exact_ggn(case)
    check_diag_hessian(case)
    check_monte_carlo(case, mc_samples=2)


# -------------------------------------------------------- derivatives object
def layer_and_output(case: Case, batch: int = 2):
    layer = case.layer().double()
    x = torch.randn(batch, layer.in_channels, *case.input_size, dtype=torch.float64)
    kwargs = {"output_size": list(case.output_size)} if case.output_size else {}

    def forward(inp: Tensor) -> Tensor:
        return layer(inp, **kwargs)

    out = forward(x)
    # What BackPACK's forward hook stores.
    layer.input0, layer.output = x, out
    return layer, x, out, forward


def check_input_vjp(case: Case):
    torch.manual_seed(6)
    layer, x, out, forward = layer_and_output(case)
    jac = jacrev(forward)(x)  # [N, C_out, *O, N, C_in, *I]
    mat = torch.randn(4, *out.shape, dtype=torch.float64)
    dims = out.ndim
    expected = torch.tensordot(mat, jac, dims=([*range(1, dims + 1)], [*range(dims)]))
    for route in ("torch", "tn", "auto"):
        assert_close(input_vjp(layer, mat, route=route), expected)


def check_kfra_pullback(case: Case):
    """``Jᵀ Ḡ J`` with the per-sample Jacobian (the same for every sample)."""
    torch.manual_seed(7)
    layer, x, out, forward = layer_and_output(case, batch=1)
    jac = jacrev(forward)(x).flatten(0, out.ndim - 1).flatten(1)  # [D_out, D_in]
    matrix = torch.randn(jac.shape[0], jac.shape[0], dtype=torch.float64)
    matrix = matrix + matrix.t()
    for route in ("torch", "tn"):
        pulled = ConvDerivatives(route).ea_jac_t_mat_jac_prod(layer, None, None, matrix)
        assert_close(pulled, jac.t() @ matrix @ jac)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_input_vjp_routes(case):
    check_input_vjp(case)


@pytest.mark.parametrize("case", CASES[::2], ids=IDS[::2])
def test_kfra_pullback(case):
    check_kfra_pullback(case)


@settings(max_examples=15)
@given(layer_cases())
def test_input_vjp_sweep(case):
    assume(is_valid(case))
    check_input_vjp(case)


def test_weight_mjp_sum_batch():
    """``param_mjp`` with ``sum_batch=True`` sums the per-sample products."""
    torch.manual_seed(8)
    layer, x, out, _ = layer_and_output(FIXED_CASES[16], batch=3)
    mat = torch.randn(2, *out.shape, dtype=torch.float64)
    derivatives = ConvDerivatives()
    for param in ("weight", "bias"):
        each = derivatives.param_mjp(param, layer, None, None, mat, sum_batch=False)
        summed = derivatives.param_mjp(param, layer, None, None, mat, sum_batch=True)
        assert_close(summed, each.sum(1))


def test_output_padding_rescues_empty_output():
    """ConvTranspose1d(k=2, s=2, p=1, output_padding=1) maps length 1 to 1.

    Without ``output_padding`` the output would be empty; PyTorch accepts the
    layer, and so must the engine's output-size checks.
    """
    spec = make_case(
        1, (1,), True, kernel_size=2, stride=2, padding=1, output_padding=1
    )
    spec.batch = 1
    check_exact_ggn(spec)


@pytest.mark.parametrize(
    "index, route",
    [(0, "torch"), (1, "torch"), (9, "tn"), (10, "tn"), (15, "torch"), (19, "torch")],
)
def test_automatic_route(index, route):
    """Engine for non-overlapping windows of a convolution, PyTorch otherwise."""
    layer = FIXED_CASES[index].layer()
    assert functional.input_vjp_route(conv_spec(layer)) == route


def test_bad_route_is_rejected():
    with pytest.raises(ValueError, match="input_vjp_route"):
        ConvDerivatives("fast")
