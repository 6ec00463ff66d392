"""Every tnbackpack extension on factorized convolutions, against independent truths.

The network is ``conv -> ReLU -> factorized -> Sigmoid -> flatten -> linear``,
so quantities must also come back through the factorized layer to the first
conv. References: ``torch.func`` on the same network with the factorized
layer replaced by PyTorch's convolution of the kernel rebuilt in the test
(:mod:`factorized_cases`); Monte-Carlo quantities reproduce BackPACK's draw;
Kronecker factors per factor against tnbackpack's on the explicit
``nn.Sequential`` of the stage convolutions (ordinary conv rules).
"""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch
from factorized_cases import Case, model_pair, stage_sequence
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_second_order_reference import (
    assert_close,
    ggn,
    kronecker_reference,
    loss_hessian_sqrt,
    loss_parameter_hessian,
    output_jacobian,
    per_sample_ggn_diagonal,
    per_sample_hessian_diagonal,
    run,
    sampled_loss_hessian_sqrt,
    unstack,
)
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from tnbackpack import backpack, extend
from tnbackpack import extensions as ext

CASES = [
    Case("cp", 3),
    Case("cp", 2, kwargs={"stride": 2, "padding": 1, "groups": 2}),
    Case("tucker", (2, 3), kwargs={"padding": "same", "padding_mode": "circular"}),
    Case("tucker", 2, ndim=1, kwargs={"dilation": 2, "groups": 2}),
    Case("tt", (2, 3, 2), kwargs={"stride": (2, 1), "padding": (1, 0)}),
    Case("tt", 2, ndim=3, kernel_size=(3, 2, 1), input_size=(4, 4, 3)),
    Case("tr", (2, 2, 3, 2), kwargs={"padding": 1, "padding_mode": "reflect"}),
    Case("tr", 2, ndim=1, kwargs={"groups": 2, "stride": 2, "bias": False}),
]
SLOW_CASES = [
    Case("cp", 2, ndim=3, kwargs={"padding": "same", "padding_mode": "replicate"}),
    Case("tr", 2, ndim=3, kernel_size=2, kwargs={"dilation": (1, 2, 1)}),
    Case("tucker", (3, 2), kwargs={"groups": 2, "stride": (1, 2), "dilation": 2}),
    Case("tt", 1, ndim=1, kwargs={"padding": "same", "padding_mode": "circular"}),
]


def ids(cases: List[Case]) -> List[str]:
    return [c.id() for c in cases]


def data(case: Case, seed: int = 0):
    model, reference = model_pair(case, seed)
    torch.manual_seed(seed + 1)
    x, y = case.x(), torch.randint(0, 3, (case.batch,))
    return model, reference, x, y


def per_sample_gradients(reference: nn.Module, loss_fn, x: Tensor, y: Tensor):
    """``∇ (loss_n / N)`` per sample (mean reduction) by ``vmap(grad)``."""
    params = {n: p.detach() for n, p in reference.named_parameters()}

    def single(p: Dict[str, Tensor], xn: Tensor, yn: Tensor) -> Tensor:
        out = functional_call(reference, p, (xn.unsqueeze(0),))
        return loss_fn(out, yn.unsqueeze(0)) / x.shape[0]

    return vmap(grad(single), in_dims=(None, 0, 0))(params, x, y)


def parameters(model: nn.Module) -> List[str]:
    return [n for n, _ in model.named_parameters()]


def split(flat: Tensor, model: nn.Module, lead: int = 0) -> Dict[str, Tensor]:
    """A flat ``[*lead, P]`` tensor per parameter, shaped like it."""
    out, start = {}, 0
    for name, p in model.named_parameters():
        size = p.numel()
        piece = flat[..., start : start + size]
        out[name] = piece.reshape(*flat.shape[:lead], *p.shape)
        start += size
    return out


def check_all(actual: Dict[str, Tensor], expected: Dict[str, Tensor]) -> None:
    assert set(actual) == set(expected)
    for name in expected:
        assert actual[name].shape == expected[name].shape, name
        assert_close(actual[name], expected[name])


# ---------------------------------------------------------------- first order
def _first_order(case: Case):
    model, reference, x, y = data(case)
    loss_fn = nn.CrossEntropyLoss()
    results = run(
        model,
        nn.CrossEntropyLoss(),
        x,
        y,
        ext.BatchGrad(),
        ext.BatchL2Grad(),
        ext.SumGradSquared(),
        ext.Variance(),
    )
    truth = per_sample_gradients(reference, loss_fn, x, y)
    check_all(results["grad_batch"], truth)
    n = x.shape[0]
    check_all(
        results["batch_l2"], {k: g.flatten(1).square().sum(1) for k, g in truth.items()}
    )
    check_all(
        results["sum_grad_squared"], {k: g.square().sum(0) for k, g in truth.items()}
    )
    # sgs/N − (grad/N)² cancels where the per-sample gradients nearly agree:
    # its rounding error is relative to sgs/N, not to the (small) difference
    for name, g in truth.items():
        second_moment = g.square().sum(0) / n
        expected = second_moment - (g.sum(0) / n) ** 2
        scale = second_moment.abs().max().item()
        torch.testing.assert_close(
            results["variance"][name], expected, rtol=1e-10, atol=1e-12 * scale
        )


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_first_order(case: Case):
    """BatchGrad, BatchL2Grad, SumGradSquared, Variance per factor and bias."""
    _first_order(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=ids(SLOW_CASES))
def test_first_order_slow(case: Case):
    _first_order(case)


def test_batch_grad_subsampling():
    """``BatchGrad(subsampling=…)`` keeps only the chosen samples."""
    case = CASES[1]
    model, reference, x, y = data(case)
    results = run(model, nn.CrossEntropyLoss(), x, y, ext.BatchGrad(subsampling=[2, 0]))
    truth = per_sample_gradients(reference, nn.CrossEntropyLoss(), x, y)
    check_all(results["grad_batch"], {k: v[[2, 0]] for k, v in truth.items()})


# --------------------------------------------------------------- second order
def _diagonals(case: Case):
    model, reference, x, y = data(case)
    loss_fn = nn.CrossEntropyLoss()
    results = run(
        model,
        nn.CrossEntropyLoss(),
        x,
        y,
        ext.DiagGGNExact(),
        ext.BatchDiagGGNExact(),
        ext.DiagHessian(),
        ext.BatchDiagHessian(),
    )
    names = parameters(reference)
    per_sample = per_sample_ggn_diagonal(reference, loss_fn, x, y, names)
    check_all(results["diag_ggn_exact"], split(per_sample.sum(0), reference))
    check_all(results["diag_ggn_exact_batch"], split(per_sample, reference, 1))
    hessian = loss_parameter_hessian(reference, loss_fn, x, y, names)
    check_all(results["diag_h"], split(torch.diagonal(hessian), reference))
    batch_h = per_sample_hessian_diagonal(reference, loss_fn, x, y, names)
    check_all(results["diag_h_batch"], split(batch_h, reference, 1))


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_ggn_and_hessian_diagonals(case: Case):
    """(Batch)DiagGGNExact, (Batch)DiagHessian: torch.func GGN and Hessian."""
    _diagonals(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=ids(SLOW_CASES))
def test_ggn_and_hessian_diagonals_slow(case: Case):
    _diagonals(case)


@pytest.mark.parametrize("case", CASES[::2], ids=ids(CASES[::2]))
def test_sqrt_ggn_exact(case: Case):
    """``Σ_c s sᵀ`` of SqrtGGNExact is the GGN (every block, across factors)."""
    model, reference, x, y = data(case)
    loss_fn = nn.CrossEntropyLoss()
    results = run(model, nn.CrossEntropyLoss(), x, y, ext.SqrtGGNExact())[
        "sqrt_ggn_exact"
    ]
    names = parameters(reference)
    sqrt = torch.cat([results[n].flatten(2) for n in names], dim=2)
    assert_close(
        torch.einsum("cnp,cnq->pq", sqrt, sqrt), ggn(reference, loss_fn, x, y, names)
    )


def _mc_truth(reference, x, y, seed, mc_samples):
    """Jacobians and BackPACK's MC square root of the CE loss with ``seed``."""
    names = parameters(reference)
    jac = output_jacobian(reference, x, names)  # [N, C, P]
    torch.manual_seed(seed)
    root = sampled_loss_hessian_sqrt(reference(x), mc_samples, "mean")  # [M, N, C]
    return torch.einsum("ncp,mnc->mnp", jac, root)


@pytest.mark.parametrize("case", CASES[1::2], ids=ids(CASES[1::2]))
def test_monte_carlo(case: Case):
    """DiagGGNMC, BatchDiagGGNMC and SqrtGGNMC reproduce BackPACK's draw."""
    model, reference, x, y = data(case)
    seed, samples = 5, 2
    results = {}
    for extension in (
        ext.DiagGGNMC(mc_samples=samples),
        ext.BatchDiagGGNMC(mc_samples=samples),
        ext.SqrtGGNMC(mc_samples=samples),
    ):
        model.zero_grad()
        results.update(run(model, nn.CrossEntropyLoss(), x, y, extension, seed=seed))
    columns = _mc_truth(reference, x, y, seed, samples)  # [M, N, P]
    squares = columns.square().sum(0)
    check_all(results["diag_ggn_mc"], split(squares.sum(0), reference))
    check_all(results["diag_ggn_mc_batch"], split(squares, reference, 1))
    check_all(results["sqrt_ggn_mc"], split(columns, reference, 2))


def test_sqrt_ggn_subsampling():
    """``SqrtGGNExact(subsampling=…)``: the chosen samples' GGN."""
    case = CASES[6]
    model, reference, x, y = data(case)
    loss_fn = nn.CrossEntropyLoss()
    chosen = [1]
    results = run(
        model, nn.CrossEntropyLoss(), x, y, ext.SqrtGGNExact(subsampling=chosen)
    )
    names = parameters(reference)
    sqrt = torch.cat([results["sqrt_ggn_exact"][n].flatten(2) for n in names], dim=2)
    per_sample = per_sample_ggn_diagonal(reference, loss_fn, x, y, names)
    assert sqrt.shape[1] == len(chosen)
    assert_close(sqrt.square().sum((0, 1)), per_sample[chosen].sum(0))


# ------------------------------------------------------------------ Kronecker
KRONECKER_CASES = [c for c in CASES if c.factorization != "tr"]


def _sequence_model(model: nn.Sequential) -> nn.Sequential:
    """``model`` with its factorized layer unrolled into its stage convolutions."""
    stages = stage_sequence(model[2])
    return nn.Sequential(*model[:2], *stages, *model[3:])


@pytest.mark.parametrize("approx", ["backpack", "expand", "reduce"])
@pytest.mark.parametrize("case", KRONECKER_CASES, ids=ids(KRONECKER_CASES))
def test_kronecker_factors_are_those_of_the_stages(case: Case, approx: str):
    """KFAC (MC), KFLR and KFRA per factor = each stage conv's, in every approx."""
    model, _, x, y = data(case)
    sequence = _sequence_model(model)
    assert_close(sequence(x), model(x))
    factors = list(model[2].factors)
    first_stage = 2
    extensions = [
        ext.KFAC(kfac_approx=approx),
        ext.KFLR(kfac_approx=approx),
        ext.KFRA(kfac_approx=approx),
    ]
    for extension_class in extensions:
        ours = run(model, nn.CrossEntropyLoss(), x, y, extension_class, seed=3)
        again = type(extension_class)(kfac_approx=approx)
        theirs = run(sequence, nn.CrossEntropyLoss(), x, y, again, seed=3)
        field = extension_class.savefield
        ours, theirs = ours[field], theirs[field]
        for i, name in enumerate(factors):
            for mine, truth in zip(
                ours[f"2.{name}"], theirs[f"{first_stage + i}.weight"]
            ):
                assert_close(mine, truth)
        last = first_stage + len(factors) - 1
        if model[2].bias is not None:
            assert_close(ours["2.bias"][0], theirs[f"{last}.bias"][0])
        # and the layers before: backpropagated through the stages alike
        for mine, truth in zip(ours["0.weight"], theirs["0.weight"]):
            assert_close(mine, truth)


@pytest.mark.parametrize("approx", ["backpack", "expand", "reduce"])
def test_kronecker_factors_of_a_tensor_ring_core(approx: str):
    """KFLR of the first TR kernel core: the Kronecker factors of the Conv3d
    ``r_0 -> r_1``, kernel ``(1, K_h, 1)``, on the input with the ring bond as
    its first spatial axis, written here with einsum and torch's Conv3d."""
    case = Case("tr", (2, 3, 2, 2), kwargs={"padding": 1})
    model, reference, x, y = data(case)
    layer = model[2]
    ours = run(model, nn.CrossEntropyLoss(), x, y, ext.KFLR(kfac_approx=approx))
    ours = ours["kflr"]
    first, core0, core1, last = (t.detach() for t in layer.factors.values())
    r1, r0, kh = core0.shape
    r2, _, kw = core1.shape
    with torch.no_grad():
        h = reference[1](reference[0](x))  # [N, C, H, W]
        ringed = torch.einsum("azc,nchw->nazhw", first, h)  # stage input
        stage = nn.Conv3d(r0, r1, (1, kh, 1), padding=(0, 1, 0), bias=False).double()
        stage.weight.copy_(core0.reshape(r1, r0, 1, kh, 1))
        u = stage(ringed)  # the stage output [N, r_1, r_z, H, W]

    def tail(sample: Tensor) -> Tensor:  # stage output -> model output, one sample
        w = torch.nn.functional.conv3d(
            sample.unsqueeze(0), core1.reshape(r2, r1, 1, 1, kw), padding=(0, 0, 1)
        )
        z = torch.einsum("odz,ndzhw->nohw", last, w) + layer.bias.reshape(-1, 1, 1)
        return reference[3:](z)[0]  # not extended: no BackPACK hooks

    jacobian = vmap(jacrev(tail))(u)  # [N, classes, *u]
    root = loss_hessian_sqrt(nn.CrossEntropyLoss(), reference(x), y)  # [V, N, C]
    sqrt = torch.einsum("nc...,vnc->vn...", jacobian, root)
    b, a, _ = kronecker_reference(stage, ringed, sqrt, approx)
    mine_b, mine_a = ours["2.kernel_core_0"]
    assert_close(mine_b, unstack(b))
    assert_close(mine_a, unstack(a))


def test_mixed_with_backpack_extensions():
    """tnbackpack's extensions combine with BackPACK's; BackPACK's own rules
    do not know the layer and say so (a warning, and no savefield)."""
    from backpack import extensions as bp

    case = CASES[0]
    model, _, x, y = data(case)
    extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    with pytest.warns(UserWarning, match="does not have an extension"):
        with backpack(ext.BatchGrad(), bp.SumGradSquared()):
            loss_fn(model(x), y).backward()
    assert model[2].input_factor.grad_batch.shape[0] == case.batch
    assert not hasattr(model[2].input_factor, "sum_grad_squared")


# ------------------------------------------------------------------- sweeps
@st.composite
def cases(draw) -> Case:
    """Random factorized layers (every factorization, dimension, hyper-parameter)."""
    ndim = draw(st.integers(1, 3))
    factorization = draw(st.sampled_from(["cp", "tucker", "tt", "tr"]))
    count = {"cp": 1, "tucker": 2, "tt": ndim + 1, "tr": ndim + 2}[factorization]
    rank = tuple(draw(st.integers(1, 2)) for _ in range(count))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    kwargs = {
        "groups": draw(st.sampled_from([1, 2])),
        "padding_mode": draw(st.sampled_from(["zeros", "reflect", "circular"])),
        "bias": draw(st.booleans()),
    }
    if draw(st.booleans()):
        kwargs["padding"] = "same"
    else:
        kwargs["stride"] = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
        kwargs["padding"] = tuple(draw(st.integers(0, 1)) for _ in range(ndim))
        kwargs["dilation"] = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    sizes = (5, 4, 4) if ndim == 3 else (6, 5, 4)
    return Case(factorization, rank, ndim, 4, 4, kernel, sizes, kwargs, batch=2)


def _sweep(case: Case) -> None:
    try:
        case.layer().dense_spec().output_size(case.size())
    except ValueError:
        assume(False)  # the kernel is longer than the padded input
    _first_order(case)
    _diagonals(case)


@settings(max_examples=3)
@given(case=cases())
def test_sweep(case: Case):
    """A few random layers in the default run."""
    _sweep(case)


@pytest.mark.slow
@settings(max_examples=40)
@given(case=cases())
def test_sweep_slow(case: Case):
    _sweep(case)
