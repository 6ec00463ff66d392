"""Kronecker factors of KFAC, KFLR and KFRA for every (transposed) convolution.

Notation (see ``docs/kronecker_factors.md``): ``x̃_{n,t}`` is the patch of
sample ``n`` at output location ``t`` (length ``C_in/G·∏K``), ``T`` the number
of output locations, ``s_{v,n,t}`` column ``v`` of the backpropagated GGN
square root at location ``t`` (length ``C_out/G``).

=================  ================================  ==============================
``kfac_approx``    ``B`` (output side)                ``A`` (input side)
=================  ================================  ==============================
``"backpack"``     ``Σ_{v,n} (Σ_t s)(Σ_t s)ᵀ``        ``(1/N) Σ_{n,t} x̃ x̃ᵀ``
``"expand"``       ``Σ_{v,n,t} s sᵀ``                 ``1/(N·T) Σ_{n,t} x̃ x̃ᵀ``
``"reduce"``       ``Σ_{v,n} (Σ_t s)(Σ_t s)ᵀ``        ``1/(N·T²) Σ_n (Σ_t x̃)(Σ_t x̃)ᵀ``
=================  ================================  ==============================

``"backpack"`` is BackPACK 1.7.1's convention (numerically identical where
BackPACK works); ``"expand"``/``"reduce"`` are those of Eschenhagen et al.
(2023) and curvlinops. KFRA backpropagates a batch-averaged matrix ``Ḡ``
``[C_out·T, C_out·T]`` instead of a square root: its ``B`` sums ``Ḡ``'s
``(t, t')`` blocks over all pairs (``"backpack"``, ``"reduce"``, as BackPACK) or
over the diagonal ``t = t'`` (``"expand"``).

The weight gets ``[B, A]``; ``B ⊗ A`` approximates the curvature w.r.t. the
weight viewed per group as ``[C_out/G, C_in/G·∏K]``: ``weight.flatten(1)`` for a
convolution, ``weight.transpose(0, 1).flatten(1)`` for a transposed one (whose
weight PyTorch stores as ``[C_in, C_out/G, *K]``). With ``G > 1`` groups both
factors are stacked per group, ``B [G, C_out/G, C_out/G]`` and
``A [G, C_in/G·∏K, C_in/G·∏K]``; with one group they are BackPACK's 2-d
matrices. The bias gets ``[B]`` with BackPACK's full ``[C_out, C_out]`` factor
(``Σ_{v,n} (Σ_t s)(Σ_t s)ᵀ``, the exact bias GGN for KFLR) whatever the
approximation.
"""

from __future__ import annotations

from math import prod
from typing import List, Sequence

from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.secondorder.hbp.hbp_options import BackpropStrategy
from backpack.extensions.secondorder.hbp.hbpbase import HBPBaseModule
from torch import Tensor, einsum, nn

from ..tn import functional
from ..tn.spec import ConvSpec
from .derivatives import ConvDerivatives, Grads
from .layer import conv_spec, layer_input, output_size

KFAC_APPROXIMATIONS = ("backpack", "expand", "reduce")


def check_kfac_approx(kfac_approx: str) -> str:
    """Validate a ``kfac_approx`` argument.

    Raises:
        ValueError: If it is not one of :data:`KFAC_APPROXIMATIONS`.
    """
    if kfac_approx not in KFAC_APPROXIMATIONS:
        raise ValueError(
            f"kfac_approx must be one of {KFAC_APPROXIMATIONS}, got {kfac_approx!r}"
        )
    return kfac_approx


def kfac_approx_of(ext: BackpropExtension) -> str:
    """The extension's ``kfac_approx``."""
    # BackPACK's own HBP extensions (no attribute) use BackPACK's convention.
    return getattr(ext, "kfac_approx", "backpack")


def is_kfra(ext: BackpropExtension) -> bool:
    """Whether the extension backpropagates KFRA's batch-averaged ``Ḡ``."""
    return BackpropStrategy.is_batch_average(ext.get_backprop_strategy())


def _unstack(factor: Tensor) -> Tensor:
    """BackPACK's 2-d factor for one group, the stacked ``[G, d, d]`` otherwise.

    Contiguous, like BackPACK's factors (users ``view`` them, ``torch.kron``
    needs it).
    """
    return (factor[0] if factor.shape[0] == 1 else factor).contiguous()


def input_factor(
    spec: ConvSpec, x: Tensor, out_size: Sequence[int], approx: str
) -> Tensor:
    """``A`` per group, ``[G, C_in/G·∏K, C_in/G·∏K]``, from the layer input ``x``.

    BackPACK's ``A`` is the expand factor without its ``1/T``.
    """
    engine_approx = "expand" if approx == "backpack" else approx
    factor = functional.kfac_input_factor(spec, x, engine_approx, output_size=out_size)
    return factor.mul_(prod(out_size)) if approx == "backpack" else factor


def kfra_output_factor(spec: ConvSpec, ggn: Tensor, approx: str) -> Tensor:
    """``B`` per group, ``[G, C_out/G, C_out/G]``, from KFRA's ``Ḡ``.

    ``Ḡ`` is ``[C_out·T, C_out·T]`` with rows ``(channel, location)``.
    """
    groups, per_group = spec.groups, spec.out_channels // spec.groups
    positions = ggn.shape[0] // spec.out_channels
    blocks = ggn.reshape(groups, per_group, positions, groups, per_group, positions)
    # Only the diagonal group blocks enter the weight factor of each group.
    if approx == "expand":
        return einsum("gatgbt->gab", blocks)
    return einsum("gasgbt->gab", blocks)


def kfra_bias_factor(spec: ConvSpec, ggn: Tensor) -> Tensor:
    """BackPACK's KFRA bias factor: ``Ḡ`` summed over both position axes."""
    channels = spec.out_channels
    positions = ggn.shape[0] // channels
    return ggn.reshape(channels, positions, channels, positions).sum((1, 3))


def sqrt_bias_factor(spec: ConvSpec, sqrt_ggn: Tensor) -> Tensor:
    """``Σ_{v,n} (Σ_t s)(Σ_t s)ᵀ`` over all output channels, ``[C_out, C_out]``."""
    summed = functional.bias_vjp(spec, sqrt_ggn, vectors=True, per_sample=True)
    flat = summed.flatten(0, 1)
    return flat.t() @ flat


def weight_factors(
    spec: ConvSpec,
    x: Tensor,
    out_size: Sequence[int],
    backproped: Tensor,
    approx: str,
    kfra: bool,
) -> List[Tensor]:
    """``[B, A]`` for a weight (stacked per group if ``groups > 1``).

    Args:
        spec: The layer.
        x: Its input ``[N, C_in, *I]``.
        out_size: Its spatial output size.
        backproped: The square root ``[V, N, C_out, *O]`` (KFAC, KFLR) or
            KFRA's batch-averaged ``Ḡ``.
        approx: ``"backpack"``, ``"expand"`` or ``"reduce"``.
        kfra: Whether ``backproped`` is KFRA's ``Ḡ``.
    """
    if kfra:
        output_side = kfra_output_factor(spec, backproped, approx)
    else:
        engine_approx = "reduce" if approx == "backpack" else approx
        output_side = functional.kfac_output_factor(spec, backproped, engine_approx)
    return [_unstack(output_side), _unstack(input_factor(spec, x, out_size, approx))]


def bias_factors(spec: ConvSpec, backproped: Tensor, kfra: bool) -> List[Tensor]:
    """``[B]`` for a bias, BackPACK's ``[C_out, C_out]`` factor."""
    if kfra:
        return [kfra_bias_factor(spec, backproped).contiguous()]
    return [sqrt_bias_factor(spec, backproped)]


class KroneckerConv(HBPBaseModule):
    """KFAC/KFLR/KFRA factors of any conv layer; reads ``ext.kfac_approx``.

    Backpropagation is BackPACK's (square roots through ``Jᵀ`` for KFAC/KFLR,
    ``Jᵀ Ḡ J`` for KFRA) with :class:`ConvDerivatives`.
    """

    def __init__(self) -> None:
        super().__init__(ConvDerivatives(), params=["weight", "bias"])

    def weight(
        self,
        ext: BackpropExtension,
        module: nn.Module,
        g_inp: Grads,
        g_out: Grads,
        backproped: Tensor,
    ) -> List[Tensor]:
        """``[B, A]`` for the weight (stacked per group if ``groups > 1``)."""
        return weight_factors(
            conv_spec(module),
            layer_input(module),
            output_size(module),
            backproped,
            kfac_approx_of(ext),
            is_kfra(ext),
        )

    def bias(
        self,
        ext: BackpropExtension,
        module: nn.Module,
        g_inp: Grads,
        g_out: Grads,
        backproped: Tensor,
    ) -> List[Tensor]:
        """``[B]`` for the bias, BackPACK's ``[C_out, C_out]`` factor."""
        return bias_factors(conv_spec(module), backproped, is_kfra(ext))
