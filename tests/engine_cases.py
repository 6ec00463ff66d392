"""Shared case lists and independent references for the engine tests.

A *case* is a plain dict::

    dict(name=..., seed=..., input_shape=(N, C_in, *I), module="Conv2d",
         kwargs=dict(out_channels=..., kernel_size=..., ...), output_size=None)

``module`` names a ``torch.nn`` class; the reference is then that module's own
forward (which handles ``padding_mode``, ``'same'`` and ``output_size=``). With
``module=None`` the kwargs go to :meth:`ConvSpec.from_kwargs` (for padding
``(left, right)`` pairs, which no ``nn`` module accepts, or ``ndim > 3``) and the
reference pads the input explicitly with ``F.pad`` and convolves without padding.

Every reference here is built from PyTorch's convolutions, ``F.pad``, autograd,
``torch.func`` or explicit Python loops: none of them uses the engine.

Besides the fixed lists, :func:`random_cases` is a hypothesis strategy for
random valid layers in the same dict format, and :func:`case_params` the
parametrization ``(name, route, simplified)`` shared by the quantity tests.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cache, reduce
from math import prod
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from tnbackpack.tn import ConvSpec

DTYPE = torch.float64
#: Tolerances for float64 comparisons against the references.
TOL = dict(rtol=1e-10, atol=1e-12)

PADDING_MODE_OF_PAD = {
    "zeros": "constant",
    "reflect": "reflect",
    "replicate": "replicate",
    "circular": "circular",
}


def close(actual: Tensor, expected: Tensor, **tolerances: float) -> None:
    """Assert float64 closeness with the suite's tight tolerances."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    torch.testing.assert_close(actual, expected, **{**TOL, **tolerances})


# ------------------------------------------------------------------ case lists
def _case(name, input_shape, module, seed=0, output_size=None, **kwargs) -> Dict:
    return dict(
        name=name,
        seed=seed,
        input_shape=tuple(input_shape),
        module=module,
        kwargs=kwargs,
        output_size=None if output_size is None else tuple(output_size),
    )


CONV_CASES: List[Dict] = [
    # ---- Conv1d
    _case("c1-basic", (2, 3, 9), "Conv1d", out_channels=4, kernel_size=3),
    _case(
        "c1-stride-pad-dil-nobias", (2, 2, 11), "Conv1d", seed=1, out_channels=3,
        kernel_size=3, stride=2, padding=1, dilation=2, bias=False,
    ),
    _case("c1-same-even", (2, 2, 7), "Conv1d", out_channels=3, kernel_size=4,
          padding="same"),
    _case("c1-same-k2", (2, 2, 6), "Conv1d", out_channels=2, kernel_size=2,
          padding="same"),
    _case("c1-same-even-dil", (1, 2, 9), "Conv1d", out_channels=3, kernel_size=4,
          padding="same", dilation=2),
    _case("c1-valid", (3, 2, 8), "Conv1d", out_channels=2, kernel_size=3,
          padding="valid", stride=3),
    _case("c1-reflect", (2, 2, 8), "Conv1d", out_channels=3, kernel_size=3,
          padding=2, stride=2, padding_mode="reflect"),
    _case("c1-replicate", (2, 2, 6), "Conv1d", out_channels=3, kernel_size=2,
          padding=3, padding_mode="replicate"),
    _case("c1-circular", (2, 2, 5), "Conv1d", out_channels=3, kernel_size=3,
          padding=4, dilation=2, padding_mode="circular"),
    _case("c1-same-even-reflect", (2, 2, 7), "Conv1d", out_channels=2,
          kernel_size=4, padding="same", padding_mode="reflect"),
    _case("c1-groups", (2, 6, 7), "Conv1d", out_channels=9, kernel_size=2,
          groups=3, padding=1),
    _case("c1-depthwise", (2, 4, 8), "Conv1d", out_channels=8, kernel_size=3,
          groups=4, stride=2, padding=1, bias=False),
    _case("c1-pad-wider-than-kernel", (2, 2, 4), "Conv1d", out_channels=2,
          kernel_size=2, padding=3, stride=2),
    # ---- Conv2d
    _case("c2-basic", (2, 3, 6, 5), "Conv2d", out_channels=4, kernel_size=3,
          padding=1),
    _case("c2-asym-kernel", (2, 2, 6, 7), "Conv2d", seed=2, out_channels=3,
          kernel_size=(1, 3), stride=(2, 1), padding=(0, 1)),
    _case("c2-asym-kernel-t", (2, 2, 7, 5), "Conv2d", out_channels=2,
          kernel_size=(3, 1), padding=(1, 0), bias=False),
    _case("c2-same-reflect-dil", (2, 2, 6, 6), "Conv2d", out_channels=3,
          kernel_size=(2, 3), padding="same", dilation=(2, 1),
          padding_mode="reflect"),
    _case("c2-same-even", (2, 2, 5, 6), "Conv2d", out_channels=2, kernel_size=(4, 2),
          padding="same"),
    _case("c2-same-circular", (1, 2, 5, 4), "Conv2d", out_channels=2,
          kernel_size=(3, 4), padding="same", padding_mode="circular", dilation=(1, 1)),
    _case("c2-groups-circular", (2, 4, 6, 5), "Conv2d", out_channels=6,
          kernel_size=3, stride=2, padding=(1, 2), groups=2, padding_mode="circular"),
    _case("c2-replicate-dil", (2, 2, 7, 6), "Conv2d", out_channels=3,
          kernel_size=(2, 3), padding=(2, 1), dilation=2, padding_mode="replicate"),
    _case("c2-reflect-stride", (2, 3, 6, 7), "Conv2d", out_channels=2,
          kernel_size=3, padding=(2, 1), stride=(2, 3), padding_mode="reflect",
          bias=False),
    _case("c2-depthwise", (2, 3, 7, 6), "Conv2d", out_channels=3, kernel_size=3,
          stride=2, padding=1, groups=3),
    _case("c2-valid", (2, 2, 6, 5), "Conv2d", out_channels=3, kernel_size=(3, 2),
          stride=(1, 2), padding="valid"),
    # simplification: dense (K == S), divisible and cropped inputs
    _case("c2-dense", (2, 3, 6, 6), "Conv2d", out_channels=4, kernel_size=2,
          stride=2),
    _case("c2-dense-crop", (2, 3, 7, 5), "Conv2d", out_channels=2, kernel_size=(2, 3),
          stride=(2, 3)),
    _case("c2-dense-groups-reflect", (2, 4, 6, 4), "Conv2d", out_channels=2,
          kernel_size=2, stride=2, groups=2, padding_mode="reflect"),
    # simplification: down-sampling (S > K), 1x1 stride 2 shortcut
    _case("c2-downsample-1x1", (2, 3, 7, 6), "Conv2d", out_channels=4, kernel_size=1,
          stride=2, bias=False),
    _case("c2-downsample-k2s3", (2, 2, 8, 7), "Conv2d", out_channels=3, kernel_size=2,
          stride=3),
    # simplification: 1x1 identity
    _case("c2-identity-1x1", (2, 4, 5, 3), "Conv2d", out_channels=6, kernel_size=1),
    _case("c2-identity-1x1-groups", (2, 4, 3, 4), "Conv2d", out_channels=4,
          kernel_size=1, groups=2, padding_mode="circular"),
    # simplification: dilated, non-overlapping windows (S >= D(K-1)+1)
    _case("c2-dilated-windows", (2, 2, 9, 8), "Conv2d", out_channels=3, kernel_size=2,
          stride=3, dilation=2),
    _case("c2-dilated-windows-mixed", (2, 2, 9, 8), "Conv2d", out_channels=2,
          kernel_size=(2, 3), stride=(4, 3), dilation=(3, 1)),
    # ---- Conv3d
    _case("c3-basic", (2, 2, 5, 4, 5), "Conv3d", out_channels=3, kernel_size=3,
          padding=1, stride=2),
    _case("c3-same-circular", (2, 2, 4, 3, 5), "Conv3d", out_channels=2,
          kernel_size=(2, 3, 1), padding="same", padding_mode="circular"),
    _case("c3-groups-reflect", (1, 4, 4, 5, 3), "Conv3d", out_channels=2,
          kernel_size=(2, 2, 3), padding=(1, 0, 1), groups=2, padding_mode="reflect"),
    _case("c3-replicate-dil", (2, 2, 5, 4, 4), "Conv3d", out_channels=2,
          kernel_size=2, padding=(1, 2, 0), dilation=(2, 1, 3),
          padding_mode="replicate", bias=False),
    _case("c3-dense", (2, 2, 4, 6, 4), "Conv3d", out_channels=3, kernel_size=2,
          stride=2),
    _case("c3-depthwise-valid", (2, 3, 4, 4, 5), "Conv3d", out_channels=6,
          kernel_size=(1, 2, 3), padding="valid", groups=3),
]

TRANSPOSED_CASES: List[Dict] = [
    _case("t1-basic", (2, 3, 5), "ConvTranspose1d", out_channels=2, kernel_size=3),
    _case("t1-stride-outpad", (2, 2, 5), "ConvTranspose1d", out_channels=3,
          kernel_size=3, stride=2, padding=1, output_padding=1),
    _case("t1-output-size", (2, 2, 4), "ConvTranspose1d", out_channels=2,
          kernel_size=4, stride=3, output_size=(14,)),
    _case("t1-dil-groups", (2, 4, 5), "ConvTranspose1d", out_channels=2,
          kernel_size=3, dilation=2, groups=2, padding=2, bias=False),
    _case("t1-dil-outpad", (2, 2, 4), "ConvTranspose1d", out_channels=2,
          kernel_size=2, dilation=3, output_padding=2),
    _case("t2-basic", (2, 3, 4, 3), "ConvTranspose2d", out_channels=2,
          kernel_size=3, stride=2, padding=1, output_padding=1),
    _case("t2-asym", (2, 3, 3, 4), "ConvTranspose2d", out_channels=6,
          kernel_size=(2, 3), stride=(2, 1), padding=(0, 1), groups=3),
    _case("t2-depthwise", (2, 3, 3, 3), "ConvTranspose2d", out_channels=3,
          kernel_size=3, stride=2, groups=3, bias=False),
    _case("t2-output-size-pad", (2, 2, 3, 4), "ConvTranspose2d", out_channels=2,
          kernel_size=3, stride=(3, 2), padding=1, output_size=(8, 8)),
    # simplification: dense (K == S) up-sampling, with output padding/size
    _case("t2-dense", (2, 3, 3, 2), "ConvTranspose2d", out_channels=2,
          kernel_size=2, stride=2),
    _case("t2-dense-outpad", (2, 2, 3, 3), "ConvTranspose2d", out_channels=3,
          kernel_size=2, stride=2, output_padding=(1, 0)),
    _case("t2-dense-output-size", (2, 2, 2, 3), "ConvTranspose2d", out_channels=2,
          kernel_size=(2, 3), stride=(2, 3), output_size=(5, 11)),
    # simplification: S > K (zero-stuffing up-sampling) and dilated windows
    _case("t2-upsample-1x1", (2, 2, 3, 3), "ConvTranspose2d", out_channels=3,
          kernel_size=1, stride=2, output_size=(6, 5)),
    _case("t2-dilated-windows", (2, 2, 3, 2), "ConvTranspose2d", out_channels=2,
          kernel_size=2, stride=3, dilation=2, output_padding=2),
    _case("t2-identity-1x1", (2, 4, 3, 3), "ConvTranspose2d", out_channels=2,
          kernel_size=1, groups=2),
    _case("t3-basic", (2, 2, 3, 2, 3), "ConvTranspose3d", out_channels=2,
          kernel_size=3, stride=2, padding=1, output_padding=(1, 0, 1)),
    _case("t3-groups-output-size", (1, 4, 2, 3, 2), "ConvTranspose3d",
          out_channels=2, kernel_size=2, stride=2, groups=2, output_size=(5, 6, 4)),
    _case("t3-dil", (2, 2, 2, 3, 2), "ConvTranspose3d", out_channels=3,
          kernel_size=(2, 1, 2), dilation=(2, 1, 1), padding=(1, 0, 0), bias=False),
]

#: Explicit ``(left, right)`` padding pairs (only reachable through ``from_kwargs``).
PAIR_CASES: List[Dict] = [
    _case("p1-reflect-left", (2, 2, 6), None, ndim=1, out_channels=3, kernel_size=3,
          padding=((2, 0),), padding_mode="reflect"),
    _case("p2-zeros-stride", (2, 2, 6, 5), None, ndim=2, out_channels=2,
          kernel_size=3, stride=2, padding=((0, 1), (2, 1))),
    _case("p2-circular", (2, 2, 4, 5), None, ndim=2, out_channels=2, kernel_size=2,
          padding=((1, 0), (0, 2)), padding_mode="circular", bias=False),
    _case("p2-dense-right-zeros", (2, 2, 5, 5), None, ndim=2, out_channels=3,
          kernel_size=2, stride=2, padding=((0, 1), (0, 1))),
    _case("p2-dense-right-reflect", (2, 2, 5, 5), None, ndim=2, out_channels=3,
          kernel_size=2, stride=2, padding=((0, 1), (0, 1)), padding_mode="reflect"),
    _case("p3-replicate-groups", (2, 4, 3, 4, 3), None, ndim=3, out_channels=2,
          kernel_size=2, padding=((0, 1), (1, 0), (0, 0)), groups=2,
          padding_mode="replicate"),
]

#: Four spatial axes (no ``nn`` module exists): references unroll the first
#: axis into 3d convolutions (see :func:`conv_nd`).
FOUR_D_CASES: List[Dict] = [
    _case("c4-basic", (2, 2, 4, 3, 3, 4), None, ndim=4, out_channels=3,
          kernel_size=(2, 1, 3, 2), stride=(2, 1, 1, 2), padding=(1, 0, 1, 0)),
    _case("c4-groups-circular-pairs", (2, 4, 3, 4, 3, 3), None, ndim=4,
          out_channels=2, kernel_size=2, dilation=(1, 2, 1, 1), groups=2,
          padding=((0, 1), (1, 0), (1, 1), (0, 0)), padding_mode="circular",
          bias=False),
    _case("c4-reflect-same", (1, 2, 3, 3, 4, 3), None, ndim=4, out_channels=2,
          kernel_size=(2, 3, 2, 1), padding="same", padding_mode="reflect"),
    _case("c4-dense", (2, 2, 4, 2, 4, 2), None, ndim=4, out_channels=2,
          kernel_size=2, stride=2),
    _case("t4-basic", (2, 2, 2, 3, 2, 2), None, ndim=4, out_channels=2,
          kernel_size=(2, 2, 1, 3), stride=(2, 1, 2, 1), padding=(0, 1, 0, 1),
          output_padding=(1, 0, 1, 0), transposed=True),
    _case("t4-dil-outpad", (1, 2, 2, 3, 2, 2), None, ndim=4, out_channels=3,
          kernel_size=(2, 2, 1, 2), stride=(1, 2, 1, 1), dilation=(2, 1, 1, 2),
          output_padding=(1, 1, 0, 1), transposed=True),
    _case("t4-groups-output-size", (2, 4, 2, 2, 3, 2), None, ndim=4,
          out_channels=2, kernel_size=2, stride=2, groups=2, transposed=True,
          output_size=(5, 4, 6, 4)),
]

ALL_CASES: List[Dict] = CONV_CASES + TRANSPOSED_CASES + PAIR_CASES + FOUR_D_CASES

#: Cases whose patterns are non-overlapping strided windows in every dimension:
#: the simplifier must remove all patterns there.
WINDOW_CASES = [
    "c2-dense", "c2-dense-crop", "c2-dense-groups-reflect", "c2-downsample-1x1",
    "c2-downsample-k2s3", "c2-identity-1x1", "c2-identity-1x1-groups",
    "c2-dilated-windows", "c2-dilated-windows-mixed", "c3-dense", "t2-dense",
    "t2-dense-outpad", "t2-dense-output-size", "t2-upsample-1x1",
    "t2-dilated-windows", "t2-identity-1x1", "p2-dense-right-zeros", "c4-dense",
    "c1-valid", "t3-groups-output-size", "t4-groups-output-size",
]


# ---------------------------------------------------------------- layer object
@dataclass
class Layer:
    """A concrete layer with data, its engine spec and a reference forward.

    Attributes:
        name: Case name.
        spec: Engine spec.
        apply: Reference ``(x, weight, bias) -> y`` (bias may be ``None``).
        x: Input ``[N, C_in, *I]``.
        weight: Weight as PyTorch stores it.
        bias: Bias or ``None``.
        output_size: Spatial output size passed to the engine (transposed layers
            called with ``output_size=``), else ``None``.
        pad_pairs: Per dimension ``(left, right)`` padding as PyTorch applies it
            (for a transposed layer: what is cropped from the full output).
    """

    name: str
    spec: ConvSpec
    apply: Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]
    x: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    output_size: Optional[Tuple[int, ...]]
    pad_pairs: Tuple[Tuple[int, int], ...]

    @property
    def transposed(self) -> bool:
        return self.spec.transposed

    def output(self) -> Tensor:
        """Reference output (no autograd graph)."""
        with torch.no_grad():
            return self.apply(self.x, self.weight, self.bias)

    def random_output_like(self, *lead: int, seed: int = 123) -> Tensor:
        """Random tensor shaped like the output, with extra leading axes."""
        shape = self.output().shape
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(*lead, *shape, dtype=DTYPE, generator=generator)


def flat_pad(pairs: Sequence[Tuple[int, int]]) -> List[int]:
    """``F.pad``'s argument (last dimension first) for per-dimension pairs."""
    return [p for pair in reversed(pairs) for p in pair]


def pad_input(x: Tensor, pairs: Sequence[Tuple[int, int]], mode: str) -> Tensor:
    """Pad the spatial axes of ``x [N, C, *I]`` as a convolution does.

    Padding is separable, so any number of spatial axes is padded one axis at
    a time with ``F.pad`` on a 1d view (``F.pad`` itself stops at 3 axes).
    """
    if len(pairs) <= 3:
        return F.pad(x, flat_pad(pairs), mode=PADDING_MODE_OF_PAD[mode])
    for d, pair in enumerate(pairs):
        axis = 2 + d
        moved = x.movedim(axis, -1)
        shape = moved.shape
        padded = F.pad(
            moved.reshape(-1, 1, shape[-1]), list(pair), mode=PADDING_MODE_OF_PAD[mode]
        )
        x = padded.reshape(*shape[:-1], padded.shape[-1]).movedim(-1, axis)
    return x


def conv_nd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    native_up_to: int = 3,
) -> Tensor:
    """Unpadded convolution with any number of spatial axes.

    Up to ``native_up_to`` axes this is ``F.conv{1,2,3}d``. Beyond, the first
    spatial axis is unrolled: each output slice is a sum over its kernel taps
    of lower-dim convolutions of input slices (the tests validate the
    unrolling by lowering ``native_up_to`` on 2d/3d problems).
    """
    ndim = x.ndim - 2
    if ndim <= native_up_to:
        conv = (F.conv1d, F.conv2d, F.conv3d)[ndim - 1]
        return conv(x, weight, bias, stride=tuple(stride), dilation=tuple(dilation),
                    groups=groups)
    size, kernel = x.shape[2], weight.shape[2]
    reach = dilation[0] * (kernel - 1) + 1
    outputs = []
    for o in range(0, (size - reach) // stride[0] + 1):
        taps = [
            conv_nd(x[:, :, o * stride[0] + k * dilation[0]], weight[:, :, k], None,
                    stride[1:], dilation[1:], groups, native_up_to)
            for k in range(kernel)
        ]
        outputs.append(reduce(torch.add, taps))
    y = torch.stack(outputs, dim=2)
    if bias is not None:
        y = y + bias.reshape(-1, *([1] * ndim))
    return y


def conv_transpose_nd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    output_size: Sequence[int],
) -> Tensor:
    """Transposed convolution as the adjoint of :func:`conv_nd` (any ``ndim``).

    ``ConvTranspose(x) = J_zᵀ x`` for the convolution ``z -> conv(z)[..., :I]``
    with the same weight, stride, symmetric zero padding and dilation, on an
    input ``z`` of the transposed layer's output size (cropped to the
    transposed layer's input size ``I``).
    """
    pairs = [(p, p) for p in padding]
    c_out = weight.shape[1] * groups
    z = x.new_zeros(x.shape[0], c_out, *output_size)

    def conv(z: Tensor) -> Tensor:
        c = conv_nd(pad_input(z, pairs, "zeros"), weight, None, stride, dilation,
                    groups)
        # with output padding the convolution of z may be longer than x; the
        # transposed layer is the adjoint of the convolution cropped to x
        for d, size in enumerate(x.shape[2:]):
            c = c.narrow(2 + d, 0, size)
        return c

    _, pullback = torch.func.vjp(conv, z)
    (y,) = pullback(x)
    if bias is not None:
        y = y + bias.reshape(-1, *([1] * len(output_size)))
    return y


def build_layer(case: Dict) -> Layer:
    """Instantiate a case: data, weights, spec and reference forward."""
    torch.manual_seed(case["seed"])
    shape = case["input_shape"]
    x = torch.randn(*shape, dtype=DTYPE)
    kwargs = dict(case["kwargs"])
    output_size = case.get("output_size")
    if case["module"] is not None:
        module = getattr(nn, case["module"])(shape[1], **kwargs).to(DTYPE)
        spec = ConvSpec.from_module(module)
        if spec.transposed:
            pad_pairs = tuple((p, p) for p in module.padding)
        else:
            flat = module._reversed_padding_repeated_twice
            pad_pairs = tuple(
                (flat[2 * (spec.ndim - 1 - d)], flat[2 * (spec.ndim - 1 - d) + 1])
                for d in range(spec.ndim)
            )
        call_kwargs = {} if output_size is None else {"output_size": list(output_size)}

        def apply(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
            params = {"weight": weight}
            if module.bias is not None:
                # the module's own bias must not leak into a bias-free call
                params["bias"] = bias if bias is not None else torch.zeros_like(
                    module.bias
                )
            return functional_call(module, params, (x,), call_kwargs)

    else:
        spec = ConvSpec.from_kwargs(in_channels=shape[1], **kwargs)
        pad_pairs = spec.padding
        if spec.transposed:
            size = output_size
            if size is None:
                size = spec.output_size(shape[2:])

            def apply(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
                return conv_transpose_nd(
                    x, weight, bias, spec.stride, [p for p, _ in pad_pairs],
                    spec.dilation, spec.groups, size,
                )

        else:

            def apply(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
                padded = pad_input(x, pad_pairs, spec.padding_mode)
                return conv_nd(padded, weight, bias, spec.stride, spec.dilation,
                               spec.groups)

    weight = torch.randn(*spec.weight_shape(), dtype=DTYPE)
    bias = torch.randn(spec.out_channels, dtype=DTYPE) if spec.bias else None
    return Layer(case["name"], spec, apply, x, weight, bias, output_size, pad_pairs)


# ------------------------------------------------------------- derivatives
def autograd_vjps(
    layer: Layer, grad_output: Tensor
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(input, weight, bias)`` VJPs of ``<y, grad_output>`` by autograd."""
    x = layer.x.clone().requires_grad_()
    weight = layer.weight.clone().requires_grad_()
    bias = None if layer.bias is None else layer.bias.clone().requires_grad_()
    y = layer.apply(x, weight, bias)
    inputs = [x, weight] + ([] if bias is None else [bias])
    grads = torch.autograd.grad((y * grad_output).sum(), inputs)
    return grads[0], grads[1], (grads[2] if bias is not None else None)


def input_vjps(layer: Layer, grad_outputs: Tensor) -> Tensor:
    """Input VJPs ``[V, N, C_in, *I]`` for ``grad_outputs [V, N, C_out, *O]``."""
    return torch.stack([autograd_vjps(layer, g)[0] for g in grad_outputs])


def per_sample_grads(
    layer: Layer, grad_output: Tensor, vectors: bool = False
) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-sample gradients of ``<y_n, g_n>`` w.r.t. weight and bias (torch.func).

    Returns:
        ``[(V,) N, *weight]`` and ``[(V,) N, C_out]`` (``None`` without bias).
    """
    with_bias = layer.bias is not None

    def inner(weight: Tensor, bias: Optional[Tensor], x_n: Tensor, g_n: Tensor):
        y = layer.apply(x_n.unsqueeze(0), weight, bias)
        return (y * g_n.unsqueeze(0)).sum()

    per_sample = vmap(
        grad(inner, argnums=(0, 1) if with_bias else 0), in_dims=(None, None, 0, 0)
    )
    if vectors:
        per_sample = vmap(per_sample, in_dims=(None, None, None, 0))
    result = per_sample(layer.weight, layer.bias, layer.x, grad_output)
    if with_bias:
        return result[0], result[1]
    return result, None


# ----------------------------------------------------------------- patches
def conv_patches_by_loop(layer: Layer) -> Tensor:
    """im2col of a convolution, one output position at a time.

    Patch ``o`` is the window ``x_padded[:, :, S·o : S·o + D·(K-1)+1 : D]`` of the
    input padded as the layer pads it.

    Returns:
        ``[N, C_in·∏K, ∏O]`` in ``F.unfold``'s order.
    """
    spec = layer.spec
    padded = pad_input(layer.x, layer.pad_pairs, spec.padding_mode)
    out_size = layer.output().shape[2:]
    columns = []
    for o in itertools.product(*(range(s) for s in out_size)):
        window = tuple(
            slice(o[d] * spec.stride[d],
                  o[d] * spec.stride[d] + spec.dilation[d] * (spec.kernel_size[d] - 1)
                  + 1,
                  spec.dilation[d])
            for d in range(spec.ndim)
        )
        columns.append(padded[(slice(None), slice(None), *window)].flatten(1))
    return torch.stack(columns, dim=-1)


def transposed_patches_by_loop(layer: Layer) -> Tensor:
    """Patches of a transposed convolution, one output position at a time.

    The patch of output location ``o`` holds, for input channel ``c`` and
    kernel tap ``k``, the input value ``x[c, i]`` that the weight ``W[c, :, k]``
    scatters to ``o``, i.e. ``S·i + D·k − P = o``; zero if there is none.

    Returns:
        ``[N, C_in·∏K, ∏O]`` (``C_in`` major, then the taps).
    """
    spec = layer.spec
    x = layer.x
    in_size = x.shape[2:]
    out_size = layer.output().shape[2:]
    patches = x.new_zeros(x.shape[0], x.shape[1], *spec.kernel_size, prod(out_size))
    for t, o in enumerate(itertools.product(*(range(s) for s in out_size))):
        taps, sources = [], []
        for d in range(spec.ndim):
            pairs = []
            for k in range(spec.kernel_size[d]):
                shifted = o[d] + layer.pad_pairs[d][0] - spec.dilation[d] * k
                i = shifted // spec.stride[d]
                if shifted % spec.stride[d] == 0 and 0 <= i < in_size[d]:
                    pairs.append((k, i))
            if not pairs:
                break
            # index arrays along their own axis, to broadcast like an outer product
            view = [1] * spec.ndim
            view[d] = -1
            taps.append(torch.tensor([k for k, _ in pairs]).reshape(view))
            sources.append(torch.tensor([i for _, i in pairs]).reshape(view))
        else:
            everything = (slice(None), slice(None))
            patches[(*everything, *taps, t)] = x[(*everything, *sources)]
    return patches.flatten(1, -2)


def patches_by_loop(layer: Layer) -> Tensor:
    """Loop-built patches of a convolution or transposed convolution."""
    if layer.transposed:
        return transposed_patches_by_loop(layer)
    return conv_patches_by_loop(layer)


def output_from_patches(layer: Layer, patches: Tensor) -> Tensor:
    """``y = W̃ patches`` per group (no bias), reshaped to the output."""
    spec = layer.spec
    g = spec.groups
    n, _, t = patches.shape
    grouped = patches.reshape(n, g, -1, t)
    w = layer.weight.reshape(g, -1, *layer.weight.shape[1:])
    if spec.transposed:
        # [G, ci, co, *K] -> [G, co, ci*K]
        w = w.movedim(2, 1)
    w = w.flatten(2)
    y = torch.einsum("gca,ngat->ngct", w, grouped)
    return y.reshape(n, spec.out_channels, *layer.output().shape[2:])


# ------------------------------------------------------------- KFAC factors
def kfac_input_reference(patches: Tensor, groups: int, approx: str) -> Tensor:
    """KFAC input factor per group from patches ``[N, C_in·∏K, T]``."""
    n, _, t = patches.shape
    grouped = patches.reshape(n, groups, -1, t)
    if approx == "expand":
        return torch.einsum("ngat,ngbt->gab", grouped, grouped) / (n * t)
    summed = grouped.sum(-1)
    return torch.einsum("nga,ngb->gab", summed, summed) / (n * t**2)


def kfac_output_reference(sqrt_ggn: Tensor, groups: int, approx: str) -> Tensor:
    """KFAC output factor per group from ``S [V, N, C_out, *O]``."""
    v, n, c = sqrt_ggn.shape[:3]
    grouped = sqrt_ggn.reshape(v, n, groups, c // groups, -1)
    if approx == "expand":
        return torch.einsum("vngat,vngbt->gab", grouped, grouped)
    summed = grouped.sum(-1)
    return torch.einsum("vnga,vngb->gab", summed, summed)


def squares_reference(
    per_sample: Tensor, vectors: bool, per_sample_out: bool, sum_weight: bool
) -> Tensor:
    """Squares of per-sample VJPs ``[(V,) N, *weight]`` reduced like the engine."""
    squares = per_sample.square()
    if vectors:
        squares = squares.sum(0)
    if sum_weight:
        return squares.flatten(1).sum(1)
    return squares if per_sample_out else squares.sum(0)


# ------------------------------------------------------------------ caching
CASES_BY_NAME: Dict[str, Dict] = {case["name"]: case for case in ALL_CASES}
NAMES: List[str] = [case["name"] for case in ALL_CASES]
assert len(set(NAMES)) == len(NAMES), "case names must be unique"


@cache
def cached_layer(name: str) -> Layer:
    """The layer of a named fixed case, built once per session (do not mutate)."""
    return build_layer(CASES_BY_NAME[name])


@cache
def cached_per_sample_grads(name: str, vectors: bool, seed: int = 7):
    """Random output gradient(s) and their per-sample gradients for a named case.

    Returns:
        ``(grad_output, weight_grads, bias_grads)`` with ``grad_output`` of
        shape ``[2, N, C_out, *O]`` if ``vectors`` else ``[N, C_out, *O]``.
    """
    layer = cached_layer(name)
    lead = (2,) if vectors else ()
    grad_output = layer.random_output_like(*lead, seed=seed)
    weight_grads, bias_grads = per_sample_grads(layer, grad_output, vectors)
    return grad_output, weight_grads, bias_grads


# ------------------------------------------------------------- random layers
def _int_or_tuple(draw, values: Tuple[int, ...]):
    """An int when all entries agree and the draw says so, else the tuple."""
    if len(set(values)) == 1 and draw(st.booleans()):
        return values[0]
    return values


@st.composite
def random_cases(draw, max_ndim: int = 3, transposed: Optional[bool] = None) -> Dict:
    """A case dict for a random valid (transposed) convolution and input.

    Covers 1–``max_ndim`` spatial axes, kernel/stride/dilation per axis, int,
    tuple, ``'same'``, ``'valid'`` and ``(left, right)`` padding, every padding
    mode, groups (also depthwise), bias on/off, and transposed layers with
    output padding or an ``output_size=`` call. Sizes stay small, and the
    configuration is one PyTorch accepts (reflect padding < input size,
    ``'same'`` only with stride 1, output padding < max(stride, dilation)).
    """
    ndim = draw(st.integers(1, max_ndim))
    if transposed is None:
        transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    depthwise = groups > 1 and draw(st.booleans())
    in_channels = groups * (1 if depthwise else draw(st.integers(1, 2)))
    out_channels = groups * draw(st.integers(1, 2))
    # 3d (and transposed) layers get smaller hyper-parameters: sizes multiply
    big = 2 if (ndim == 3 or transposed) else 3
    kernel = tuple(draw(st.integers(1, big + 1)) for _ in range(ndim))
    stride = tuple(draw(st.integers(1, big)) for _ in range(ndim))
    dilation = tuple(draw(st.sampled_from([1, 1, 2, big])) for _ in range(ndim))
    reach = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
    kwargs = dict(out_channels=out_channels, bias=draw(st.booleans()), groups=groups)
    module = f"{'ConvTranspose' if transposed else 'Conv'}{ndim}d"
    batch = draw(st.integers(1, 3))
    output_size = None

    if transposed:
        padding = tuple(draw(st.integers(0, 2)) for _ in range(ndim))
        output_padding = tuple(
            draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation)
        )
        sizes = []
        for d in range(ndim):
            # smallest input whose output (without output padding) is non-empty
            deficit = max(0, 2 * padding[d] - reach[d] + 1)
            low = 1 + -(-deficit // stride[d])
            sizes.append(draw(st.integers(low, low + (1 if ndim == 3 else 2))))
        if draw(st.booleans()):
            # PyTorch accepts output_size up to stride - 1 above the smallest
            smallest = [
                (i - 1) * s - 2 * p + r
                for i, s, p, r in zip(sizes, stride, padding, reach)
            ]
            output_size = tuple(
                m + draw(st.integers(0, s - 1)) for m, s in zip(smallest, stride)
            )
        kwargs.update(output_padding=_int_or_tuple(draw, output_padding),
                      padding=_int_or_tuple(draw, padding))
    else:
        kind = draw(st.sampled_from(["int", "tuple", "same", "valid", "pairs"]))
        mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
        if kind == "same":
            stride = (1,) * ndim
            # PyTorch's split of the total D·(K−1) = reach − 1
            pairs = tuple(((r - 1) // 2, r - 1 - (r - 1) // 2) for r in reach)
            padding = "same"
        elif kind == "valid":
            pairs = ((0, 0),) * ndim
            padding = "valid"
        elif kind == "int":
            p = draw(st.integers(0, 3))
            pairs, padding = ((p, p),) * ndim, p
        elif kind == "tuple":
            padding = tuple(draw(st.integers(0, 3)) for _ in range(ndim))
            pairs = tuple((p, p) for p in padding)
        else:
            pairs = tuple(
                (draw(st.integers(0, 3)), draw(st.integers(0, 3))) for _ in range(ndim)
            )
            padding = pairs
            module = None
            kwargs.update(ndim=ndim)
        sizes = []
        for d in range(ndim):
            low = max(1, reach[d] - sum(pairs[d]))
            if mode == "reflect":
                low = max(low, max(pairs[d]) + 1)
            elif mode == "circular":
                low = max(low, max(pairs[d]))
            sizes.append(draw(st.integers(low, low + (2 if ndim == 3 else 3))))
        kwargs.update(padding=padding, padding_mode=mode)

    kwargs.update(
        kernel_size=_int_or_tuple(draw, kernel),
        stride=_int_or_tuple(draw, stride),
        dilation=_int_or_tuple(draw, dilation),
    )
    return dict(
        name=f"random-{module or 'pairs'}",
        seed=draw(st.integers(0, 2**16)),
        input_shape=(batch, in_channels, *sizes),
        module=module,
        kwargs=kwargs,
        output_size=output_size,
    )


# --------------------------------------------------------- parametrization
def window_dims(spec: ConvSpec) -> List[bool]:
    """Per dimension: is the index pattern a set of non-overlapping windows?

    Nothing may be padded (cropped, for a transposed layer) on the left, padded
    positions on the right may only read zeros, and consecutive windows
    ``[S·o, S·o + D·(K−1)]`` must not overlap. Only there can the simplifier
    replace a pattern by a reshape.
    """
    return [
        left == 0
        and (right == 0 or spec.padding_mode == "zeros")
        and s >= d * (k - 1) + 1
        for (left, right), k, s, d in zip(
            spec.padding, spec.kernel_size, spec.stride, spec.dilation
        )
    ]


def simplifiable(name: str) -> bool:
    """Whether ``simplified=True`` and ``False`` differ for a named case."""
    return any(window_dims(cached_layer(name).spec))


def case_params(*routes: Optional[str]) -> List:
    """``pytest.param(name, route, simplified)`` for every case and route.

    The unsimplified path is only run where the simplifier changes the
    network (elsewhere both paths contract the same network); ``None`` stands
    for an entry point without routes.
    """
    params = []
    for name in NAMES:
        for route in routes:
            label = f"{name}-{route}" if route else name
            params.append(pytest.param(name, route, True, id=f"{label}-simple"))
            if route in (None, "tn", "materialize", "contract", "auto") and (
                simplifiable(name)
            ):
                params.append(pytest.param(name, route, False, id=f"{label}-full"))
    return params
