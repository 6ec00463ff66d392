"""Bad input gives a clear ValueError/TypeError naming the layer and option."""

import pytest
import torch
from engine_cases import DTYPE
from torch import nn

from tnbackpack.tn import ConvSpec
from tnbackpack.tn import functional as engine

# ------------------------------------------------------------ invalid specs
SPEC_ERRORS = [
    (dict(padding="same", stride=2), ValueError, "'same' requires stride 1"),
    (dict(padding="same", transposed=True), ValueError, "ConvTranspose"),
    (dict(padding="valid", transposed=True), ValueError, "ConvTranspose"),
    (dict(padding_mode="reflect", transposed=True), ValueError, "padding_mode"),
    (dict(stride=2, output_padding=2, transposed=True), ValueError, "output_padding"),
    (dict(dilation=3, output_padding=3, transposed=True), ValueError, "output_padding"),
    (dict(stride=2, output_padding=1), ValueError, "output_padding"),
    (dict(padding_mode="mirror"), ValueError, "padding_mode"),
    (dict(padding="full"), ValueError, "padding"),
    (dict(padding=-1), ValueError, "padding"),
    (dict(kernel_size=(3, 3, 3)), ValueError, "kernel_size"),
    (dict(kernel_size=0), ValueError, "kernel_size"),
    (dict(kernel_size=True), TypeError, "kernel_size"),
    (dict(stride=0), ValueError, "stride"),
    (dict(dilation=(1,)), ValueError, "dilation"),
    (dict(groups=3), ValueError, "groups"),
    (dict(groups=0), ValueError, "groups"),
]


@pytest.mark.parametrize(
    "kwargs, error, message", SPEC_ERRORS, ids=[m for *_, m in SPEC_ERRORS]
)
def test_invalid_spec(kwargs, error, message):
    arguments = dict(ndim=2, in_channels=2, out_channels=4, kernel_size=3)
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        ConvSpec.from_kwargs(**arguments)


def test_from_module_rejects_other_modules():
    with pytest.raises(TypeError, match="Linear"):
        ConvSpec.from_module(nn.Linear(2, 3))


def test_from_module_rejects_output_padding_pytorch_rejects():
    # PyTorch only complains in forward; the spec complains when it is built
    with pytest.raises(ValueError, match="output_padding"):
        ConvSpec.from_module(nn.ConvTranspose2d(2, 2, 3, stride=2, output_padding=2))


# ------------------------------------------------------- invalid arguments
SPEC = ConvSpec.from_kwargs(2, 2, 4, 3, padding=1, groups=2)
UNPADDED = ConvSpec.from_kwargs(2, 2, 4, 3, groups=2)
NAME = "Conv2d(2, 4"


def tensors(*shape, dtype=DTYPE):
    return torch.randn(*shape, dtype=dtype) if dtype.is_floating_point else torch.ones(
        *shape, dtype=dtype
    )


X = tensors(2, 2, 5, 5)
W = tensors(4, 1, 3, 3)
GY = tensors(2, 4, 5, 5)

CALL_ERRORS = {
    "input channels": (
        lambda: engine.forward(SPEC, tensors(2, 3, 5, 5), W), ValueError, "in_channels"
    ),
    "input axes": (lambda: engine.forward(SPEC, tensors(2, 2, 5), W), ValueError,
                   "4 axes"),
    "input not a tensor": (lambda: engine.unfold(SPEC, [[0.0]]), TypeError,
                           "must be a torch.Tensor"),
    "integer input": (
        lambda: engine.forward(SPEC, tensors(2, 2, 5, 5, dtype=torch.int64), W),
        TypeError, "floating dtype",
    ),
    "integer grad_output": (
        lambda: engine.weight_vjp(SPEC, X, tensors(2, 4, 5, 5, dtype=torch.int32)),
        TypeError, "floating dtype",
    ),
    "weight shape": (lambda: engine.forward(SPEC, X, tensors(4, 2, 3, 3)), ValueError,
                     "weight has shape"),
    "input/weight dtype": (lambda: engine.forward(SPEC, X.float(), W), TypeError,
                           "dtype"),
    "input/grad_output dtype": (
        lambda: engine.per_sample_weight_vjp(SPEC, X, GY.float()), TypeError, "dtype"
    ),
    "grad_output/weight dtype": (
        lambda: engine.input_vjp(SPEC, GY.float(), W, (5, 5)), TypeError, "dtype"
    ),
    "grad_output channels (input VJP)": (
        lambda: engine.input_vjp(SPEC, tensors(2, 6, 5, 5), W, (5, 5)), ValueError,
        "out_channels",
    ),
    "grad_output channels (weight VJP)": (
        lambda: engine.weight_vjp(SPEC, X, tensors(2, 6, 5, 5)), ValueError,
        "out_channels",
    ),
    "grad_output channels (bias VJP)": (
        lambda: engine.bias_vjp(SPEC, tensors(2, 6, 5, 5)), ValueError, "out_channels"
    ),
    "grad_output spatial size (input VJP)": (
        lambda: engine.input_vjp(SPEC, tensors(2, 4, 4, 5), W, (5, 5)), ValueError,
        "spatial size",
    ),
    "grad_output spatial size (weight VJP)": (
        lambda: engine.weight_vjp(SPEC, X, tensors(2, 4, 5, 6)), ValueError,
        "spatial size",
    ),
    "grad_output spatial size (shifted)": (
        lambda: engine.per_sample_weight_vjp(SPEC, X, tensors(2, 4, 4, 5),
                                             route="shifted"),
        ValueError, "spatial size",
    ),
    "grad_output spatial size (squares)": (
        lambda: engine.weight_vjp_squares(SPEC, X, tensors(2, 4, 4, 5)), ValueError,
        "spatial size",
    ),
    "batch sizes (weight VJP)": (
        lambda: engine.weight_vjp(SPEC, X, tensors(3, 4, 5, 5)), ValueError,
        "batch size",
    ),
    "batch sizes (per-sample)": (
        lambda: engine.per_sample_weight_vjp(SPEC, X, tensors(3, 4, 5, 5)),
        ValueError, "batch size",
    ),
    "batch sizes (squares, vectors)": (
        lambda: engine.weight_vjp_squares(SPEC, X, tensors(2, 3, 4, 5, 5),
                                          vectors=True),
        ValueError, "batch size",
    ),
    "missing vector axis": (
        lambda: engine.per_sample_weight_vjp(SPEC, X, GY, vectors=True), ValueError,
        "5 axes",
    ),
    "sqrt_ggn axes": (lambda: engine.kfac_output_factor(SPEC, GY), ValueError,
                      "sqrt_ggn must have 5 axes"),
    "input_size entries": (lambda: engine.input_vjp(SPEC, GY, W, (5,)), ValueError,
                           "spatial sizes"),
    "input too small": (
        lambda: engine.forward(UNPADDED, tensors(1, 2, 2, 5), W), ValueError,
        "too small",
    ),
    "bias shape": (lambda: engine.forward(SPEC, X, W, tensors(1)), ValueError, "bias"),
}


@pytest.mark.parametrize("call, error, message", CALL_ERRORS.values(),
                         ids=CALL_ERRORS.keys())
def test_invalid_arguments(call, error, message):
    with pytest.raises(error, match=message) as info:
        call()
    # every argument error names the layer it happened in
    assert NAME in str(info.value)


# -------------------------------------------- padding the mode cannot give
REFLECT = ConvSpec.from_kwargs(1, 2, 2, 3, padding=3, padding_mode="reflect")
CIRCULAR = ConvSpec.from_kwargs(1, 2, 2, 3, padding=4, padding_mode="circular")
SMALL_X = tensors(2, 2, 3)
SMALL_GY = tensors(2, 2, 7)
SMALL_GY_CIRCULAR = tensors(2, 2, 9)


@pytest.mark.parametrize(
    "call",
    [
        lambda s, gy: engine.forward(s, SMALL_X, tensors(2, 2, 3)),
        lambda s, gy: engine.input_vjp(s, gy, tensors(2, 2, 3), (3,)),
        lambda s, gy: engine.weight_vjp(s, SMALL_X, gy),
        lambda s, gy: engine.per_sample_weight_vjp(s, SMALL_X, gy, route="tn"),
        lambda s, gy: engine.per_sample_weight_vjp(s, SMALL_X, gy, route="shifted"),
        lambda s, gy: engine.unfold(s, SMALL_X, route="tn"),
        lambda s, gy: engine.unfold(s, SMALL_X, route="strided"),
        lambda s, gy: engine.kfac_input_factor(s, SMALL_X, route="strided"),
        lambda s, gy: engine.kfac_input_factor(s, SMALL_X, approx="reduce"),
        lambda s, gy: engine.weight_vjp_squares(s, SMALL_X, gy, route="contract"),
    ],
    ids=["forward", "input_vjp", "weight_vjp", "per-sample-tn", "per-sample-shifted",
         "unfold-tn", "unfold-strided", "kfac-strided", "kfac-reduce", "squares"],
)
def test_padding_larger_than_the_mode_allows(call):
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        call(REFLECT, SMALL_GY)
    with pytest.raises(ValueError, match="padding_mode='circular'"):
        call(CIRCULAR, SMALL_GY_CIRCULAR)


# ------------------------------------------------ output sizes out of range
TRANSPOSED = ConvSpec.from_kwargs(1, 1, 1, 3, stride=2, transposed=True)
XT = tensors(1, 1, 3)
WT = tensors(1, 1, 3)


@pytest.mark.parametrize("size", [6, 9, 12], ids=["too-small", "too-big", "far-off"])
def test_transposed_output_size_outside_pytorch_range(size):
    """Sizes 7 and 8 are what ConvTranspose1d(k=3, s=2) can give for length 3."""
    with pytest.raises(ValueError, match="output_size"):
        engine.forward(TRANSPOSED, XT, WT, output_size=(size,))
    with pytest.raises(ValueError, match="output_size"):
        engine.unfold(TRANSPOSED, XT, output_size=(size,))
    with pytest.raises(ValueError, match="output_size"):
        engine.kfac_input_factor(TRANSPOSED, XT, output_size=(size,))


def test_transposed_grad_output_outside_pytorch_range():
    with pytest.raises(ValueError, match="spatial size"):
        engine.weight_vjp(TRANSPOSED, XT, tensors(1, 1, 9))


def test_convolution_output_size_must_match():
    """A convolution's output size is fixed by its input: a different one is
    a mistake, not a request."""
    with pytest.raises(ValueError, match="output_size"):
        engine.forward(SPEC, X, W, output_size=(7, 7))
    with pytest.raises(ValueError, match="output_size"):
        engine.unfold(SPEC, X, output_size=(7, 7))
    with pytest.raises(ValueError, match="output_size"):
        engine.kfac_input_factor(SPEC, X, output_size=(7, 7))
