"""ConvSpec: construction from modules and kwargs, hashing, output sizes."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from engine_cases import CONV_CASES, DTYPE, TRANSPOSED_CASES, cached_layer
from torch import nn

from tnbackpack.tn import ConvSpec

MODULE_CASES = [case for case in CONV_CASES + TRANSPOSED_CASES if case["module"]]
MODULE_NAMES = [case["name"] for case in MODULE_CASES]


def kwargs_of(case):
    """``from_kwargs`` arguments equivalent to a module case."""
    module = case["module"]
    return dict(
        case["kwargs"],
        ndim=int(module[-2]),
        in_channels=case["input_shape"][1],
        transposed=module.startswith("ConvTranspose"),
    )


@pytest.mark.parametrize("case", MODULE_CASES, ids=MODULE_NAMES)
def test_from_module_equals_from_kwargs(case):
    module = getattr(nn, case["module"])(case["input_shape"][1], **case["kwargs"])
    assert ConvSpec.from_module(module) == ConvSpec.from_kwargs(**kwargs_of(case))


@pytest.mark.parametrize("case", MODULE_CASES, ids=MODULE_NAMES)
def test_geometry_matches_torch(case):
    """Padding pairs (PyTorch's 'same' rule), weight shape and output size."""
    layer = cached_layer(case["name"])
    spec = layer.spec
    assert spec.padding == layer.pad_pairs
    assert spec.weight_shape() == tuple(layer.weight.shape)
    in_size = tuple(layer.x.shape[2:])
    out_size = tuple(layer.output().shape[2:])
    if layer.output_size is None:
        assert spec.output_size(in_size) == out_size
    else:
        extra = [o - m for o, m in zip(out_size, spec.output_size(in_size, (0,) * 3))]
        assert spec.output_size(in_size, output_padding=extra) == out_size


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_transposed_output_size_with_output_padding_override(ndim):
    conv_transpose = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
    spec = ConvSpec.from_kwargs(
        ndim, 2, 2, kernel_size=2, stride=3, padding=1, dilation=2, transposed=True
    )
    x = torch.zeros(1, 2, *([3] * ndim), dtype=DTYPE)
    w = torch.zeros(spec.weight_shape(), dtype=DTYPE)
    for extra in range(3):
        y = conv_transpose[ndim - 1](
            x, w, stride=3, padding=1, dilation=2, output_padding=extra
        )
        assert spec.output_size([3] * ndim, [extra] * ndim) == tuple(y.shape[2:])


def test_one_spec_serves_every_resolution():
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    spec = ConvSpec.from_module(conv)
    for size in [(5, 5), (8, 3), (1, 9)]:
        y = conv(torch.zeros(1, 2, *size))
        assert spec.output_size(size) == tuple(y.shape[2:])


def test_spec_is_hashable_and_a_dict_key():
    first = ConvSpec.from_module(nn.Conv2d(2, 4, 3, padding="same", groups=2))
    again = ConvSpec.from_module(nn.Conv2d(2, 4, 3, padding="same", groups=2))
    other = ConvSpec.from_module(nn.Conv2d(2, 4, 3, padding=2, groups=2))
    assert first == again and hash(first) == hash(again)
    assert first != other
    table = {first: "same", other: "two"}
    assert table[again] == "same"
    assert len({first, again, other}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.stride = (2, 2)


def test_from_kwargs_normalizes_equivalent_arguments():
    short = ConvSpec.from_kwargs(2, 2, 4, 3, stride=2, padding=1)
    long = ConvSpec.from_kwargs(
        2, 2, 4, (3, 3), stride=(2, 2), padding=((1, 1), (1, 1))
    )
    assert short == long
    assert ConvSpec.from_kwargs(1, 2, 4, 3, padding="valid") == ConvSpec.from_kwargs(
        1, 2, 4, 3, padding=0
    )


@pytest.mark.parametrize(
    "kernel, dilation, pairs",
    [(4, 1, (1, 2)), (2, 1, (0, 1)), (4, 2, (3, 3)), (3, 3, (3, 3)), (1, 5, (0, 0))],
)
def test_same_padding_split_follows_pytorch(kernel, dilation, pairs):
    spec = ConvSpec.from_kwargs(1, 1, 1, kernel, padding="same", dilation=dilation)
    assert spec.padding == (pairs,)
    conv = nn.Conv1d(1, 1, kernel, padding="same", dilation=dilation)
    assert tuple(conv._reversed_padding_repeated_twice) == pairs


def test_describe_names_the_layer():
    conv = ConvSpec.from_module(nn.Conv3d(2, 4, 3, padding_mode="circular"))
    assert conv.describe().startswith("Conv3d(2, 4")
    assert "circular" in conv.describe()
    transposed = ConvSpec.from_module(nn.ConvTranspose1d(2, 4, 3))
    assert transposed.describe().startswith("ConvTranspose1d(2, 4")
