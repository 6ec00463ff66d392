"""tnbackpack: BackPACK's convolution extensions as tensor-network contractions.

``from tnbackpack import extend, backpack`` re-exports BackPACK's functions for
convenience. They are loaded on first access, so that importing the engine
(:mod:`tnbackpack.tn`, which does not depend on BackPACK) does not import
BackPACK. ``tnbackpack.conv_einsum`` and ``tnbackpack.conv_einsum_path``
(einsum strings with convolution letters, :mod:`tnbackpack.tn.conv_einsum`)
are loaded on first access too.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["backpack", "conv_einsum", "conv_einsum_path", "extend"]

_CONV_EINSUM = ("conv_einsum", "conv_einsum_path")


def __getattr__(name: str) -> Any:
    """Load BackPACK's ``backpack``/``extend`` and conv_einsum lazily (PEP 562)."""
    if name in _CONV_EINSUM:
        from .tn import conv_einsum as _conv_einsum_package

        return getattr(_conv_einsum_package, name)
    if name in __all__:
        import backpack as _backpack_package

        return getattr(_backpack_package, name)
    raise AttributeError(f"module 'tnbackpack' has no attribute {name!r}")
