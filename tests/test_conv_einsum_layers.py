"""conv_einsum on factorized layers vs kernels rebuilt by torch.einsum + F.conv*d.

The reference rebuilds the dense kernel with ``torch.einsum`` and runs PyTorch's
own convolution; gradients by autograd through that reference.
"""

import pytest
import torch
import torch.nn.functional as F
from conv_einsum_cases import assert_matches, grads, pattern_reference

from tnbackpack import conv_einsum

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@pytest.fixture(params=["channels_last", "nchw"])
def layout(request, monkeypatch):
    """Run a test with either layout policy of the steps (evaluate.onednn_layout):
    channels-last intermediates (large layers) or nchw order with 1×1
    convolutions for channel products (few positions per sample)."""
    from tnbackpack.tn.conv_einsum import evaluate

    limit = 0 if request.param == "channels_last" else 10**9
    monkeypatch.setattr(evaluate, "NCHW_MAX_POSITIONS", limit)
    return request.param


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


# name: (equation, factor shapes given C, Co, R, K, rebuild equation -> kernel)
LAYERS = {
    "dense": ("nchw,ochw->nohw|hw", lambda C, Co, R: [(Co, C, 3, 3)], "ochw->ochw"),
    "cp": (
        "nchw,rc,rh,rw,or->nohw|hw",
        lambda C, Co, R: [(R, C), (R, 3), (R, 3), (Co, R)],
        "rc,rh,rw,or->ochw",
    ),
    "cp_weights": (
        "nchw,rc,rh,rw,or,r->nohw|hw",
        lambda C, Co, R: [(R, C), (R, 3), (R, 3), (Co, R), (R,)],
        "rc,rh,rw,or,r->ochw",
    ),
    "tucker2": (
        "nchw,ca,abhw,ob->nohw|hw",
        lambda C, Co, R: [(C, R), (R, R + 1, 3, 3), (Co, R + 1)],
        "ca,abhw,ob->ochw",
    ),
    "tucker": (
        "nchw,ca,hp,wq,abpq,ob->nohw|hw",
        lambda C, Co, R: [(C, R), (3, 2), (3, 2), (R, R, 2, 2), (Co, R)],
        "ca,hp,wq,abpq,ob->ochw",
    ),
    "tt": (
        "nchw,ca,ahb,bwd,do->nohw|hw",
        lambda C, Co, R: [(C, R), (R, 3, R), (R, 3, R), (R, Co)],
        "ca,ahb,bwd,do->ochw",
    ),
    "tr": (
        "nchw,eca,ahb,bwd,doe->nohw|hw",
        lambda C, Co, R: [(2, C, R), (R, 3, R), (R, 3, R), (R, Co, 2)],
        "eca,ahb,bwd,doe->ochw",
    ),
    "depthwise_separable": (
        "nchw,chw,oc->nohw|hw",
        lambda C, Co, R: [(C, 3, 3), (Co, C)],
        "chw,oc->ochw",
    ),
}


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize(
    "stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 0, 2), (2, "valid", 1)]
)
def test_factorized_layer_vs_rebuilt_kernel(name, stride, padding, dilation, layout):
    torch.manual_seed(0)
    equation, factor_shapes, rebuild = LAYERS[name]
    C, Co, R = 3, 4, 2
    x = rand(2, C, 7, 6)
    factors = [rand(*s) for s in factor_shapes(C, Co, R)]

    def reference(x, *fs):
        return F.conv2d(
            x,
            torch.einsum(rebuild, *fs),
            stride=stride,
            padding=padding,
            dilation=dilation,
        )

    def ours(*ops):
        return conv_einsum(
            equation, *ops, stride=stride, padding=padding, dilation=dilation
        )

    assert_matches(ours, reference, [x, *factors])


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_cp_any_dimension_and_padding_mode(dims, padding_mode, layout):
    """CP with 1, 2, 3 convolution letters vs nn.Conv*d with the rebuilt kernel."""
    torch.manual_seed(1)
    spatial = "hwd"[:dims]
    equation = (
        f"nc{spatial},rc,{','.join('r' + s for s in spatial)},or->no{spatial}|{spatial}"
    )
    C, Co, R = 3, 2, 4
    x = rand(2, C, *[6, 5, 4][:dims])
    factors = [rand(R, C)] + [rand(R, 3) for _ in spatial] + [rand(Co, R)]
    rebuild = f"rc,{','.join('r' + s for s in spatial)},or->oc{spatial}"
    stride = tuple([2, 1, 1][:dims])

    def reference(x, *fs):
        conv = getattr(torch.nn, f"Conv{dims}d")(
            C, Co, 3, stride=stride, padding=1, padding_mode=padding_mode, bias=False
        ).double()
        weight = torch.einsum(rebuild, *fs)
        return torch.func.functional_call(conv, {"weight": weight}, (x,))

    def ours(*ops):
        return conv_einsum(
            equation, *ops, stride=stride, padding=1, padding_mode=padding_mode
        )

    assert_matches(ours, reference, [x, *factors])


def test_groups_as_shared_letter():
    """``ngchw,gochw->ngohw`` is a grouped Conv2d."""
    torch.manual_seed(2)
    G, C, Co = 3, 2, 4
    x, w = rand(2, G * C, 6, 6), rand(G * Co, C, 3, 3)
    expected_shape = (2, G * Co, 3, 3)

    def ours(x, w):
        y = conv_einsum(
            "ngchw,gochw->ngohw|hw",
            x.reshape(2, G, C, 6, 6),
            w.reshape(G, Co, C, 3, 3),
            padding=1,
            stride=2,
        )
        return y.reshape(expected_shape)

    assert_matches(
        ours, lambda x, w: F.conv2d(x, w, padding=1, groups=G, stride=2), [x, w]
    )


def test_reshaped_cp_layer():
    """Reshaped CP (C = c·d, Co = o·p) vs the rebuilt [Co, C, 3, 3] kernel."""
    torch.manual_seed(3)
    c, d, o, p, R = 2, 3, 2, 2, 3
    x = rand(2, c * d, 5, 5)
    factors = [rand(c, o, R), rand(d, p, R), rand(3, R), rand(3, R)]

    def reference(x, *fs):
        w = torch.einsum("cor,dpr,hr,wr->opcdhw", *fs).reshape(o * p, c * d, 3, 3)
        return F.conv2d(x, w, padding=1)

    def ours(x, *fs):
        y = conv_einsum(
            "ncdhw,cor,dpr,hr,wr->nophw|hw", x.reshape(2, c, d, 5, 5), *fs, padding=1
        )
        return y.reshape(2, o * p, 5, 5)

    assert_matches(ours, reference, [x, *factors])


def test_two_kernels_on_one_letter_add_taps():
    """Kernels on one letter: the same as one kernel that is their convolution."""
    torch.manual_seed(4)
    x, a, b = rand(2, 3, 9), rand(3, 3), rand(3, 2)
    # full convolution of the two kernels, written with F.conv1d (flipped).
    combined = F.conv1d(a.unsqueeze(0), b.flip(-1).unsqueeze(1), padding=1, groups=3)[0]
    expected = F.conv1d(
        x, combined.unsqueeze(1), groups=3, padding=2, stride=2, dilation=2
    )
    out = conv_einsum("nch,ch,ch->nch|h", x, a, b, padding=2, stride=2, dilation=2)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(out)
    _, g = grads(
        lambda *o: conv_einsum("nch,ch,ch->nch|h", *o, padding=2, stride=2, dilation=2),
        [x, a, b],
        gy,
    )
    _, g_ref = grads(
        lambda *o: pattern_reference(
            "nch,ch,ch->nch|h", *o, padding=2, stride=2, dilation=2
        ),
        [x, a, b],
        gy,
    )
    for u, v in zip(g, g_ref):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)


def test_float32_cp_resnet_like():
    """float32 at a realistic size, against the rebuilt kernel in float64."""
    torch.manual_seed(5)
    C, R = 16, 8
    ops = [rand(4, C, 14, 14), rand(R, C), rand(R, 3), rand(R, 3), rand(C, R)]
    equation = "nchw,rc,rh,rw,or->nohw|hw"
    expected = F.conv2d(
        ops[0], torch.einsum("rc,rh,rw,or->ochw", *ops[1:]), padding=1, stride=2
    )
    gy = torch.randn_like(expected)
    _, g_ref = grads(
        lambda x, *f: F.conv2d(
            x, torch.einsum("rc,rh,rw,or->ochw", *f), padding=1, stride=2
        ),
        ops,
        gy,
    )
    out, g = grads(
        lambda *o: conv_einsum(equation, *o, padding=1, stride=2),
        [op.float() for op in ops],
        gy.float(),
    )
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
