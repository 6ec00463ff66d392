"""Diagonals of the GGN and of the Hessian for every (transposed) convolution.

The weight diagonal is ``Σ_v (J_wᵀ s_v)²`` summed over the columns ``s_v`` of a
backpropagated square root (and over the batch unless per-sample), which the
engine's :func:`~tnbackpack.tn.functional.weight_vjp_squares` computes without
a ``[V, N, *weight]`` tensor. The bias diagonal squares the position sums of
the columns. Backpropagation to the layer input is BackPACK's, with
:class:`~tnbackpack.extensions.derivatives.ConvDerivatives`.
"""

from __future__ import annotations

from typing import Callable, Dict, List

from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.secondorder.diag_ggn.diag_ggn_base import DiagGGNBaseModule
from backpack.extensions.secondorder.diag_hessian.diag_h_base import DiagHBaseModule
from torch import Tensor, nn

from ..tn import functional
from ..tn.spec import ConvSpec
from .derivatives import ConvDerivatives, Grads
from .layer import conv_spec, layer_input


def weight_diagonal(
    spec: ConvSpec, x: Tensor, sqrt: Tensor, per_sample: bool
) -> Tensor:
    """``Σ_v (J_wᵀ s_v)²``, ``[(N,) *weight]``, from ``sqrt [V, N, C_out, *O]``."""
    return functional.weight_vjp_squares(
        spec, x, sqrt, vectors=True, per_sample=per_sample
    )


def bias_diagonal(spec: ConvSpec, sqrt: Tensor, per_sample: bool) -> Tensor:
    """``Σ_v (Σ_t s_v)²``, ``[(N,) C_out]``, from ``sqrt [V, N, C_out, *O]``."""
    summed = functional.bias_vjp(spec, sqrt, vectors=True, per_sample=True)
    squares = summed.square().sum(0)
    return squares if per_sample else squares.sum(0)


def signed_sum(backproped: Dict, diagonal: Callable[[Tensor], Tensor]) -> Tensor:
    """``Σ_i sign_i · diagonal(S_i)`` over BackPACK's Hessian square roots.

    Raises:
        RuntimeError: If no square root was backpropagated.
    """
    matrices: List[Tensor] = backproped["matrices"]
    signs: List[float] = backproped["signs"]
    total = None
    for sqrt, sign in zip(matrices, signs):
        term = diagonal(sqrt)
        total = sign * term if total is None else total.add_(term, alpha=sign)
    if total is None:  # BackPACK's loss always sends one; never return garbage
        raise RuntimeError("no Hessian square roots were backpropagated")
    return total


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
        return weight_diagonal(
            conv_spec(module), layer_input(module), backproped, self.per_sample
        )

    def bias(
        self,
        ext: BackpropExtension,
        module: nn.Module,
        g_inp: Grads,
        g_out: Grads,
        backproped: Tensor,
    ) -> Tensor:
        """GGN diagonal of the bias."""
        return bias_diagonal(conv_spec(module), backproped, self.per_sample)


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

    def weight(
        self,
        ext: BackpropExtension,
        module: nn.Module,
        g_inp: Grads,
        g_out: Grads,
        backproped: Dict,
    ) -> Tensor:
        """Hessian diagonal of the weight."""
        spec, x = conv_spec(module), layer_input(module)
        return signed_sum(
            backproped, lambda sqrt: weight_diagonal(spec, x, sqrt, self.per_sample)
        )

    def bias(
        self,
        ext: BackpropExtension,
        module: nn.Module,
        g_inp: Grads,
        g_out: Grads,
        backproped: Dict,
    ) -> Tensor:
        """Hessian diagonal of the bias."""
        spec = conv_spec(module)
        return signed_sum(
            backproped, lambda sqrt: bias_diagonal(spec, sqrt, self.per_sample)
        )
