"""What every tnbackpack module extension needs to know about a conv layer.

BackPACK stores the layer's input as ``module.input0`` and its output as
``module.output`` during the forward pass; these helpers turn a module into an
engine spec (built once and kept on the module) and read the stored tensors.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from torch import Tensor, nn

from ..tn.spec import ConvSpec

#: The layer types whose BackPACK module extensions tnbackpack replaces.
CONV_TYPES: Tuple[type, ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

_SPEC_ATTRIBUTE = "_tnbackpack_spec"


def conv_spec(module: nn.Module) -> ConvSpec:
    """The engine spec of ``module``, cached on the module.

    The cache key includes the hyper-parameters, so changing one of them on a
    live module (rare, but legal) rebuilds the spec instead of reusing a stale
    one.
    """
    key = (
        module.kernel_size,
        module.stride,
        module.padding,
        module.dilation,
        module.groups,
        module.padding_mode,
        module.output_padding,
        module.bias is not None,
    )
    cached = getattr(module, _SPEC_ATTRIBUTE, None)
    if cached is None or cached[0] != key:
        cached = (key, ConvSpec.from_module(module))
        setattr(module, _SPEC_ATTRIBUTE, cached)
    return cached[1]


def subsample(tensor: Tensor, subsampling: Optional[List[int]], dim: int = 0) -> Tensor:
    """Select the samples BackPACK's ``subsampling`` argument asks for."""
    if subsampling is None:
        return tensor
    index = (slice(None),) * dim + (list(subsampling),)
    return tensor[index]


def layer_input(module: nn.Module, subsampling: Optional[List[int]] = None) -> Tensor:
    """The layer input stored by BackPACK, optionally sub-sampled.

    Not detached: with ``create_graph=True`` the quantities stay
    differentiable through the input, as BackPACK's are; without it the
    backward pass records nothing anyway.
    """
    return subsample(module.input0, subsampling)


def output_size(module: nn.Module) -> Tuple[int, ...]:
    """Spatial size of the layer's stored output.

    A transposed layer may have been called with ``output_size=``, so the
    stored output, not the spec, is the authority.
    """
    return tuple(module.output.shape[2:])
