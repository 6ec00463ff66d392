"""tnbackpack: BackPACK's convolution extensions as tensor-network contractions.

``from tnbackpack import extend, backpack`` re-exports BackPACK's functions for
convenience. ``tnbackpack.enable()``, ``tnbackpack.disable()`` and
``with tnbackpack.enabled(): ...`` put every BackPACK extension on tnbackpack's
conv rules (see :mod:`tnbackpack.switch`). All are loaded on first access, so
that importing the engine (:mod:`tnbackpack.tn`, which does not depend on
BackPACK) does not import BackPACK.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["backpack", "extend", "enable", "disable", "enabled", "is_enabled"]

_SWITCH = ("enable", "disable", "enabled", "is_enabled")


def __getattr__(name: str) -> Any:
    """Load BackPACK's ``backpack`` and ``extend``, and the switch, lazily (PEP 562)."""
    if name in _SWITCH:
        from . import switch

        return getattr(switch, name)
    if name in __all__:
        import backpack as _backpack_package

        return getattr(_backpack_package, name)
    raise AttributeError(f"module 'tnbackpack' has no attribute {name!r}")
