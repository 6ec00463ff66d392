"""Diagonals of the GGN and of the Hessian for every (transposed) convolution.

The weight diagonal is ``Σ_v (J_wᵀ s_v)²`` summed over the columns ``s_v`` of a
backpropagated square root (and over the batch unless per-sample), which the
engine's :func:`~tnbackpack.tn.functional.weight_vjp_squares` computes without
a ``[V, N, *weight]`` tensor. The bias diagonal squares the position sums of
the columns. Backpropagation to the layer input is BackPACK's, with
:class:`~tnbackpack.extensions.derivatives.ConvDerivatives`.
"""

from __future__ import annotations

from typing import Dict, List

from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.secondorder.diag_ggn.diag_ggn_base import DiagGGNBaseModule
from backpack.extensions.secondorder.diag_hessian.diag_h_base import DiagHBaseModule
from torch import Tensor, nn

from ..tn import functional
from .derivatives import ConvDerivatives, Grads
from .layer import conv_spec, layer_input


def weight_diagonal(module: nn.Module, sqrt: Tensor, per_sample: bool) -> Tensor:
    """``Σ_v (J_wᵀ s_v)²``, ``[(N,) *weight]``, from ``sqrt [V, N, C_out, *O]``."""
    return functional.weight_vjp_squares(
        conv_spec(module),
        layer_input(module),
        sqrt,
        vectors=True,
        per_sample=per_sample,
    )


def bias_diagonal(module: nn.Module, sqrt: Tensor, per_sample: bool) -> Tensor:
    """``Σ_v (Σ_t s_v)²``, ``[(N,) C_out]``, from ``sqrt [V, N, C_out, *O]``."""
    summed = functional.bias_vjp(conv_spec(module), sqrt, vectors=True, per_sample=True)
    squares = summed.square().sum(0)
    return squares if per_sample else squares.sum(0)


class DiagGGNConv(DiagGGNBaseModule):
    """``DiagGGN{Exact,MC}`` (``per_sample=False``) or ``BatchDiagGGN{Exact,MC}``."""

    def __init__(self, per_sample: bool) -> None:
        self.per_sample = per_sample
        super().__init__(ConvDerivatives(), params=["bias", "weight"])

    def weight(
        self,
        ext: BackpropExtension,
        module: nn.Module,
        g_inp: Grads,
        g_out: Grads,
        backproped: Tensor,
    ) -> Tensor:
        """GGN diagonal of the weight."""
        return weight_diagonal(module, backproped, self.per_sample)

    def bias(
        self,
        ext: BackpropExtension,
        module: nn.Module,
        g_inp: Grads,
        g_out: Grads,
        backproped: Tensor,
    ) -> Tensor:
        """GGN diagonal of the bias."""
        return bias_diagonal(module, backproped, self.per_sample)


class DiagHessianConv(DiagHBaseModule):
    """``DiagHessian`` (``per_sample=False``) or ``BatchDiagHessian``.

    BackPACK backpropagates the Hessian as ``Σ_i sign_i S_i S_iᵀ``, a list of
    square roots ``S_i`` with signs ±1 (the loss's and each nonlinearity's
    positive and negative residual parts); a convolution adds no residual of
    its own, so its diagonal is the signed sum of the square roots' diagonals.
    """

    def __init__(self, per_sample: bool) -> None:
        self.per_sample = per_sample
        super().__init__(ConvDerivatives(), params=["bias", "weight"])

    def _signed_sum(self, module: nn.Module, backproped: Dict, diagonal) -> Tensor:
        matrices: List[Tensor] = backproped["matrices"]
        signs: List[float] = backproped["signs"]
        total = None
        for sqrt, sign in zip(matrices, signs):
            term = diagonal(module, sqrt, self.per_sample)
            total = sign * term if total is None else total.add_(term, alpha=sign)
        if total is None:  # BackPACK's loss always sends one; never return garbage
            raise RuntimeError(f"{module}: no Hessian square roots were backpropagated")
        return total

    def weight(
        self,
        ext: BackpropExtension,
        module: nn.Module,
        g_inp: Grads,
        g_out: Grads,
        backproped: Dict,
    ) -> Tensor:
        """Hessian diagonal of the weight."""
        return self._signed_sum(module, backproped, weight_diagonal)

    def bias(
        self,
        ext: BackpropExtension,
        module: nn.Module,
        g_inp: Grads,
        g_out: Grads,
        backproped: Dict,
    ) -> Tensor:
        """Hessian diagonal of the bias."""
        return self._signed_sum(module, backproped, bias_diagonal)
