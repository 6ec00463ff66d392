"""Hand-picked conv_einsum strings vs explicit 0/1 patterns; errors; paths."""

import pytest
import torch
from conv_einsum_cases import assert_matches, pattern_reference

import tnbackpack
from tnbackpack import conv_einsum, conv_einsum_path

# (equation, shapes, options): several kernels per letter, the signal in a
# later operand, no batch letter, letters summed inside one operand, ...
CASES = [
    (
        "nch,ch,ch,ch->nch|h",
        [(2, 3, 11), (3, 3), (3, 2), (3, 2)],
        dict(stride=2, dilation=2, padding=3),
    ),
    (
        "nchw,ch,cw,chw,oc->nohw|hw",
        [(2, 3, 8, 7), (3, 2), (3, 3), (3, 2, 2), (4, 3)],
        dict(stride=(2, 3), padding=(1, 2)),
    ),
    ("ab,nbh->nah|h", [(4, 3), (2, 3, 6)], dict(stride=2, padding=1)),
    ("kh,nch->nckh|h", [(3, 8), (2, 2, 3)], dict(padding="same")),
    (
        "chw,chw->chw|hw",
        [(2, 9, 9), (2, 3, 2)],
        dict(stride=3, dilation=2, padding={"h": (0, 2)}),
    ),
    (
        "nchw,hr,wr,rc->nhw|hw",
        [(2, 3, 6, 6), (2, 4), (3, 4), (4, 3)],
        dict(padding="valid", stride={"w": 2}),
    ),
    (
        "ncdhw,od,rh,rw,rc->nodhw|dhw",
        [(1, 2, 5, 6, 6), (3, 3), (2, 3), (2, 3), (2, 2)],
        dict(padding=1, stride=(1, 2, 2), padding_mode="circular"),
    ),
    (
        "nchwt,ochwt->nohwt|hwt",
        [(1, 2, 4, 4, 5), (2, 2, 2, 2, 3)],
        dict(padding=1, dilation={"t": 2}, padding_mode="reflect"),
    ),
    (
        "nh->nh|h",
        [(3, 7)],
        dict(stride=2, padding={"h": (3, 0)}, padding_mode="replicate"),
    ),
    (
        "xh,xh,xh,h->xh|h",
        [(2, 12), (2, 2), (2, 3), (4,)],
        dict(stride=3, dilation=3, padding=5),
    ),
]


@pytest.mark.parametrize("equation,shapes,options", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_equation_vs_pattern_reference(equation, shapes, options, dtype, tol):
    torch.manual_seed(0)
    operands = [torch.randn(s, dtype=torch.float64) for s in shapes]
    assert_matches(
        lambda *o: conv_einsum(equation, *o, **options),
        lambda *o: pattern_reference(equation, *o, **options),
        operands, dtype, tol,
    )  # fmt: skip


def test_grammar_spaces_commas_and_hyper_parameter_forms():
    torch.manual_seed(1)
    x, w = (
        torch.randn(2, 3, 7, 6, dtype=torch.float64),
        torch.randn(4, 3, 3, 2, dtype=torch.float64),
    )
    a = conv_einsum("nchw, ochw -> nohw | h, w", x, w, stride=(2, 1), padding={"w": 1})
    b = conv_einsum(
        "nchw,ochw->nohw|hw", x, w, stride={"h": 2}, padding=((0, 0), (1, 1))
    )
    c = torch.nn.functional.conv2d(x, w, stride=(2, 1), padding=(0, 1))
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(b, c)


def test_partial_gradients_only_for_operands_that_need_them():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    conv_einsum("nchw,ochw->nohw|hw", x, w, padding=1).sum().backward()
    torch.testing.assert_close(
        w.grad,
        torch.autograd.grad(torch.nn.functional.conv2d(x, w, padding=1).sum(), w)[0],
    )


ERRORS = [
    ("nchw,ochw->nohwz|hw", [(1, 2, 5, 5), (3, 2, 3, 3)], {}, "'z'"),
    ("nchw,ochw->nohw|hw", [(1, 2, 5, 5), (3, 4, 3, 3)], {}, "'c'"),
    ("nchw,ochw->noh|hw", [(1, 2, 5, 5), (3, 2, 3, 3)], {}, "'w'"),
    ("nchw,ochw->nohw|hw", [(1, 2, 5, 5), (3, 2, 3, 3)], dict(stride={"c": 2}), "'c'"),
    ("nchw,ochw->nohw|hw", [(1, 2, 5, 2), (3, 2, 3, 3)], {}, "'w'"),
    ("nchw,ochw->nohw|hw", [(1, 2, 5, 5)], {}, "2 operands"),
    ("nchw,ochw->nohw|hw", [(1, 2, 5, 5), (3, 2, 3)], {}, "operand 1"),
    ("nchw,ochw|hw", [(1, 2, 5, 5), (3, 2, 3, 3)], {}, "'->'"),
    ("ncc,oc->no|", [(1, 2, 2), (3, 2)], {}, "'c'"),
    (
        "nchw,ochw->nohw|hw",
        [(1, 2, 5, 5), (3, 2, 3, 3)],
        dict(stride=2, padding="same"),
        "'same'",
    ),
    (
        "nchw,ochw->nohw|hw",
        [(1, 2, 5, 5), (3, 2, 3, 3)],
        dict(padding=(1, 2, 3)),
        "3 entries",
    ),
    (
        "nchw,ochw->nohw|hw",
        [(1, 2, 5, 5), (3, 2, 3, 3)],
        dict(padding_mode="mirror"),
        "padding_mode",
    ),
    (
        "nchw,ochw->nohw|hw",
        [(1, 2, 5, 5), (3, 2, 3, 3)],
        dict(padding=5, padding_mode="reflect"),
        "'h'",
    ),
    ("nchw,ochw->nohw|hw", [(1, 2, 5, 5), (3, 2, 3, 3)], dict(dilation=0), "'h'"),
    ("nchw,ochw->nohw|hwq", [(1, 2, 5, 5), (3, 2, 3, 3)], {}, "'q'"),
]


@pytest.mark.parametrize("equation,shapes,options,names", ERRORS)
def test_bad_input_raises_value_error_naming_the_culprit(
    equation, shapes, options, names
):
    operands = [torch.randn(s) for s in shapes]
    with pytest.raises(ValueError, match=names):
        conv_einsum(equation, *operands, **options)


def test_mixed_dtypes_raise():
    with pytest.raises(ValueError, match="operand 1"):
        conv_einsum(
            "nch,och->noh|h",
            torch.randn(1, 2, 5),
            torch.randn(3, 2, 3, dtype=torch.float64),
        )


def test_path_reports_steps_flops_and_bytes():
    shapes = [(32, 64, 56, 56), (64, 64), (64, 3), (64, 3), (64, 64)]
    path, info = conv_einsum_path("nchw,rc,rh,rw,or->nohw|hw", *shapes, padding=1)
    assert len(path) == len(info.forward) == 4  # four pairwise steps for five operands
    assert all(step.flops > 0 and step.bytes > 0 for step in info.forward)
    # far fewer FLOPs than one dense 3x3 convolution with the rebuilt kernel
    assert info.flops < 2 * 32 * 64 * 64 * 9 * 56 * 56 / 3
    assert {node for node, _ in info.gradients} == set(range(5))
    assert "forward" in str(info) and "MFLOP" in str(info)
    # tensors give the same plan as shapes
    path_t, _ = conv_einsum_path(
        "nchw,rc,rh,rw,or->nohw|hw",
        *[torch.empty(s, device="meta") for s in shapes],
        padding=1,
    )
    assert path_t == path


def test_lazy_export_does_not_import_backpack():
    import subprocess
    import sys

    code = (
        "import sys, tnbackpack; tnbackpack.conv_einsum; "
        "print('backpack' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
    assert tnbackpack.conv_einsum is conv_einsum
