"""A frozen, hashable description of one convolution layer.

The spec holds the hyper-parameters only; spatial sizes come from the tensors
at call time, so one spec serves every input resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

from torch import nn

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

IntOrTuple = Union[int, Sequence[int]]


def _as_tuple(value: IntOrTuple, ndim: int, name: str) -> Tuple[int, ...]:
    """Broadcast an int to ``ndim`` entries and validate a sequence's length."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a tuple of ints, got {value!r}")
    if isinstance(value, int):
        return (value,) * ndim
    try:
        result = tuple(int(v) for v in value)
    except TypeError as error:
        raise TypeError(
            f"{name} must be an int or a tuple of {ndim} ints, got {value!r}"
        ) from error
    if len(result) != ndim:
        raise ValueError(f"{name} must have {ndim} entries, got {value!r}")
    return result


@dataclass(frozen=True)
class ConvSpec:
    """Hyper-parameters of a (transposed) convolution with ``ndim`` spatial axes.

    Attributes:
        ndim: Number of spatial dimensions.
        in_channels: Input channels ``C_in``.
        out_channels: Output channels ``C_out``.
        kernel_size: Kernel size per spatial dimension.
        stride: Stride per spatial dimension.
        padding: ``(left, right)`` padding per spatial dimension. For a
            transposed convolution this is the amount cropped from each side
            of the full output, as in PyTorch (always symmetric).
        dilation: Dilation per spatial dimension.
        groups: Number of channel groups.
        bias: Whether the layer has a bias.
        padding_mode: One of ``zeros``, ``reflect``, ``replicate``, ``circular``.
        transposed: Whether this is a ``ConvTranspose``.
        output_padding: Extra output size on the right (transposed only).
    """

    ndim: int
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: Tuple[Tuple[int, int], ...]
    dilation: Tuple[int, ...]
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"
    transposed: bool = False
    output_padding: Tuple[int, ...] = ()

    def __post_init__(self) -> None:
        """Validate the combination of hyper-parameters."""
        n = self.ndim
        if n < 1:
            raise ValueError(f"ndim must be at least 1, got {n}")
        for name in ("kernel_size", "stride", "dilation", "output_padding"):
            value = getattr(self, name)
            if len(value) != n:
                raise ValueError(f"{name} must have {n} entries, got {value!r}")
        for name in ("kernel_size", "stride", "dilation"):
            if any(v < 1 for v in getattr(self, name)):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if len(self.padding) != n or any(len(p) != 2 for p in self.padding):
            raise ValueError(f"padding must be {n} (left, right) pairs: {self.padding}")
        if any(p < 0 for pair in self.padding for p in pair):
            raise ValueError(f"padding must be non-negative, got {self.padding}")
        if self.groups < 1:
            raise ValueError(f"groups must be positive, got {self.groups}")
        for name in ("in_channels", "out_channels"):
            channels = getattr(self, name)
            if channels < 1 or channels % self.groups:
                raise ValueError(
                    f"{name}={channels} must be a positive multiple of "
                    f"groups={self.groups}"
                )
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(
                f"padding_mode must be one of {PADDING_MODES}, "
                f"got {self.padding_mode!r}"
            )
        if self.transposed:
            if self.padding_mode != "zeros":
                raise ValueError(
                    "ConvTranspose supports only padding_mode='zeros' "
                    f"(as in PyTorch), got {self.padding_mode!r}"
                )
            for op, s, d in zip(self.output_padding, self.stride, self.dilation):
                if op < 0 or op >= max(s, d):
                    raise ValueError(
                        "output_padding must be smaller than stride or dilation, "
                        f"got output_padding={self.output_padding}, "
                        f"stride={self.stride}, dilation={self.dilation}"
                    )
        elif any(self.output_padding):
            raise ValueError("output_padding is only valid for transposed convolutions")

    # ------------------------------------------------------------------ build
    @classmethod
    def from_module(cls, module: nn.Module) -> ConvSpec:
        """Build the spec of ``nn.Conv{1,2,3}d`` or ``nn.ConvTranspose{1,2,3}d``.

        Raises:
            TypeError: If ``module`` is not a PyTorch convolution.
        """
        if not isinstance(module, nn.modules.conv._ConvNd):
            raise TypeError(
                f"expected a torch.nn convolution, got {type(module).__name__}"
            )
        ndim = len(module.kernel_size)
        padding = module.padding
        if isinstance(padding, str):
            padding_arg: Union[str, Sequence[int]] = padding
        else:
            padding_arg = tuple(padding)
        return cls.from_kwargs(
            ndim=ndim,
            in_channels=module.in_channels,
            out_channels=module.out_channels,
            kernel_size=tuple(module.kernel_size),
            stride=tuple(module.stride),
            padding=padding_arg,
            dilation=tuple(module.dilation),
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            transposed=bool(module.transposed),
            output_padding=tuple(module.output_padding),
        )

    @classmethod
    def from_kwargs(
        cls,
        ndim: int,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        padding: Union[str, IntOrTuple, Sequence[Tuple[int, int]]] = 0,
        dilation: IntOrTuple = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        transposed: bool = False,
        output_padding: IntOrTuple = 0,
    ) -> ConvSpec:
        """Build a spec from PyTorch-style keyword arguments.

        ``padding`` accepts an int, a tuple of ints (symmetric per dimension),
        a tuple of ``(left, right)`` pairs, ``'valid'`` or ``'same'``. The
        ``'same'`` split follows PyTorch: total ``D·(K−1)``, left ``total // 2``.

        Raises:
            ValueError: For combinations PyTorch rejects (``'same'`` with a
                stride other than 1, string padding on transposed layers, ...).
        """
        kernel = _as_tuple(kernel_size, ndim, "kernel_size")
        stride_t = _as_tuple(stride, ndim, "stride")
        dilation_t = _as_tuple(dilation, ndim, "dilation")
        out_pad = _as_tuple(output_padding, ndim, "output_padding")
        pairs = _padding_pairs(padding, kernel, stride_t, dilation_t, transposed)
        return cls(
            ndim=ndim,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernel,
            stride=stride_t,
            padding=pairs,
            dilation=dilation_t,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            transposed=transposed,
            output_padding=out_pad,
        )

    # -------------------------------------------------------------- geometry
    def weight_shape(self) -> Tuple[int, ...]:
        """Shape of the layer's weight, as PyTorch stores it."""
        if self.transposed:
            return (
                self.in_channels,
                self.out_channels // self.groups,
                *self.kernel_size,
            )
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def output_size(
        self,
        input_size: Sequence[int],
        output_padding: Optional[Sequence[int]] = None,
        allow_empty: bool = False,
    ) -> Tuple[int, ...]:
        """Spatial output size for a spatial input size.

        Args:
            input_size: Spatial input size (``ndim`` entries).
            output_padding: Overrides the spec's output padding (transposed
                layers called with ``output_size=...``).
            allow_empty: Return sizes below one instead of raising (the
                smallest output of a transposed layer can be empty, and only
                its output padding gives it positions).

        Raises:
            ValueError: If the input is too small for the kernel.
        """
        if len(input_size) != self.ndim:
            raise ValueError(
                f"{self.describe()}: expected {self.ndim} spatial sizes of the input, "
                f"got {tuple(input_size)}"
            )
        extra = self.output_padding if output_padding is None else output_padding
        sizes = []
        for d, size in enumerate(input_size):
            k, s, dil = self.kernel_size[d], self.stride[d], self.dilation[d]
            left, right = self.padding[d]
            if self.transposed:
                out = (size - 1) * s - left - right + dil * (k - 1) + extra[d] + 1
            else:
                out = (size + left + right - dil * (k - 1) - 1) // s + 1
            if out < 1 and not allow_empty:
                raise ValueError(
                    f"{self.describe()}: spatial input size {tuple(input_size)} "
                    "is too small for "
                    f"kernel_size={self.kernel_size}, dilation={self.dilation}, "
                    f"padding={self.padding}"
                )
            sizes.append(out)
        return tuple(sizes)

    def describe(self) -> str:
        """Short human-readable name, used in error messages."""
        kind = "ConvTranspose" if self.transposed else "Conv"
        return (
            f"{kind}{self.ndim}d({self.in_channels}, {self.out_channels}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"padding_mode={self.padding_mode!r})"
        )


def _padding_pairs(
    padding: Union[str, IntOrTuple, Sequence[Tuple[int, int]]],
    kernel: Tuple[int, ...],
    stride: Tuple[int, ...],
    dilation: Tuple[int, ...],
    transposed: bool,
) -> Tuple[Tuple[int, int], ...]:
    """Turn any PyTorch padding argument into ``(left, right)`` pairs."""
    ndim = len(kernel)
    if isinstance(padding, str):
        if transposed:
            raise ValueError(
                f"padding={padding!r} is not supported by ConvTranspose (PyTorch "
                "accepts only ints there)"
            )
        if padding == "valid":
            return ((0, 0),) * ndim
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(
                    f"padding='same' requires stride 1 (as in PyTorch), got {stride}"
                )
            pairs = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                pairs.append((total // 2, total - total // 2))
            return tuple(pairs)
        raise ValueError(f"padding must be 'same', 'valid', int or tuple: {padding!r}")
    if isinstance(padding, int) and not isinstance(padding, bool):
        return ((padding, padding),) * ndim
    entries = tuple(padding)
    if len(entries) == ndim and all(
        isinstance(e, (tuple, list)) and len(e) == 2 for e in entries
    ):
        return tuple((int(a), int(b)) for a, b in entries)
    symmetric = _as_tuple(entries, ndim, "padding")
    return tuple((p, p) for p in symmetric)
