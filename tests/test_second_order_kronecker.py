"""KFAC, KFLR and KFRA factors of every conv type against independent references.

References (see ``test_second_order_reference``): the backpropagated square
root is built from an eigendecomposition of the loss Hessian and ``torch.func``
Jacobians of the rest of the network (KFLR), or from the MC draw BackPACK makes
under the same seed (KFAC); KFRA's ``Ḡ`` from per-segment Jacobians; patches
from the Jacobian of PyTorch's layer w.r.t. its weight. The factors are
checked for the layer under test and for the convolution before it.
"""

from __future__ import annotations

import copy
from typing import Dict, List

import pytest
import torch
from hypothesis import assume, given, settings
from test_second_order_reference import (
    FIXED_CASES,
    Case,
    assert_close,
    build_net,
    case,
    conv_modules,
    ggn,
    is_valid,
    kfra_output_matrix,
    kfra_reference,
    kronecker_reference,
    layer_cases,
    layer_index,
    loss_hessian_sqrt,
    make_loss,
    make_targets,
    run,
    sampled_loss_hessian_sqrt,
    unstack,
    with_output_size,
)
from test_second_order_reference import backpropagated_sqrt as pullback
from torch import Tensor, nn

from tnbackpack.extensions import KFAC, KFLR, KFRA

CASES = FIXED_CASES + [with_output_size()]
IDS = [str(c) for c in CASES]
APPROXIMATIONS = ["backpack", "expand", "reduce"]
SAVEFIELD = {KFAC: "kfac", KFLR: "kflr", KFRA: "kfra"}


def factors_of(out: Dict[str, List[Tensor]], prefix: str, bias: bool):
    weight = out[prefix + ".weight"]
    return weight, (out[prefix + ".bias"] if bias else None)


def check_against(model, x, kind, approx, out, reference_sqrt, dtype=torch.float64):
    """Compare the factors of every conv in ``model`` with the reference."""
    for prefix, layer in conv_modules(model):
        index = layer_index(model, layer)
        size = getattr(model[index], "output_size", None)
        sqrt = reference_sqrt(index)
        if kind is KFRA:
            b, a, bias = kfra_reference(
                layer, x_of(model, index, x), sqrt, approx, size
            )
        else:
            b, a, bias = kronecker_reference(
                layer, x_of(model, index, x), sqrt, approx, size
            )
        weight, bias_factor = factors_of(out, prefix, layer.bias is not None)
        assert len(weight) == 2
        assert_close(weight[0], unstack(b).to(dtype), dtype)
        assert_close(weight[1], unstack(a).to(dtype), dtype)
        if bias_factor is not None:
            assert len(bias_factor) == 1
            assert_close(bias_factor[0], bias.to(dtype), dtype)


def x_of(model: nn.Sequential, index: int, x: Tensor) -> Tensor:
    """The input of ``model[index]``."""
    return model[:index](x).detach()


def check_kronecker(
    spec: Case,
    kind,
    approx: str,
    dtype=torch.float64,
    mc_samples: int = 1,
    loss_name: str = "ce-mean",
    seed: int = 0,
):
    torch.manual_seed(seed)
    activation = nn.ReLU if kind is KFRA else nn.Sigmoid
    model, x = build_net(spec, activation=activation, dtype=dtype)
    ref = copy.deepcopy(model).double()
    x_ref = x.double()
    loss_fn = make_loss(loss_name)
    ref_loss = make_loss(loss_name)  # BackPACK's hooks on loss_fn break torch.func
    y = make_targets(loss_name, spec.batch, dtype)
    y_ref = y if loss_name.startswith("ce") else y.double()
    logits = ref(x_ref)
    if kind is KFLR:
        root = loss_hessian_sqrt(ref_loss, logits, y_ref)
    elif kind is KFAC:
        torch.manual_seed(seed + 1)
        root = sampled_loss_hessian_sqrt(logits, mc_samples, loss_name.split("-")[1])
    indices = [layer_index(ref, m) for _, m in conv_modules(ref)]

    def reference_sqrt(index: int) -> Tensor:
        if kind is KFRA:
            return kfra_output_matrix(
                ref, indices[indices.index(index) :], x_ref, ref_loss, y_ref
            )
        return pullback(ref, index, x_ref, root)

    ext = (
        KFAC(mc_samples, kfac_approx=approx)
        if kind is KFAC
        else kind(kfac_approx=approx)
    )
    out = run(model, loss_fn, x, y, ext, seed=seed + 1)[SAVEFIELD[kind]]
    check_against(ref, x_ref, kind, approx, out, reference_sqrt, dtype)


# ----------------------------------------------------------------- KFLR/KFAC
@pytest.mark.parametrize("approx", APPROXIMATIONS)
@pytest.mark.parametrize("spec", CASES, ids=IDS)
def test_kflr(spec, approx):
    check_kronecker(spec, KFLR, approx)


@pytest.mark.parametrize("approx", APPROXIMATIONS)
@pytest.mark.parametrize("index", [1, 4, 8, 12, 16, 18])
def test_kfac(index, approx):
    check_kronecker(FIXED_CASES[index], KFAC, approx)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_several_samples(approx):
    check_kronecker(FIXED_CASES[2], KFAC, approx, mc_samples=3)


@pytest.mark.parametrize("loss_name", ["ce-sum", "mse-mean"])
def test_kflr_other_losses(loss_name):
    check_kronecker(FIXED_CASES[7], KFLR, "expand", loss_name=loss_name)


@pytest.mark.parametrize("approx", APPROXIMATIONS)
def test_kflr_float32(approx):
    check_kronecker(FIXED_CASES[6], KFLR, approx, dtype=torch.float32)
    check_kronecker(FIXED_CASES[15], KFLR, approx, dtype=torch.float32)


# ----------------------------------------------------------------------- KFRA
@pytest.mark.parametrize("approx", APPROXIMATIONS)
@pytest.mark.parametrize("index", [0, 2, 4, 7, 10, 13, 15, 16, 19])
def test_kfra(index, approx):
    check_kronecker(FIXED_CASES[index], KFRA, approx)


def test_kfra_output_size():
    check_kronecker(with_output_size(), KFRA, "backpack")


def test_multi_conv_net_with_max_pooling():
    """KFLR and KFAC in conv -> ReLU -> conv -> maxpool -> flatten -> linear."""
    torch.manual_seed(14)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(4, 4, 2, padding="same", groups=2),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 2, 3),
    ).double()
    x = torch.randn(3, 2, 6, 5, dtype=torch.float64)
    loss_fn, y = make_loss("ce-mean"), make_targets("ce-mean", 3, torch.float64)
    ref = copy.deepcopy(model)
    logits = ref(x)
    for kind in (KFLR, KFAC):
        for approx in APPROXIMATIONS:
            if kind is KFLR:
                root = loss_hessian_sqrt(make_loss("ce-mean"), logits, y)
            else:
                torch.manual_seed(15)
                root = sampled_loss_hessian_sqrt(logits, 1, "mean")
            ext = kind(kfac_approx=approx)
            out = run(model, loss_fn, x, y, ext, seed=15)[SAVEFIELD[kind]]
            for p in model.parameters():
                delattr(p, SAVEFIELD[kind])

            def sqrt_at(index: int, root=root) -> Tensor:
                return pullback(ref, index, x, root)

            check_against(ref, x, kind, approx, out, sqrt_at)


# ------------------------------------------------------------- orientation
@pytest.mark.parametrize(
    "spec",
    [
        case(2, (3, 2), kernel_size=(3, 2)),
        case(2, (3, 2), in_channels=4, out_channels=2, kernel_size=(3, 2), groups=2),
        case(1, (1,), True, kernel_size=3, padding=1),
        case(
            2,
            (1, 1),
            True,
            in_channels=4,
            out_channels=6,
            kernel_size=3,
            padding=1,
            groups=2,
        ),
    ],
    ids=str,
)
def test_one_location_one_sample_is_exact(spec):
    """With ``N = T = 1`` every approximation is exact: ``B ⊗ A`` is the GGN.

    Pins down the documented flattening: ``weight.flatten(1)`` per group for a
    convolution, ``weight.transpose(0, 1)`` per group for a transposed one.
    """
    torch.manual_seed(9)
    spec = copy.deepcopy(spec)
    spec.batch = 1
    model, x = build_net(spec, activation=nn.Sigmoid, first_conv=False)
    ref = copy.deepcopy(model)
    loss_fn, y = make_loss("ce-mean"), make_targets("ce-mean", 1, torch.float64)
    layer = model[0]
    exact = ggn(ref, loss_fn, x, y, ["0.weight"])
    groups = layer.groups
    weight = layer.weight.detach()
    # Index of each entry of the per-group flattening in weight.flatten().
    positions = torch.arange(weight.numel()).reshape(weight.shape)
    if layer.transposed:
        positions = positions.unflatten(0, (groups, -1)).transpose(1, 2)
    else:
        positions = positions.unflatten(0, (groups, -1))
    positions = positions.flatten(2)  # [G, co, ci·∏K]
    for approx in APPROXIMATIONS:
        factors = run(model, loss_fn, x, y, KFLR(kfac_approx=approx))["kflr"][
            "0.weight"
        ]
        for p in model.parameters():
            delattr(p, "kflr")
        b, a = (f if groups > 1 else f.unsqueeze(0) for f in factors)
        for g in range(groups):
            index = positions[g].flatten()
            assert_close(torch.kron(b[g], a[g]), exact[index][:, index])


# ---------------------------------------------------------------- arguments
@pytest.mark.parametrize("kind", [KFAC, KFLR, KFRA])
def test_unknown_approximation_is_rejected(kind):
    with pytest.raises(ValueError, match="kfac_approx"):
        kind(kfac_approx="exact")


def test_backpack_is_the_default():
    assert KFAC().kfac_approx == KFLR().kfac_approx == KFRA().kfac_approx == "backpack"
    assert KFAC(mc_samples=4).get_num_mc_samples() == 4


# ------------------------------------------------------------------ sweeps
@settings(max_examples=6)
@given(layer_cases())
def test_kflr_sweep(spec):
    assume(is_valid(spec))
    for approx in APPROXIMATIONS:
        check_kronecker(spec, KFLR, approx)


@settings(max_examples=3)
@given(layer_cases(max_ndim=2))
def test_kfac_and_kfra_sweep(spec):
    assume(is_valid(spec))
    for approx in APPROXIMATIONS:
        check_kronecker(spec, KFAC, approx)
        check_kronecker(spec, KFRA, approx)


@pytest.mark.slow
@settings(max_examples=120)
@given(layer_cases())
def test_kronecker_sweep_slow(spec):
    assume(is_valid(spec))
    for approx in APPROXIMATIONS:
        check_kronecker(spec, KFLR, approx)
        check_kronecker(spec, KFAC, approx)
        check_kronecker(spec, KFRA, approx)
