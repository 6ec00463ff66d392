"""tnbackpack: BackPACK's convolution extensions as tensor-network contractions."""

__version__ = "0.1.0"
