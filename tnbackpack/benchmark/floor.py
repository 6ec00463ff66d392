"""The floor of a row: its step with the convolutions' parameter work left out.

tnbackpack replaces only the rules that compute a quantity *for a conv
layer's parameters*; everything else in an extended backward stays as it is
by design: autograd's plain backward, BackPACK's rules for the non-conv layers
(Linear, ReLU, pooling, the loss Hessian square roots) and, for second-order
extensions, the backpropagation of those square roots through each conv
layer's input. The floor variant runs exactly that rest: the same extension,
but the conv rules only backpropagate and store nothing on the parameters.

Any implementation of this design costs at least ``max(plain, floor)``, so
``BackPACK ms / max(plain ms, floor ms)`` bounds the speedup a row can reach
even if the conv parameters' quantities cost nothing. The report shows this
bound beside the speedup.
"""

from __future__ import annotations

from typing import Dict

from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.module_extension import ModuleExtension
from torch import nn

from ..extensions.layer import CONV_TYPES

# BackPACK keeps the module -> rule table private and has no getter for it.
_RULES_ATTRIBUTE = "_BackpropExtension__module_extensions"


class BackpropagateOnly(ModuleExtension):
    """A conv rule's backpropagation, without its parameter quantities.

    Args:
        rule: The module extension whose ``backpropagate`` is kept.
    """

    def __init__(self, rule: ModuleExtension) -> None:
        super().__init__(params=None)
        self.rule = rule

    def backpropagate(self, extension, module, g_inp, g_out, bp_quantity):
        """What ``rule`` passes on to the layer's input, for earlier layers."""
        return self.rule.backpropagate(extension, module, g_inp, g_out, bp_quantity)


def without_conv_parameters(extension: BackpropExtension) -> BackpropExtension:
    """``extension`` with every conv rule replaced by :class:`BackpropagateOnly`.

    Changes ``extension`` in place (pass a fresh instance) and returns it.
    """
    rules: Dict[type, ModuleExtension] = getattr(extension, _RULES_ATTRIBUTE)
    for conv_type in CONV_TYPES:
        rule = rules.get(conv_type)
        if rule is not None:
            extension.set_module_extension(
                conv_type, BackpropagateOnly(rule), overwrite=True
            )
    return extension


def has_convolutions(model: nn.Module) -> bool:
    """Whether ``model`` has a layer whose rules tnbackpack replaces."""
    return any(isinstance(module, CONV_TYPES) for module in model.modules())
