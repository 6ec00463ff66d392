"""First-order BackPACK extensions whose convolution rules are tensor networks.

Each extension is a drop-in subclass of BackPACK's: same constructor, savefield,
shapes and scaling. Its ``__init__`` replaces BackPACK's module extensions for
``Conv{1,2,3}d`` and ``ConvTranspose{1,2,3}d`` by one N-d-generic module
extension that asks the engine (:mod:`tnbackpack.tn.functional`); every other
layer keeps BackPACK's rule, so the extensions combine freely with each other
and with BackPACK's own extensions in one ``with backpack(...)``.

``g_out[0]`` is the gradient of the (reduced) loss w.r.t. the layer output, so
it already carries the loss's ``1/N`` for a mean reduction: per-sample results
are those of the reduced loss, as in BackPACK. For a transposed layer the
engine reads the output size off ``g_out[0]``, whose shape is the stored
output's (right even when the layer was called with ``output_size=``).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from backpack import extensions as backpack_extensions
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.firstorder.base import FirstOrderModuleExtension
from torch import Tensor, nn

from ..tn import functional
from ..tn.spec import ConvSpec
from .factorized import FirstOrderRule, use_for_factorized
from .layer import CONV_TYPES, conv_spec, layer_input, subsample

__all__ = [
    "BatchGrad",
    "BatchGradConv",
    "BatchL2Grad",
    "BatchL2GradConv",
    "SumGradSquared",
    "SumGradSquaredConv",
    "Variance",
    "VarianceConv",
]


Grads = Tuple[Optional[Tensor], ...]


class _ConvModuleExtension(FirstOrderModuleExtension):
    """One first-order quantity for every conv type, computed by the engine.

    BackPACK calls :meth:`weight` and :meth:`bias` with its usual arguments
    (and skips a parameter that is ``None`` or frozen, so a frozen weight gets
    no savefield while the bias still does). They hand the engine spec, the
    stored input and the output gradient, restricted to BackPACK's
    ``subsampling`` (``None`` for every extension but ``BatchGrad``), to
    :meth:`weight_quantity` and :meth:`bias_quantity`, which subclasses define.
    """

    def __init__(self) -> None:
        super().__init__(params=["weight", "bias"])

    def weight(
        self,
        ext: BackpropExtension,
        module: nn.Module,
        g_inp: Grads,
        g_out: Grads,
        backproped: None,
    ) -> Tensor:
        """The quantity for ``module.weight`` (BackPACK's parameter hook)."""
        samples = ext.get_subsampling()
        return self.weight_quantity(
            conv_spec(module),
            layer_input(module, samples),
            subsample(g_out[0], samples),
        )

    def bias(
        self,
        ext: BackpropExtension,
        module: nn.Module,
        g_inp: Grads,
        g_out: Grads,
        backproped: None,
    ) -> Tensor:
        """The quantity for ``module.bias`` (BackPACK's parameter hook)."""
        grad_output = subsample(g_out[0], ext.get_subsampling())
        per_sample = functional.bias_vjp(
            conv_spec(module), grad_output, per_sample=True
        )
        return self.bias_quantity(per_sample)

    def weight_quantity(self, spec: ConvSpec, x: Tensor, grad_output: Tensor) -> Tensor:
        """The weight's quantity from input ``[N, C_in, *I]`` and ``[N, C_out, *O]``."""
        raise NotImplementedError

    def bias_quantity(self, per_sample: Tensor) -> Tensor:
        """The bias's quantity from the per-sample bias gradients ``[N, C_out]``."""
        raise NotImplementedError

    def per_sample_quantity(self, per_sample: Tensor) -> Tensor:
        """A parameter's quantity from its per-sample gradients ``[N, *param]``.

        Factorized layers get their factors' per-sample gradients from the
        layer's backward (:mod:`.factorized`).
        """
        raise NotImplementedError


class BatchGradConv(_ConvModuleExtension):
    """Per-sample gradients ``[N, *param]`` (``grad_batch``)."""

    #: The weight quantity is the per-sample weight VJP itself (the factorized
    #: rule then picks the route per stage).
    per_sample_gradients = True

    def weight_quantity(self, spec: ConvSpec, x: Tensor, grad_output: Tensor) -> Tensor:
        """``[N, *weight]``."""
        return functional.per_sample_weight_vjp(spec, x, grad_output)

    def bias_quantity(self, per_sample: Tensor) -> Tensor:
        """``[N, C_out]``."""
        return per_sample

    def per_sample_quantity(self, per_sample: Tensor) -> Tensor:
        """``[N, *param]``."""
        return per_sample


class BatchL2GradConv(_ConvModuleExtension):
    """Squared norms of the per-sample gradients ``[N]`` (``batch_l2``)."""

    def weight_quantity(self, spec: ConvSpec, x: Tensor, grad_output: Tensor) -> Tensor:
        """``[N]``, without building the ``[N, *weight]`` gradients if cheaper."""
        return functional.weight_vjp_squares(
            spec, x, grad_output, per_sample=True, sum_weight=True
        )

    def bias_quantity(self, per_sample: Tensor) -> Tensor:
        """``[N]``."""
        return per_sample.square().sum(1)

    def per_sample_quantity(self, per_sample: Tensor) -> Tensor:
        """``[N]``."""
        return per_sample.flatten(1).square().sum(1)


class SumGradSquaredConv(_ConvModuleExtension):
    """Sum over samples of the squared per-sample gradients (``sum_grad_squared``)."""

    def weight_quantity(self, spec: ConvSpec, x: Tensor, grad_output: Tensor) -> Tensor:
        """Weight-shaped, without building the ``[N, *weight]`` gradients if cheaper."""
        return functional.weight_vjp_squares(spec, x, grad_output)

    def bias_quantity(self, per_sample: Tensor) -> Tensor:
        """``[C_out]``."""
        return per_sample.square().sum(0)

    def per_sample_quantity(self, per_sample: Tensor) -> Tensor:
        """Param-shaped."""
        return per_sample.square().sum(0)


def _variance(grad: Tensor, sum_grad_squared: Tensor, batch_size: int) -> Tensor:
    """``sgs/N − (grad/N)²``: BackPACK's operations in BackPACK's order (same rounding).

    ``N`` is the batch size of the layer output, as in BackPACK.
    """
    return sum_grad_squared / batch_size - (grad / batch_size) ** 2


class VarianceConv(_ConvModuleExtension):
    """Variance of the per-sample gradients (``variance``), param-shaped."""

    def weight_quantity(self, spec: ConvSpec, x: Tensor, grad_output: Tensor) -> Tensor:
        """From the batch gradient and the sum of squared per-sample gradients."""
        grad = functional.weight_vjp(spec, x, grad_output)
        squares = functional.weight_vjp_squares(spec, x, grad_output)
        return _variance(grad, squares, x.shape[0])

    def bias_quantity(self, per_sample: Tensor) -> Tensor:
        """``[C_out]``."""
        return self.per_sample_quantity(per_sample)

    def per_sample_quantity(self, per_sample: Tensor) -> Tensor:
        """Param-shaped."""
        return _variance(
            per_sample.sum(0), per_sample.square().sum(0), per_sample.shape[0]
        )


def _use_for_convolutions(
    extension: BackpropExtension, module_extension: _ConvModuleExtension
) -> None:
    """Route every conv type of ``extension`` to ``module_extension``.

    Factorized convolutions apply the same rule to each of their stages.
    """
    for conv_type in CONV_TYPES:
        extension.set_module_extension(conv_type, module_extension, overwrite=True)
    use_for_factorized(extension, FirstOrderRule(module_extension))


class BatchGrad(backpack_extensions.BatchGrad):
    """BackPACK's :class:`~backpack.extensions.BatchGrad`, convolutions by TN."""

    def __init__(self, subsampling: Optional[List[int]] = None) -> None:
        """Initialization.

        Args:
            subsampling: Indices of the samples whose gradients are computed
                (``None``: all), as in BackPACK.
        """
        super().__init__(subsampling=subsampling)
        _use_for_convolutions(self, BatchGradConv())


class BatchL2Grad(backpack_extensions.BatchL2Grad):
    """BackPACK's :class:`~backpack.extensions.BatchL2Grad`, convolutions by TN."""

    def __init__(self) -> None:
        super().__init__()
        _use_for_convolutions(self, BatchL2GradConv())


class SumGradSquared(backpack_extensions.SumGradSquared):
    """BackPACK's :class:`~backpack.extensions.SumGradSquared`, convolutions by TN."""

    def __init__(self) -> None:
        super().__init__()
        _use_for_convolutions(self, SumGradSquaredConv())


class Variance(backpack_extensions.Variance):
    """BackPACK's :class:`~backpack.extensions.Variance`, convolutions by TN."""

    def __init__(self) -> None:
        super().__init__()
        _use_for_convolutions(self, VarianceConv())
