"""BackPACK module extensions for the factorized convolutions of :mod:`tnbackpack.nn`.

A factorized layer is a sequence of stage convolutions, and each factor is the
weight of exactly one stage (:mod:`tnbackpack.nn.factorizations`). So every
per-factor quantity is that stage's weight quantity, computed by the same
functions as for an ordinary convolution, and the bias's is that of the last
stage. One backward hook walks the stages in reverse:

1. recompute each stage's input from the stored layer input (recorded by
   autograd only under ``backward(create_graph=True)``);
2. take what arrives at the layer output: the output gradient (first-order
   extensions), BackPACK's square roots of the GGN or Hessian, or KFRA's
   batch-averaged ``Ḡ``;
3. per stage, store the factor's quantity under the extension's savefield,
   reshaped like the factor (Kronecker factors stay ``[B, A]`` of the stage),
   then pull the quantity back to the stage input with the engine's input VJP
   (``Jᵀ Ḡ J`` for KFRA);
4. hand what reaches the layer input to the previous layer.

Kronecker factors of a factor are those of its stage conv: for a CP kernel
factor (a depthwise stage) they are stacked per channel, for a TR kernel core
the ring bond is one more spatial axis of its stage.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Protocol, Tuple

from backpack.context import CTX
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.module_extension import ModuleExtension
from torch import Tensor

from ..nn import factorized_conv
from ..nn.factorizations import Factor
from ..nn.factorized_conv import FACTORIZED_CONV_TYPES, FactorizedConvNd
from ..nn.stages import (
    flat_view,
    is_pointwise,
    output_view,
    pointwise_input_vjp,
    stage_inputs,
    stage_weight,
)
from ..tn import functional, torch_routes
from ..tn.graph import records_graph
from ..tn.spec import ConvSpec
from . import factorized_dense
from .derivatives import ea_jac_t_mat_jac
from .diagonal import bias_diagonal, signed_sum, weight_diagonal
from .kronecker import bias_factors, is_kfra, kfac_approx_of, weight_factors
from .layer import subsample

Grads = Tuple[Optional[Tensor], ...]

#: BackPACK's private store of an extension's module extensions.
_STORED = "_BackpropExtension__module_extensions"


class ConvQuantity(Protocol):
    """A first-order conv rule (:mod:`.first_order`'s module extensions)."""

    def weight_quantity(self, spec: ConvSpec, x: Tensor, grad_output: Tensor) -> Tensor:
        """The weight's quantity."""

    def bias_quantity(self, per_sample: Tensor) -> Tensor:
        """The bias's quantity from per-sample bias gradients."""


class Stage:
    """One stage during the backward walk: its factor, spec, weight and input."""

    def __init__(self, factor: Factor, weight: Tensor, x: Tensor) -> None:
        self.factor = factor
        self.spec: ConvSpec = factor.stage
        self.weight = weight
        self.x = x

    def output_size(self, carried: Tensor) -> Tuple[int, ...]:
        """Spatial output size, read off an output-shaped tensor."""
        return tuple(carried.shape[carried.ndim - self.spec.ndim :])

    def per_sample_weight_vjp(self, carried: Tensor, vectors: bool) -> Tensor:
        """Per-sample weight VJPs ``[(V,) N, *weight]`` of the stage.

        A depthwise stage (a CP kernel factor: one channel per group) takes
        PyTorch's grouped weight gradient, the cheapest route there; the
        engine's ``auto`` measures its candidates once, and under load that
        one timed run picked a route 2-3x slower (11 vs 3.8 ms, CP rank 64,
        64 channels, 32², N=32).
        """
        spec = self.spec
        depthwise = spec.groups == spec.in_channels == spec.out_channels
        grouped = depthwise and not spec.transposed and torch_routes.supports(spec)
        return functional.per_sample_weight_vjp(
            spec, self.x, carried, vectors, route="grouped" if grouped else "auto"
        )

    def pull_back(self, carried: Tensor, vectors: bool) -> Tensor:
        """Input VJP of ``carried [(V,) N, C_out, *O]`` (stage layout).

        1×1 stride-1 stages are a plain matrix product (see ``is_pointwise``);
        the others take the engine's ``auto`` route, which uses PyTorch's
        kernel for overlapping kernels and measures the windowed ones.
        """
        if is_pointwise(self.spec):
            return pointwise_input_vjp(self.spec, carried, self.weight)
        return functional.input_vjp(
            self.spec, carried, self.weight, self.x.shape[2:], vectors, route="auto"
        )


class StageRule:
    """What one extension computes per stage and carries between stages."""

    #: Whether results keep the factor's layout (reshaped from the stage weight).
    factor_shaped = True
    #: Leading axes of the carried tensors before the batch axis.
    lead = 1

    def weight(self, ext: BackpropExtension, stage: Stage, carried: Any) -> Any:
        """The factor's quantity, in the stage weight's layout."""
        raise NotImplementedError

    def bias(self, ext: BackpropExtension, stage: Stage, carried: Any) -> Any:
        """The bias's quantity (last stage)."""
        raise NotImplementedError

    def pull_back(self, stage: Stage, carried: Any) -> Any:
        """``carried`` at the stage input, given it at the stage output."""
        return stage.pull_back(carried, vectors=True)

    def view(self, carried: Any, layer_ndim: int) -> Any:
        """``carried`` at a stage input, viewed as the previous stage output."""
        return flat_view(carried, layer_ndim, self.lead)

    def to_stage(self, factor: Factor, carried: Any) -> Any:
        """View ``carried`` at a stage output in that stage's layout."""
        return output_view(factor, carried, self.lead)


class FirstOrderRule(StageRule):
    """BatchGrad, BatchL2Grad, SumGradSquared, Variance: carry the gradient."""

    lead = 0

    def __init__(self, conv_rule: ConvQuantity) -> None:
        self.conv_rule = conv_rule

    def weight(self, ext: BackpropExtension, stage: Stage, carried: Tensor) -> Tensor:
        """The conv rule's weight quantity (BatchGrad's by the stage's route)."""
        if getattr(self.conv_rule, "per_sample_gradients", False):
            return stage.per_sample_weight_vjp(carried, vectors=False)
        return self.conv_rule.weight_quantity(stage.spec, stage.x, carried)

    def bias(self, ext: BackpropExtension, stage: Stage, carried: Tensor) -> Tensor:
        """The conv rule's bias quantity."""
        per_sample = functional.bias_vjp(stage.spec, carried, per_sample=True)
        return self.conv_rule.bias_quantity(per_sample)

    def pull_back(self, stage: Stage, carried: Tensor) -> Tensor:
        """The gradient at the stage input."""
        return stage.pull_back(carried, vectors=False)


class DiagonalRule(StageRule):
    """(Batch)DiagGGN{Exact,MC}: carry the GGN square root ``[V, N, …]``."""

    def __init__(self, per_sample: bool) -> None:
        self.per_sample = per_sample

    def weight(self, ext: BackpropExtension, stage: Stage, carried: Tensor) -> Tensor:
        """``Σ_v (J_wᵀ s_v)²``."""
        return weight_diagonal(stage.spec, stage.x, carried, self.per_sample)

    def bias(self, ext: BackpropExtension, stage: Stage, carried: Tensor) -> Tensor:
        """``Σ_v (Σ_t s_v)²``."""
        return bias_diagonal(stage.spec, carried, self.per_sample)


class HessianDiagonalRule(StageRule):
    """(Batch)DiagHessian: carry BackPACK's signed Hessian square roots."""

    def __init__(self, per_sample: bool) -> None:
        self.per_sample = per_sample

    def weight(self, ext: BackpropExtension, stage: Stage, carried: Dict) -> Tensor:
        """Signed sum of the square roots' weight diagonals."""
        return signed_sum(
            carried,
            lambda sqrt: weight_diagonal(stage.spec, stage.x, sqrt, self.per_sample),
        )

    def bias(self, ext: BackpropExtension, stage: Stage, carried: Dict) -> Tensor:
        """Signed sum of the square roots' bias diagonals."""
        return signed_sum(
            carried, lambda sqrt: bias_diagonal(stage.spec, sqrt, self.per_sample)
        )

    def pull_back(self, stage: Stage, carried: Dict) -> Dict:
        """Every square root through the stage; a convolution adds no residual."""
        matrices = [stage.pull_back(m, vectors=True) for m in carried["matrices"]]
        return {"matrices": matrices, "signs": list(carried["signs"])}

    def view(self, carried: Dict, layer_ndim: int) -> Dict:
        """Re-view every square root."""
        matrices = [flat_view(m, layer_ndim, self.lead) for m in carried["matrices"]]
        return {"matrices": matrices, "signs": carried["signs"]}

    def to_stage(self, factor: Factor, carried: Dict) -> Dict:
        """View every square root in the stage's layout."""
        matrices = [output_view(factor, m, self.lead) for m in carried["matrices"]]
        return {"matrices": matrices, "signs": carried["signs"]}


class SqrtGGNRule(StageRule):
    """SqrtGGN{Exact,MC}: ``J_pᵀ S`` per sample, ``[V, N, *factor]``."""

    def weight(self, ext: BackpropExtension, stage: Stage, carried: Tensor) -> Tensor:
        """Per-sample weight VJPs of the square root's columns."""
        return stage.per_sample_weight_vjp(carried, vectors=True)

    def bias(self, ext: BackpropExtension, stage: Stage, carried: Tensor) -> Tensor:
        """Per-sample bias VJPs of the columns."""
        return functional.bias_vjp(stage.spec, carried, vectors=True, per_sample=True)


class KroneckerRule(StageRule):
    """KFAC, KFLR, KFRA: the Kronecker factors of each stage conv."""

    factor_shaped = False

    def weight(
        self, ext: BackpropExtension, stage: Stage, carried: Tensor
    ) -> List[Tensor]:
        """``[B, A]`` of the stage (stacked per group for grouped stages)."""
        if is_kfra(ext):
            out_size = stage.spec.output_size(stage.x.shape[2:])
        else:
            out_size = stage.output_size(carried)
        return weight_factors(
            stage.spec, stage.x, out_size, carried, kfac_approx_of(ext), is_kfra(ext)
        )

    def bias(
        self, ext: BackpropExtension, stage: Stage, carried: Tensor
    ) -> List[Tensor]:
        """``[B]`` of the last stage."""
        return bias_factors(stage.spec, carried, is_kfra(ext))

    # KFRA carries a matrix [D, D] over (channel, position) of one sample,
    # whose layout is the same for every view of the activation.
    def _is_matrix(self, carried: Tensor) -> bool:
        return carried.ndim == 2

    def pull_back(self, stage: Stage, carried: Tensor) -> Tensor:
        """Square roots through ``Jᵀ``, KFRA's ``Ḡ`` to ``Jᵀ Ḡ J``."""
        if not self._is_matrix(carried):
            return super().pull_back(stage, carried)
        out_shape = (
            stage.spec.out_channels,
            *stage.spec.output_size(stage.x.shape[2:]),
        )
        return ea_jac_t_mat_jac(
            stage.spec, stage.weight, tuple(stage.x.shape[1:]), out_shape, carried
        )

    def view(self, carried: Tensor, layer_ndim: int) -> Tensor:
        """Re-view a square root (a matrix needs none)."""
        return (
            carried if self._is_matrix(carried) else super().view(carried, layer_ndim)
        )

    def to_stage(self, factor: Factor, carried: Tensor) -> Tensor:
        """View a square root in the stage's layout (a matrix needs none)."""
        return (
            carried if self._is_matrix(carried) else super().to_stage(factor, carried)
        )


def _factor_shaped(quantity: Tensor, factor: Factor) -> Tensor:
    """A stage-weight-shaped quantity ``[*lead, *weight]`` in the factor's shape."""
    weight_ndim = len(factor.stage.weight_shape())
    if quantity.ndim < weight_ndim:  # e.g. BatchL2Grad's [N]
        return quantity
    return quantity.reshape(
        *quantity.shape[: quantity.ndim - weight_ndim], *factor.shape
    )


class FactorizedConvExtension(ModuleExtension):
    """One extension's rule for ``FactorizedConv{1,2,3}d`` (see the module docstring).

    BackPACK's base class handles a fixed list of parameters, each computed on
    its own; here the factors depend on the layer's factorization and share
    one walk through the stages, so :meth:`__call__` does what the base class
    does (fetch the quantity backpropagated to the output, store savefields,
    save the quantity for the input) around that walk.
    """

    def __init__(self, rule: StageRule) -> None:
        super().__init__(params=[])
        self.rule = rule

    def __call__(
        self,
        ext: BackpropExtension,
        module: FactorizedConvNd,
        g_inp: Grads,
        g_out: Grads,
    ) -> None:
        """Compute every factor's and the bias's quantity; backpropagate."""
        output = module.output
        keep = output.grad_fn is None or getattr(output, "retains_grad", False)
        backproped = ext.saved_quantities.retrieve_quantity(output.data_ptr(), not keep)
        expects = ext.expects_backpropagation_quantities()
        if expects and backproped is None:
            raise AssertionError(
                f"{type(module).__name__}: BackPACK extension {ext} expected a "
                "backpropagated quantity, but none arrived at the layer output"
            )
        carried = backproped if expects else subsample(g_out[0], ext.get_subsampling())
        if not expects and self._from_backward(ext, module, carried, g_out):
            return
        to_input = expects and module.input0.requires_grad
        carried = self._walk(ext, module, carried, to_input)
        if to_input:
            ext.saved_quantities.save_quantity(
                module.input0.data_ptr(),
                carried,
                ext.accumulate_backpropagated_quantities,
            )

    def _walk(
        self,
        ext: BackpropExtension,
        module: FactorizedConvNd,
        carried: Any,
        to_input: bool,
    ) -> Any:
        plan = module.factor_plan()
        tensors = module.factor_tensors()
        x = subsample(module.input0, ext.get_subsampling())
        # create_graph=True: quantities stay differentiable w.r.t. the factors
        # and the input (as for ordinary convs); otherwise detached operands
        # let the engine take its out=/in-place fast paths.
        if not records_graph(x, *tensors):
            tensors = [t.detach() for t in tensors]
            x = x.detach()
        if self._dense_route(module, x, carried, to_input):
            self._dense(ext, module, tensors, x, carried)
            return None
        inputs = stage_inputs(plan, tensors, x)
        layer_ndim = module.ndim
        rule = self.rule
        for position in reversed(range(len(plan))):
            factor, tensor = plan[position], tensors[position]
            stage = Stage(factor, stage_weight(factor, tensor), inputs[position])
            carried = rule.to_stage(factor, carried)
            if position == len(plan) - 1 and _trainable(module.bias):
                _save(ext, module.bias, rule.bias(ext, stage, carried))
            param = getattr(module, factor.name)
            if _trainable(param):
                quantity = rule.weight(ext, stage, carried)
                if rule.factor_shaped:
                    quantity = _factor_shaped(quantity, factor)
                _save(ext, param, quantity)
            if position > 0 or to_input:
                carried = rule.view(rule.pull_back(stage, carried), layer_ndim)
        return carried

    def _from_backward(
        self,
        ext: BackpropExtension,
        module: FactorizedConvNd,
        grad_output: Tensor,
        g_out: Grads,
    ) -> bool:
        """Store first-order quantities from the backward's per-sample gradients.

        The layer's backward made them (contractions of the layer's network
        that keep the batch letter, at about the cost of the ordinary
        gradients, see :func:`wants_per_sample_gradients`), or they are made
        here for it when this hook runs first (the layer input needs no
        gradient); ``False`` if neither can be (e.g. under
        ``create_graph=True``): the stage walk runs then.
        """
        if not isinstance(self.rule, FirstOrderRule):
            return False
        # with an input needing no gradient this hook runs before the layer's
        # backward: the per-sample gradients are made here, from the full
        # output gradient (the layer's backward sums all samples)
        ahead = not module.input0.requires_grad
        grads = module.per_sample_factor_gradients(g_out[0] if ahead else None)
        if grads is None:
            return False
        params = [getattr(module, f.name) for f in module.factor_plan()]
        if any(_trainable(p) and g is None for p, g in zip(params, grads)):
            return False
        samples = ext.get_subsampling()
        grads = [None if g is None else subsample(g, samples) for g in grads]
        self._store_per_sample(ext, module, grad_output, grads)
        return True

    def _store_per_sample(
        self,
        ext: BackpropExtension,
        module: FactorizedConvNd,
        grad_output: Tensor,
        grads: List[Optional[Tensor]],
    ) -> None:
        """The first-order quantities of the bias and of factors' ``[N, *factor]``."""
        rule = self.rule
        assert isinstance(rule, FirstOrderRule)
        if _trainable(module.bias):
            spec = module.dense_spec()
            per_sample = functional.bias_vjp(spec, grad_output, per_sample=True)
            _save(ext, module.bias, rule.conv_rule.bias_quantity(per_sample))
        for factor, grad in zip(module.factor_plan(), grads):
            param = getattr(module, factor.name)
            if _trainable(param):
                _save(ext, param, rule.conv_rule.per_sample_quantity(grad))

    def _dense_route(
        self, module: FactorizedConvNd, x: Tensor, carried: Any, to_input: bool
    ) -> bool:
        """Whether BatchGrad takes the dense route (:mod:`.factorized_dense`)."""
        rule = self.rule
        per_sample = isinstance(rule, FirstOrderRule) and getattr(
            rule.conv_rule, "per_sample_gradients", False
        )
        return (
            per_sample
            and not to_input
            and factorized_dense.choose(module, x, carried) == "dense"
        )

    def _dense(
        self,
        ext: BackpropExtension,
        module: FactorizedConvNd,
        tensors: List[Tensor],
        x: Tensor,
        grad_output: Tensor,
    ) -> None:
        """Store per-sample factor and bias gradients, by the dense route."""
        grads = factorized_dense.per_sample_factor_gradients(
            module, tensors, x, grad_output
        )
        self._store_per_sample(ext, module, grad_output, grads)


def _trainable(param: Optional[Tensor]) -> bool:
    return param is not None and param.requires_grad


def _save(ext: BackpropExtension, param: Tensor, value: Any) -> None:
    setattr(param, ext.savefield, value)


def wants_per_sample_gradients(module: FactorizedConvNd) -> bool:
    """Whether an active extension computes first-order quantities of ``module``.

    Asked by the layer's backward (``nn.factorized_conv.PER_SAMPLE_WANTED``):
    it then returns per-sample factor gradients, from which every first-order
    quantity follows, instead of the stage walk recomputing them.
    """
    factorized_dense.check_route()
    if factorized_dense.ROUTE not in ("auto", "backward"):
        return False
    for ext in CTX.get_active_exts():
        rule = getattr(ext, _STORED, {}).get(type(module))
        if isinstance(rule, FactorizedConvExtension) and isinstance(
            rule.rule, FirstOrderRule
        ):
            return True
    return False


factorized_conv.PER_SAMPLE_WANTED = wants_per_sample_gradients


def use_for_factorized(ext: BackpropExtension, rule: StageRule) -> None:
    """Register ``rule`` for every ``FactorizedConv{1,2,3}d`` of ``ext``."""
    module_extension = FactorizedConvExtension(rule)
    for layer in FACTORIZED_CONV_TYPES:
        ext.set_module_extension(layer, module_extension, overwrite=True)


__all__ = [
    "FactorizedConvExtension",
    "use_for_factorized",
    "wants_per_sample_gradients",
]
