"""tnbackpack: BackPACK's convolution extensions as tensor-network contractions."""

from backpack import backpack, extend

__version__ = "0.1.0"

__all__ = ["backpack", "extend"]
