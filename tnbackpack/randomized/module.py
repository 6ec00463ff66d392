"""``SampledConv``: a convolution whose weight gradient is a sampled estimate.

It wraps an ``nn.Conv1d/2d/3d`` and shares its parameters (the same
``Parameter`` objects, under the same names, so optimizers and state dicts
see no difference). Forward outputs, input gradients and bias gradients are
exact; the weight gradient is the unbiased estimate from kept slices.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from ..tn.spec import ConvSpec
from .function import SampledConvolution
from .sampling import check_generator, check_keep, check_sample, draw

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_convolution(conv: nn.Module) -> None:
    if not isinstance(conv, _CONVOLUTIONS) or getattr(conv, "transposed", False):
        raise ValueError(
            "SampledConv wraps nn.Conv1d, nn.Conv2d or nn.Conv3d, "
            f"got {type(conv).__name__}"
        )


class SampledConv(nn.Module):
    """A convolution with a sampled, unbiased weight gradient (TN dropout).

    Args:
        conv: The ``nn.Conv1d/2d/3d`` to wrap (any stride, padding including
            ``'same'``, dilation, groups, ``padding_mode``, bias). Its
            parameters are shared, not copied.
        keep: Probability that a slice is kept, in ``(0, 1]``; about this
            fraction of the input is stored for backward. ``1`` is the
            ordinary layer (exact gradient, whole input stored).
        sample: ``"spatial"`` keeps each input position of each spatial axis
            with probability ``keep ** (1 / ndim)``; ``"channels"`` keeps
            input channels (the same ones in every group); ``"batch"`` keeps
            samples.
        generator: Random generator for the slices (``None``: PyTorch's
            global one). The same generator state gives the same gradient.

    Attributes:
        conv: The wrapped layer (not a child module: the parameters are this
            module's own, under the layer's names).
        enabled: Sampling is on; :func:`exact_gradients` switches it off.

    Raises:
        ValueError: If ``conv`` is not a convolution, ``keep`` is not in
            ``(0, 1]`` or ``sample`` is unknown.
    """

    def __init__(
        self,
        conv: nn.Module,
        keep: float = 0.5,
        sample: str = "spatial",
        generator: Optional[torch.Generator] = None,
    ):
        _check_convolution(conv)
        keep, sample = check_keep(keep), check_sample(sample)
        check_generator(generator)
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        # not a child module: its parameters are registered above
        object.__setattr__(self, "conv", conv)
        self.spec = ConvSpec.from_module(conv)
        self.keep, self.sample, self.generator = keep, sample, generator
        self.enabled = True

    def forward(self, x: Tensor) -> Tensor:
        """The layer's output; the backward pass samples the weight gradient."""
        if (
            not self.enabled
            or self.keep == 1.0
            or not torch.is_grad_enabled()
            or not self.weight.requires_grad
        ):
            return self.conv._conv_forward(x, self.weight, self.bias)
        unbatched = x.ndim == self.spec.ndim + 1
        batch = x.unsqueeze(0) if unbatched else x
        if batch.ndim != self.spec.ndim + 2:
            raise ValueError(
                f"{self.spec.describe()}: expected an input with {self.spec.ndim + 2} "
                f"(or {self.spec.ndim + 1}) axes, got shape {tuple(x.shape)}"
            )
        sample = draw(
            self.spec, batch.shape, self.keep, self.sample, self.generator, x.device
        )
        output = SampledConvolution.apply(
            batch, self.weight, self.bias, self.conv, self.spec, sample
        )
        return output.squeeze(0) if unbatched else output

    def extra_repr(self) -> str:
        """Sampling settings and the wrapped layer."""
        return f"keep={self.keep}, sample={self.sample!r}, conv={self.conv!r}"


def sample_convolutions(
    model: nn.Module,
    keep: float = 0.5,
    sample: str = "spatial",
    generator: Optional[torch.Generator] = None,
    include: Optional[Callable[[str, nn.Module], bool]] = None,
) -> nn.Module:
    """Replace every ``nn.Conv1d/2d/3d`` in ``model`` by :class:`SampledConv`, in place.

    Layers that are already sampled are left alone. Returns ``model`` (or the
    wrapper, if ``model`` itself is a convolution). Arguments as for
    :class:`SampledConv`; all layers share ``generator``. ``include(name,
    layer)``, given the layer's qualified name, selects the layers to sample
    (default: all). A classifier convolution on a small map stores little and
    can be left exact: ``include=lambda name, conv: conv.kernel_size != (1, 1)``.

    Raises:
        ValueError: If ``model`` is not a module, ``keep`` is not in
            ``(0, 1]`` or ``sample`` is unknown.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    keep, sample = check_keep(keep), check_sample(sample)
    check_generator(generator)
    if include is None:

        def include(name: str, layer: nn.Module) -> bool:
            return True

    if isinstance(model, _CONVOLUTIONS):
        if not include("", model):
            return model
        return SampledConv(model, keep, sample, generator)
    for prefix, parent in list(model.named_modules()):
        if isinstance(parent, SampledConv):
            continue
        for name, child in list(parent.named_children()):
            qualified = f"{prefix}.{name}" if prefix else name
            if isinstance(child, _CONVOLUTIONS) and include(qualified, child):
                setattr(parent, name, SampledConv(child, keep, sample, generator))
    return model


def restore_convolutions(model: nn.Module) -> nn.Module:
    """Undo :func:`sample_convolutions`: put the wrapped layers back, in place."""
    if isinstance(model, SampledConv):
        return model.conv
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SampledConv):
                setattr(parent, name, child.conv)
    return model


@contextmanager
def exact_gradients(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every :class:`SampledConv` of ``model`` is exact.

    For evaluation (where nothing is sampled anyway) and for exact training
    steps in between sampled ones. Restores each layer's previous state.
    """
    layers = [m for m in model.modules() if isinstance(m, SampledConv)]
    previous = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, state in zip(layers, previous):
            layer.enabled = state
