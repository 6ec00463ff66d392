"""Layers built on conv_einsum: factorized convolutions (CP, Tucker-2, TT, TR).

The package uses the engine (:mod:`tnbackpack.tn`) only; tnbackpack's BackPACK
extensions register module extensions for these layers.
"""

from .factorizations import FACTORIZATIONS, Factor
from .factorized_conv import (
    FACTORIZED_CONV_TYPES,
    FactorizedConv1d,
    FactorizedConv2d,
    FactorizedConv3d,
    FactorizedConvNd,
)

__all__ = [
    "FACTORIZATIONS",
    "FACTORIZED_CONV_TYPES",
    "Factor",
    "FactorizedConv1d",
    "FactorizedConv2d",
    "FactorizedConv3d",
    "FactorizedConvNd",
]
