"""Per-sample gradients of conv_einsum operands (``PerSampleRequest``).

References are independent of the code: per sample, autograd through the
explicit 0/1-pattern einsum of :mod:`conv_einsum_cases` on that sample's
slice (random equations), and ``vmap(grad)`` of PyTorch's convolution of the
kernel rebuilt by ``torch.einsum`` (factorized layers' strings).
"""

import pytest
import torch
import torch.nn.functional as F
from conv_einsum_cases import pattern_reference
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_conv_einsum_hypothesis import problems
from torch.func import grad, vmap

from tnbackpack import conv_einsum
from tnbackpack.tn.conv_einsum import PerSampleRequest


@st.composite
def batched_problems(draw):
    """A random string whose first operand and output get a batch letter ``n``."""
    equation, shapes, options = draw(problems())
    body, conv = equation.split("|")
    lhs, output = body.split("->")
    subs = lhs.split(",")
    assume(len(subs) > 1)
    batch = draw(st.integers(1, 3))
    subs[0] = "n" + subs[0]
    at = draw(st.integers(0, len(output)))
    output = output[:at] + "n" + output[at:]
    shapes = [[batch, *shapes[0]], *shapes[1:]]
    return ",".join(subs) + "->" + output + "|" + conv, shapes, options, at


def per_sample_reference(equation, operands, options, at, grad_output):
    """Per sample: autograd through the pattern einsum of that sample's slice."""
    unbatched = equation.replace("n", "")
    results = []
    for b in range(operands[0].shape[0]):
        others = [op.detach().clone().requires_grad_() for op in operands[1:]]
        out = pattern_reference(unbatched, operands[0][b], *others, **options)
        grads = torch.autograd.grad(
            out, others, grad_output.select(at, b), allow_unused=True
        )
        results.append(
            [torch.zeros_like(o) if g is None else g for o, g in zip(others, grads)]
        )
    return [torch.stack(per) for per in zip(*results)]


def check(problem, dtype=torch.float64, tol=1e-10):
    equation, shapes, options, at = problem
    torch.manual_seed(0)
    operands = [torch.randn(tuple(s), dtype=torch.float64) for s in shapes]
    try:
        expected_out = pattern_reference(equation, *operands, **options)
    except Exception:  # invalid problem (kernel longer than the signal)
        return
    grad_output = torch.randn_like(expected_out)
    expected = per_sample_reference(equation, operands, options, at, grad_output)
    ours = [op.to(dtype).requires_grad_() for op in operands]
    request = PerSampleRequest("n", tuple(range(1, len(ours))))
    out = conv_einsum(equation, *ours, per_sample=request, **options)
    out.backward(grad_output.to(dtype))
    assert set(request.gradients) == set(range(1, len(ours)))
    for position, want in enumerate(expected, start=1):
        got = request.gradients[position]
        assert got.shape == (operands[0].shape[0], *operands[position].shape)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        # the ordinary gradient is their sum
        torch.testing.assert_close(
            ours[position].grad.double(), want.sum(0), rtol=tol, atol=tol
        )


@given(batched_problems())
@settings(max_examples=40, derandomize=True, deadline=None)
def test_random_equations_float64(problem):
    check(problem)


@given(batched_problems())
@settings(max_examples=10, derandomize=True, deadline=None)
def test_random_equations_float32(problem):
    check(problem, torch.float32, 1e-4)


# ------------------------------------------------- factorized layers' strings
LAYERS = {
    "cp": ("nchw,rc,rh,rw,or->nohw|hw", [(3, 4), (3, 3), (3, 2), (5, 3)]),
    "tucker": ("nchw,ac,bahw,ob->nohw|hw", [(2, 4), (3, 2, 3, 2), (5, 3)]),
    "tt": ("nchw,ac,bah,dbw,od->nohw|hw", [(2, 4), (3, 2, 3), (2, 3, 2), (5, 2)]),
    "tr": (
        "nchw,azc,bah,dbw,odz->nohw|hw",
        [(2, 2, 4), (3, 2, 3), (2, 3, 2), (5, 2, 2)],
    ),
    "cp-grouped": (
        "ngchw,grc,grh,grw,gor->ngohw|hw",
        [(2, 3, 2), (2, 3, 3), (2, 3, 2), (2, 4, 3)],
    ),
}


def _dense(equation, factors):
    lhs = equation.split("->")[0].split(",")[1:]
    grouped = lhs[0].startswith("g")
    kernel = ("g" if grouped else "") + "ochw"
    return torch.einsum(",".join(lhs) + "->" + kernel, *factors)


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize(
    "options",
    [
        dict(padding=1),
        dict(stride=2, padding=(1, 0), dilation=(1, 2)),
        dict(padding="same", padding_mode="circular"),
        dict(padding=1, padding_mode="reflect"),
    ],
    ids=["pad", "stride-dilation", "same-circular", "reflect"],
)
def test_layers_vs_vmap_of_rebuilt_kernel(name, options):
    """Per-sample factor gradients equal ``vmap(grad)`` of the rebuilt conv."""
    equation, factor_shapes = LAYERS[name]
    grouped = name.endswith("grouped")
    torch.manual_seed(1)
    x = torch.randn(4, 4, 7, 6, dtype=torch.float64)
    factors = [torch.randn(s, dtype=torch.float64) for s in factor_shapes]
    groups = 2 if grouped else 1
    mode = options.get("padding_mode", "zeros")
    conv_options = {k: v for k, v in options.items() if k != "padding_mode"}

    def layer(fs, xn):
        kernel = _dense(equation, fs)
        if grouped:
            kernel = kernel.flatten(0, 1)
        padding = conv_options.get("padding", 0)
        stride = conv_options.get("stride", 1)
        dilation = conv_options.get("dilation", 1)
        if mode != "zeros":
            if padding == "same":  # stride 1, dilation 1: the span splits
                spans = [k - 1 for k in kernel.shape[2:]]
                pads = [(s // 2, s - s // 2) for s in spans]
            else:
                pads = [(padding, padding)] * 2
            flat = (*pads[1], *pads[0])
            xn = F.pad(xn[None], flat, mode=mode)[0]
            padding = 0
        return F.conv2d(
            xn[None], kernel, stride=stride, padding=padding, dilation=dilation,
            groups=groups,
        )[0]  # fmt: skip

    out = vmap(layer, in_dims=(None, 0))(factors, x)
    grad_output = torch.randn_like(out)
    expected = vmap(
        grad(lambda fs, xn, gn: (layer(fs, xn) * gn).sum()), in_dims=(None, 0, 0)
    )(factors, x, grad_output)
    ours = [f.clone().requires_grad_() for f in factors]
    signal = x.unflatten(1, (2, 2)) if grouped else x
    request = PerSampleRequest("n", tuple(range(1, len(ours) + 1)))
    result = conv_einsum(equation, signal, *ours, per_sample=request, **options)
    if grouped:
        result = result.flatten(1, 2)
    torch.testing.assert_close(result, out, rtol=1e-10, atol=1e-10)
    result.backward(grad_output)
    for k, want in enumerate(expected, start=1):
        got = request.gradients[k]
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours[k - 1].grad, want.sum(0))


def _cp(requires_grad=True):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    factors = [
        torch.randn(s, dtype=torch.float64, requires_grad=requires_grad)
        for s in LAYERS["cp"][1]
    ]
    return x, factors


def test_positions_decided_at_backward_and_input_gradient():
    """Only the asked positions get per-sample gradients; the input's stays right."""
    equation = LAYERS["cp"][0]
    x, factors = _cp()
    asked = []
    request = PerSampleRequest("n", (1, 2, 3, 4), lambda: tuple(asked))
    out = conv_einsum(equation, x, *factors, padding=1, per_sample=request)
    asked.extend([2, 4])
    grad_output = torch.randn_like(out)
    out.backward(grad_output)
    assert set(request.gradients) == {2, 4}
    ref_x, ref_factors = _cp()
    reference = conv_einsum(equation, ref_x, *ref_factors, padding=1)
    reference.backward(grad_output)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-12, atol=1e-12)
    for ours, ref in zip(factors, ref_factors):
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-12, atol=1e-12)


def test_no_positions_no_gradients_and_reset():
    """Nothing asked: none made; a later backward never leaves earlier ones."""
    equation = LAYERS["cp"][0]
    x, factors = _cp()
    asked = [(1, 2, 3, 4)]
    request = PerSampleRequest("n", (1, 2, 3, 4), lambda: asked[0])
    out = conv_einsum(equation, x, *factors, padding=1, per_sample=request)
    out.sum().backward(retain_graph=True)
    assert set(request.gradients) == {1, 2, 3, 4}
    asked[0] = ()
    out.sum().backward(retain_graph=True)
    assert request.gradients is None
    asked[0] = (1, 2, 3, 4)
    (g,) = torch.autograd.grad(out.sum(), factors[0], create_graph=True)
    assert request.gradients is None  # create_graph: the recorded route, none made
    assert g.requires_grad


@pytest.mark.parametrize(
    "request_args, message",
    [
        (("m", (1,)), "batch letter 'm' is not in the output"),
        (("n", (0,)), "operand 0 holds the batch letter"),
        (("n", (5,)), "names operand 5"),
    ],
)
def test_bad_requests(request_args, message):
    x, factors = _cp()
    with pytest.raises(ValueError, match=message):
        conv_einsum(
            LAYERS["cp"][0], x, *factors, per_sample=PerSampleRequest(*request_args)
        )
    with pytest.raises(ValueError, match="must be a PerSampleRequest"):
        conv_einsum(LAYERS["cp"][0], x, *factors, per_sample=(1, 2))
