"""The tensor-network convolution engine (knows torch and opt_einsum, not BackPACK).

Quantities are computed by :mod:`.functional` from a :class:`ConvSpec`::

    from tnbackpack.tn import ConvSpec, functional as F
    spec = ConvSpec.from_module(conv)
    y = F.forward(spec, x, conv.weight, conv.bias)
"""

from . import expressions, functional
from .network import TensorNetwork
from .spec import ConvSpec

__all__ = ["ConvSpec", "TensorNetwork", "expressions", "functional"]
