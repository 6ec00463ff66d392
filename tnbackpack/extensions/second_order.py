"""Second-order BackPACK extensions whose convolution rules are tensor networks.

Each extension is a drop-in subclass of BackPACK's: same constructor (plus
``kfac_approx`` for the Kronecker ones), savefield, shapes and scaling. Its
``__init__`` replaces BackPACK's module extensions for ``Conv{1,2,3}d`` and
``ConvTranspose{1,2,3}d`` by one N-d-generic module extension; every other
layer (losses, activations, pooling, linear, ...) keeps BackPACK's, so the loss
Hessian square roots and their Monte-Carlo samples are BackPACK's own: with the
same torch seed the MC extensions draw the same samples as BackPACK's.

Unlike BackPACK 1.7.1 they are right for ``padding='same'``/``'valid'``, every
``padding_mode``, ``output_padding`` and groups (stacked Kronecker factors per
group, see :mod:`.kronecker`).
"""

from __future__ import annotations

from typing import List, Optional

from backpack import extensions as backpack_extensions
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.module_extension import ModuleExtension
from backpack.extensions.secondorder.sqrt_ggn.base import SqrtGGNBaseModule

from .derivatives import ConvDerivatives
from .diagonal import DiagGGNConv, DiagHessianConv
from .factorized import (
    DiagonalRule,
    HessianDiagonalRule,
    KroneckerRule,
    SqrtGGNRule,
    StageRule,
    use_for_factorized,
)
from .kronecker import KroneckerConv, check_kfac_approx
from .layer import CONV_TYPES

__all__ = [
    "KFAC",
    "KFLR",
    "KFRA",
    "BatchDiagGGNExact",
    "BatchDiagGGNMC",
    "BatchDiagHessian",
    "DiagGGNExact",
    "DiagGGNMC",
    "DiagHessian",
    "SqrtGGNExact",
    "SqrtGGNMC",
]


class SqrtGGNConv(SqrtGGNBaseModule):
    """``SqrtGGN{Exact,MC}``: ``J_pᵀ S`` per sample, ``[V, N, *param]``.

    BackPACK's base module does everything through the derivatives object.
    """

    def __init__(self) -> None:
        super().__init__(ConvDerivatives(), params=["bias", "weight"])


def _use_for_convolutions(
    extension: BackpropExtension, rule: ModuleExtension, stage_rule: StageRule
) -> None:
    """Route every conv type to ``rule``, factorized convolutions to ``stage_rule``."""
    for layer in CONV_TYPES:
        extension.set_module_extension(layer, rule, overwrite=True)
    use_for_factorized(extension, stage_rule)


# ------------------------------------------------------------------ Kronecker
class KFAC(backpack_extensions.KFAC):
    """BackPACK's ``KFAC`` (savefield ``kfac``) with tensor-network conv rules.

    Args:
        mc_samples: Monte-Carlo samples of the loss Hessian square root.
        kfac_approx: ``"backpack"`` (BackPACK's factors), ``"expand"`` or
            ``"reduce"``; see :mod:`tnbackpack.extensions.kronecker`.
    """

    def __init__(self, mc_samples: int = 1, kfac_approx: str = "backpack") -> None:
        self.kfac_approx = check_kfac_approx(kfac_approx)
        super().__init__(mc_samples=mc_samples)
        _use_for_convolutions(self, KroneckerConv(), KroneckerRule())


class KFLR(backpack_extensions.KFLR):
    """BackPACK's ``KFLR`` (savefield ``kflr``) with tensor-network conv rules.

    Args:
        kfac_approx: ``"backpack"``, ``"expand"`` or ``"reduce"``.
    """

    def __init__(self, kfac_approx: str = "backpack") -> None:
        self.kfac_approx = check_kfac_approx(kfac_approx)
        super().__init__()
        _use_for_convolutions(self, KroneckerConv(), KroneckerRule())


class KFRA(backpack_extensions.KFRA):
    """BackPACK's ``KFRA`` (savefield ``kfra``) with tensor-network conv rules.

    Args:
        kfac_approx: ``"backpack"`` and ``"reduce"`` sum the backpropagated
            ``Ḡ`` over all pairs of output positions for ``B`` (BackPACK),
            ``"expand"`` over equal positions; ``A`` as for KFAC.
    """

    def __init__(self, kfac_approx: str = "backpack") -> None:
        self.kfac_approx = check_kfac_approx(kfac_approx)
        super().__init__()
        _use_for_convolutions(self, KroneckerConv(), KroneckerRule())


# ------------------------------------------------------------------ diagonals
class DiagGGNExact(backpack_extensions.DiagGGNExact):
    """BackPACK's ``DiagGGNExact`` (savefield ``diag_ggn_exact``)."""

    def __init__(self) -> None:
        super().__init__()
        _use_for_convolutions(self, DiagGGNConv(per_sample=False), DiagonalRule(False))


class DiagGGNMC(backpack_extensions.DiagGGNMC):
    """BackPACK's ``DiagGGNMC`` (savefield ``diag_ggn_mc``)."""

    def __init__(self, mc_samples: int = 1) -> None:
        super().__init__(mc_samples=mc_samples)
        _use_for_convolutions(self, DiagGGNConv(per_sample=False), DiagonalRule(False))


class BatchDiagGGNExact(backpack_extensions.BatchDiagGGNExact):
    """BackPACK's ``BatchDiagGGNExact`` (savefield ``diag_ggn_exact_batch``)."""

    def __init__(self) -> None:
        super().__init__()
        _use_for_convolutions(self, DiagGGNConv(per_sample=True), DiagonalRule(True))


class BatchDiagGGNMC(backpack_extensions.BatchDiagGGNMC):
    """BackPACK's ``BatchDiagGGNMC`` (savefield ``diag_ggn_mc_batch``)."""

    def __init__(self, mc_samples: int = 1) -> None:
        super().__init__(mc_samples=mc_samples)
        _use_for_convolutions(self, DiagGGNConv(per_sample=True), DiagonalRule(True))


class DiagHessian(backpack_extensions.DiagHessian):
    """BackPACK's ``DiagHessian`` (savefield ``diag_h``)."""

    def __init__(self) -> None:
        super().__init__()
        _use_for_convolutions(
            self, DiagHessianConv(per_sample=False), HessianDiagonalRule(False)
        )


class BatchDiagHessian(backpack_extensions.BatchDiagHessian):
    """BackPACK's ``BatchDiagHessian`` (savefield ``diag_h_batch``)."""

    def __init__(self) -> None:
        super().__init__()
        _use_for_convolutions(
            self, DiagHessianConv(per_sample=True), HessianDiagonalRule(True)
        )


# ------------------------------------------------------------- square roots
class SqrtGGNExact(backpack_extensions.SqrtGGNExact):
    """BackPACK's ``SqrtGGNExact`` (savefield ``sqrt_ggn_exact``, ``[C, N, *p]``)."""

    def __init__(self, subsampling: Optional[List[int]] = None) -> None:
        super().__init__(subsampling=subsampling)
        _use_for_convolutions(self, SqrtGGNConv(), SqrtGGNRule())


class SqrtGGNMC(backpack_extensions.SqrtGGNMC):
    """BackPACK's ``SqrtGGNMC`` (savefield ``sqrt_ggn_mc``, ``[M, N, *p]``)."""

    def __init__(
        self, mc_samples: int = 1, subsampling: Optional[List[int]] = None
    ) -> None:
        super().__init__(mc_samples=mc_samples, subsampling=subsampling)
        _use_for_convolutions(self, SqrtGGNConv(), SqrtGGNRule())
