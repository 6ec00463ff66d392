"""Four spatial axes: the 4-d references themselves are validated here.

Every engine quantity runs on the 4-d cases of ``engine_cases.FOUR_D_CASES``
through the generic test files; those compare against :func:`conv_nd` (3d
convolutions with the first axis unrolled) and :func:`conv_transpose_nd` (its
adjoint). This file checks those references against PyTorch and against the
loop-built patches, so that the 4-d tests rest on more than one construction.
"""

import pytest
import torch
import torch.nn.functional as F
from engine_cases import (
    DTYPE,
    FOUR_D_CASES,
    cached_layer,
    close,
    conv_nd,
    conv_transpose_nd,
    output_from_patches,
    patches_by_loop,
)

NAMES_4D = [case["name"] for case in FOUR_D_CASES]


@pytest.mark.parametrize("ndim", [2, 3])
def test_unrolled_convolution_matches_torch(ndim):
    torch.manual_seed(0)
    x = torch.randn(2, 4, *[7, 6, 5][:ndim], dtype=DTYPE)
    w = torch.randn(6, 2, *[3, 2, 2][:ndim], dtype=DTYPE)
    b = torch.randn(6, dtype=DTYPE)
    stride, dilation = [2, 1, 2][:ndim], [1, 2, 1][:ndim]
    conv = (F.conv2d, F.conv3d)[ndim - 2]
    expected = conv(x, w, b, stride=stride, dilation=dilation, groups=2)
    for native_up_to in range(1, ndim):
        close(conv_nd(x, w, b, stride, dilation, 2, native_up_to), expected)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_adjoint_transposed_convolution_matches_torch(ndim):
    torch.manual_seed(1)
    x = torch.randn(2, 4, *[3, 4, 2][:ndim], dtype=DTYPE)
    w = torch.randn(4, 3, *[3, 2, 2][:ndim], dtype=DTYPE)
    b = torch.randn(6, dtype=DTYPE)
    stride, padding, dilation = [2, 3, 1][:ndim], [1, 0, 1][:ndim], [1, 1, 2][:ndim]
    output_padding = [1, 2, 1][:ndim]
    conv_transpose = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
    expected = conv_transpose[ndim - 1](
        x, w, b, stride=stride, padding=padding, output_padding=output_padding,
        groups=2, dilation=dilation,
    )
    actual = conv_transpose_nd(
        x, w, b, stride, padding, dilation, 2, expected.shape[2:]
    )
    close(actual, expected)


@pytest.mark.parametrize("name", NAMES_4D)
def test_references_agree_in_4d(name):
    """Unrolled (or adjoint) convolution == weight times loop-built patches."""
    layer = cached_layer(name)
    y = output_from_patches(layer, patches_by_loop(layer))
    if layer.bias is not None:
        y = y + layer.bias.reshape(-1, 1, 1, 1, 1)
    close(y, layer.output())


@pytest.mark.parametrize("name", NAMES_4D)
def test_output_size_in_4d(name):
    layer = cached_layer(name)
    in_size = tuple(layer.x.shape[2:])
    out_size = tuple(layer.output().shape[2:])
    if layer.output_size is None:
        assert layer.spec.output_size(in_size) == out_size
    else:
        assert out_size == layer.output_size
