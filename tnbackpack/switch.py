"""One switch that puts every BackPACK extension on tnbackpack's conv rules.

Libraries built on BackPACK (laplace-torch, cockpit, vivit, ...) construct
``backpack.extensions.X()`` in their own code. After :func:`enable` those
instances (created before or after the call, whatever name the class was
imported under) compute ``Conv{1,2,3}d`` and ``ConvTranspose{1,2,3}d``
quantities with tnbackpack's rules, and BackPACK's conv derivatives
(``ConvNDDerivatives``, ``ConvTransposeNDDerivatives``) answer their
transposed-Jacobian products with the engine, so extensions that others built
on those derivatives (vivit's ``ViViTGGN``) get them too::

    import tnbackpack
    tnbackpack.enable()          # or: with tnbackpack.enabled(): ...

Where the switch sits, and why there:

- BackPACK keeps module extensions per *instance*: each extension's
  constructor fills a private dict ``{layer class: module extension}``.
  Rebinding names in ``backpack.extensions`` misses clients that imported the
  class earlier, and patching constructors misses instances that exist
  already. Both are covered by patching the one place every instance asks,
  ``BackpropExtension``'s private lookup (``__get_module_extension``): for a
  conv layer whose stored rule is BackPACK's stock rule (or missing, e.g.
  transposed layers for KFAC), it answers with tnbackpack's rule of the same
  extension. Instances are untouched, so ``type(e)``, ``isinstance`` checks,
  savefields and ``set_module_extension`` keep working.
- A rule that is not BackPACK's stock one (a user's own, set with
  ``set_module_extension`` or in a subclass, or a tnbackpack extension's, with
  its ``kfac_approx``) is kept: the switch replaces only what BackPACK put there.
- BackPACK's ``KFAC``/``KFLR``/``KFRA`` promise 2-d factors; for grouped
  layers they get :class:`StockKroneckerConv`, which raises a clear error
  instead of returning tnbackpack's stacked per-group factors.
- The extension's kind is found along its class's MRO, so a subclass of
  ``backpack.extensions.BatchGrad`` that leaves conv layers alone gets the TN
  rule too; an unknown extension class keeps its rules (but still gets the
  engine's derivatives).
- The derivatives are patched on BackPACK's two N-d base classes, so every
  ``ConvXDDerivatives`` object, existing or new, uses the engine; a subclass
  that overrides a method keeps its own.

:func:`enable` is idempotent, :func:`disable` restores BackPACK's original
functions. The switch is process-global (not thread-local): flip it outside
backward passes.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional, Set, Tuple

from backpack.core.derivatives.conv_transposend import ConvTransposeNDDerivatives
from backpack.core.derivatives.convnd import ConvNDDerivatives
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.module_extension import ModuleExtension
from torch import nn

from . import extensions as tn_extensions
from .extensions.derivatives import ConvDerivatives
from .extensions.kronecker import KroneckerConv
from .extensions.layer import CONV_TYPES

__all__ = ["enable", "disable", "enabled", "is_enabled"]

_LOOKUP = "_BackpropExtension__get_module_extension"
_STORED = "_BackpropExtension__module_extensions"

#: BackPACK's derivative methods that the engine answers (transposed Jacobians).
DERIVATIVE_METHODS = (
    "_jac_t_mat_prod",
    "_weight_jac_t_mat_prod",
    "_bias_jac_t_mat_prod",
    "ea_jac_t_mat_jac_prod",
)
_DERIVATIVE_CLASSES = (ConvNDDerivatives, ConvTransposeNDDerivatives)

#: Saved originals while enabled: (owner, attribute) -> function.
_ORIGINALS: Dict[Tuple[type, str], Callable] = {}


class StockKroneckerConv(KroneckerConv):
    """tnbackpack's Kronecker rule for BackPACK's own ``KFAC``/``KFLR``/``KFRA``.

    BackPACK's classes promise one 2-d factor pair per weight, and clients
    rely on it (laplace-torch's ``Kron`` multiplies and decomposes them as
    matrices). With ``groups > 1`` tnbackpack's factors are one pair per group,
    stacked ``[G, d, d]``: no 2-d pair represents them (``Σ_g B_g ⊗ A_g`` is
    no Kronecker product), so this rule refuses, naming the layer, instead of
    handing a client tensors it would misread. tnbackpack's own
    ``tnbackpack.extensions.KFAC`` etc. return the stacked factors.
    """

    def weight(self, ext, module, g_inp, g_out, backproped):
        """``[B, A]`` as BackPACK's 2-d matrices; refuses ``groups > 1``."""
        if module.groups > 1:
            raise NotImplementedError(
                f"{module}: groups={module.groups}. BackPACK's "
                f"{type(ext).__name__} returns one 2-d Kronecker factor pair per "
                "weight, which clients written for it (e.g. laplace-torch's Kron) "
                "consume as matrices; a grouped layer has one pair per group "
                f"(stacked [{module.groups}, d, d]), which no 2-d pair represents. "
                "Use tnbackpack.extensions."
                f"{type(ext).__name__} for the stacked factors, or a "
                "diagonal Hessian structure."
            )
        return super().weight(ext, module, g_inp, g_out, backproped)


class _Rules:
    """tnbackpack's conv rule per BackPACK extension class, and BackPACK's stock rules.

    Read off the extensions themselves (a tnbackpack extension's conv rule, a
    BackPACK extension's), so there is no second list to keep in sync.
    """

    def __init__(self) -> None:
        self.by_extension: Dict[type, ModuleExtension] = {}
        self.stock_types: Set[type] = set()
        for name in tn_extensions.__all__:
            tn_class = getattr(tn_extensions, name)
            backpack_class = tn_class.__bases__[0]
            rule = getattr(tn_class(), _STORED)[nn.Conv2d]
            if isinstance(rule, KroneckerConv):
                rule = StockKroneckerConv()
            self.by_extension[backpack_class] = rule
            stock = getattr(backpack_class(), _STORED)
            self.stock_types.update(type(stock[c]) for c in CONV_TYPES if c in stock)

    def rule_for(self, extension: BackpropExtension) -> Optional[ModuleExtension]:
        for cls in type(extension).__mro__:
            rule = self.by_extension.get(cls)
            if rule is not None:
                return rule
        return None


_RULES: Optional[_Rules] = None


def _conv_rule(
    extension: BackpropExtension, module: nn.Module
) -> Optional[ModuleExtension]:
    """The TN rule where BackPACK's stock rule (or none) is stored, else ``None``."""
    if type(module) not in CONV_TYPES or _RULES is None:
        return None
    stored = getattr(extension, _STORED, {}).get(type(module))
    if stored is not None and type(stored) not in _RULES.stock_types:
        return None  # someone's own rule wins
    return _RULES.rule_for(extension)


def _engine_method(name: str) -> Callable:
    engine = ConvDerivatives()
    method = getattr(engine, name)

    def answered_by_engine(self, *args, **kwargs):
        return method(*args, **kwargs)

    answered_by_engine.__name__ = name
    answered_by_engine.__doc__ = f"tnbackpack's {name} (see tnbackpack.switch)."
    return answered_by_engine


def is_enabled() -> bool:
    """Whether :func:`enable` is in force."""
    return bool(_ORIGINALS)


def enable() -> None:
    """Make every BackPACK extension use tnbackpack's conv rules (idempotent)."""
    global _RULES
    if is_enabled():
        return
    if _RULES is None:
        _RULES = _Rules()
    original_lookup = getattr(BackpropExtension, _LOOKUP)

    def lookup(self: BackpropExtension, module: nn.Module):
        rule = _conv_rule(self, module)
        return rule if rule is not None else original_lookup(self, module)

    lookup.__doc__ = "BackPACK's lookup, conv layers on tnbackpack's rules."
    _ORIGINALS[(BackpropExtension, _LOOKUP)] = original_lookup
    setattr(BackpropExtension, _LOOKUP, lookup)
    for owner in _DERIVATIVE_CLASSES:
        for name in DERIVATIVE_METHODS:
            _ORIGINALS[(owner, name)] = owner.__dict__[name]
            setattr(owner, name, _engine_method(name))


def disable() -> None:
    """Restore BackPACK's own conv rules and derivatives (idempotent)."""
    for (owner, name), original in _ORIGINALS.items():
        setattr(owner, name, original)
    _ORIGINALS.clear()


@contextmanager
def enabled() -> Iterator[None]:
    """``with tnbackpack.enabled(): ...``: enabled inside, the previous state after."""
    was_enabled = is_enabled()
    enable()
    try:
        yield
    finally:
        if not was_enabled:
            disable()
