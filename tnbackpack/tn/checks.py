"""Argument checks that turn bad input into messages naming the layer and option.

Without them a wrong shape surfaces as an opaque error deep inside an einsum.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

from torch import Tensor

from .spec import ConvSpec


def check_tensor(spec: ConvSpec, name: str, tensor: Tensor, ndim: int) -> None:
    """Check type, floating dtype and number of axes of an argument."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{spec.describe()}: {name} must be a torch.Tensor")
    if not tensor.is_floating_point():
        raise TypeError(
            f"{spec.describe()}: {name} must have a floating dtype, got {tensor.dtype}"
        )
    if tensor.ndim != ndim:
        raise ValueError(
            f"{spec.describe()}: {name} must have {ndim} axes, "
            f"got shape {tuple(tensor.shape)}"
        )


def check_same_kind(spec: ConvSpec, **tensors: Optional[Tensor]) -> None:
    """Check that all given tensors share dtype and device."""
    present = {k: v for k, v in tensors.items() if v is not None}
    kinds = {(t.dtype, t.device) for t in present.values()}
    if len(kinds) > 1:
        found = ", ".join(f"{k}: {t.dtype} on {t.device}" for k, t in present.items())
        raise TypeError(f"{spec.describe()}: dtype/device mismatch ({found})")


def check_input(spec: ConvSpec, x: Tensor) -> Tuple[int, ...]:
    """Check the layer input ``[N, C_in, *I]``; return its spatial size."""
    check_tensor(spec, "input", x, spec.ndim + 2)
    if x.shape[1] != spec.in_channels:
        raise ValueError(
            f"{spec.describe()}: input has {x.shape[1]} channels, "
            f"expected in_channels={spec.in_channels}"
        )
    return tuple(x.shape[2:])


def check_weight(spec: ConvSpec, weight: Tensor) -> None:
    """Check the weight's shape against the spec."""
    check_tensor(spec, "weight", weight, spec.ndim + 2)
    if tuple(weight.shape) != spec.weight_shape():
        raise ValueError(
            f"{spec.describe()}: weight has shape {tuple(weight.shape)}, "
            f"expected {spec.weight_shape()}"
        )


def check_output_like(
    spec: ConvSpec,
    name: str,
    tensor: Tensor,
    input_size: Sequence[int],
    batch_size: Optional[int],
    vectors: bool,
) -> Tuple[int, ...]:
    """Check an output-shaped tensor ``[(V,) N, C_out, *O]``; return ``O``.

    For a transposed convolution any output size PyTorch can produce (through
    ``output_size=``) is accepted.
    """
    lead = 2 if vectors else 1
    check_tensor(spec, name, tensor, spec.ndim + 1 + lead)
    if batch_size is not None and tensor.shape[lead - 1] != batch_size:
        raise ValueError(
            f"{spec.describe()}: {name} has batch size {tensor.shape[lead - 1]}, "
            f"the input has {batch_size}"
        )
    if tensor.shape[lead] != spec.out_channels:
        raise ValueError(
            f"{spec.describe()}: {name} has {tensor.shape[lead]} channels, "
            f"expected out_channels={spec.out_channels}"
        )
    size = tuple(tensor.shape[lead + 1 :])
    smallest = spec.output_size(
        input_size, output_padding=(0,) * spec.ndim, allow_empty=spec.transposed
    )
    if spec.transposed:
        slack = _output_slack(spec)
        ok = all(0 <= o - m < s for o, m, s in zip(size, smallest, slack))
    else:
        ok = size == smallest
    if not ok:
        expected = spec.output_size(input_size)
        raise ValueError(
            f"{spec.describe()}: {name} has spatial size {size}, but an input of "
            f"spatial size {tuple(input_size)} gives outputs of size {expected}"
        )
    return size


def _output_slack(spec: ConvSpec) -> Tuple[int, ...]:
    """How far a transposed layer's output may exceed its smallest size (PyTorch)."""
    return tuple(max(s, d) for s, d in zip(spec.stride, spec.dilation))


def output_padding_for(
    spec: ConvSpec, input_size: Sequence[int], output_size: Optional[Sequence[int]]
) -> Tuple[int, ...]:
    """Output padding that produces ``output_size`` (the spec's by default).

    Raises:
        ValueError: If ``output_size`` is not one PyTorch could produce: for a
            convolution it must be the computed size, for a transposed one it
            may exceed the smallest size by less than ``max(stride, dilation)``.
    """
    if output_size is None:
        return spec.output_padding
    requested = tuple(int(o) for o in output_size)
    smallest = spec.output_size(
        input_size, output_padding=(0,) * spec.ndim, allow_empty=spec.transposed
    )
    extra = tuple(o - m for o, m in zip(requested, smallest))
    if spec.transposed:
        slack = _output_slack(spec)
        valid = len(requested) == spec.ndim and all(
            0 <= e < s for e, s in zip(extra, slack)
        )
        largest = tuple(m + s - 1 for m, s in zip(smallest, slack))
        allowed = f"from {smallest} to {largest} per dimension"
    else:
        valid = requested == smallest
        allowed = str(smallest)
    if not valid:
        raise ValueError(
            f"{spec.describe()}: output_size={requested} is not possible for an "
            f"input of spatial size {tuple(input_size)}; allowed: {allowed}"
        )
    return extra if spec.transposed else spec.output_padding


def check_bias(spec: ConvSpec, bias: Optional[Tensor]) -> None:
    """Check that a bias is ``[C_out]``."""
    if bias is None:
        return
    check_tensor(spec, "bias", bias, 1)
    if bias.shape[0] != spec.out_channels:
        raise ValueError(
            f"{spec.describe()}: bias has {bias.shape[0]} entries, "
            f"expected out_channels={spec.out_channels}"
        )


def check_channels(spec: ConvSpec, name: str, tensor: Tensor, dim: int) -> None:
    """Check that axis ``dim`` of ``tensor`` has ``C_out`` entries."""
    if tensor.shape[dim] != spec.out_channels:
        raise ValueError(
            f"{spec.describe()}: {name} has {tensor.shape[dim]} channels, "
            f"expected out_channels={spec.out_channels}"
        )
