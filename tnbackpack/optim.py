"""A K-FAC preconditioner for the Kronecker factors that BackPACK and tnbackpack store.

After a backward pass inside ``with backpack(KFAC(...))`` every weight of a
``Linear``, ``Conv{1,2,3}d`` or ``ConvTranspose{1,2,3}d`` layer carries a list
``[B, A]`` and every bias a list ``[B]`` (savefield ``kfac``; ``kflr`` and
``kfra`` have the same layout). :class:`KFACPreconditioner` keeps a running
average of these factors, refreshes their eigendecompositions every few steps
and replaces each ``.grad`` by ``(B ⊗ A + λ I)⁻¹ grad`` — the damped inverse of
the Kronecker product itself, not of the product of damped factors.

Layouts, per parameter:

- weight of a ``Linear`` or a convolution, ``[C_out, C_in/G, *K]``: viewed as
  ``G`` blocks ``[C_out/G, C_in/G·∏K]`` (row-major, so ``B ⊗ A`` acts on
  ``vec(block)`` as ``B @ block @ A``),
- weight of a ``ConvTranspose``, ``[C_in, C_out/G, *K]``: the factors
  approximate the curvature of ``weight.transpose(0, 1)``; with groups the
  weight is grouped by blocks of ``C_in`` rows, and block ``g`` is
  ``weight[g·C_in/G:(g+1)·C_in/G].transpose(0, 1)`` flattened to
  ``[C_out/G, C_in/G·∏K]``,
- bias ``[C_out]``: preconditioned by ``B``, one block per stacked factor
  (BackPACK's and tnbackpack's bias factors are one ``[C_out, C_out]`` block,
  even for grouped layers).

Factors are either 2-d (one block, BackPACK's layout) or stacked ``[G, d, d]``
(tnbackpack's layout for grouped convolutions). Each factor of a
``tnbackpack.nn.FactorizedConv{1,2,3}d`` is preconditioned as the weight of its
stage convolution (its Kronecker factors are that stage's), viewed in the
stage weight's shape. Parameters of other layers (e.g. normalization layers)
keep their gradients.

Under ``torch.distributed`` (e.g. launched by ``torchrun``, with the model
wrapped in ``DistributedDataParallel``) the same code averages the factors
across processes and spreads the eigendecompositions over them: see
:mod:`tnbackpack.distributed` and the "Distributed training" docs page.

Typical use, as in ``examples/demo.py``:

    from backpack import backpack, extend
    from tnbackpack.extensions import KFAC
    from tnbackpack.optim import KFACPreconditioner

    model, loss_function = extend(model), extend(loss_function)
    preconditioner = KFACPreconditioner(model, damping=1e-2, kl_clip=1e-2, lr=0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    for X, y in batches:
        optimizer.zero_grad()
        with backpack(KFAC(kfac_approx="reduce")):
            loss_function(model(X), y).backward()
        preconditioner.step()  # reads param.kfac, preconditions param.grad
        optimizer.step()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod, sqrt
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .distributed.kfac import FactorSync
from .nn.factorized_conv import FACTORIZED_CONV_TYPES

__all__ = ["KFACPreconditioner", "SUPPORTED_LAYERS", "eigendecompose"]

#: Layer types whose parameters are preconditioned.
SUPPORTED_LAYERS: Tuple[type, ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class _Block:
    """The running factors of one parameter and their eigendecompositions."""

    name: str
    param: Tensor
    module: nn.Module
    is_weight: bool
    factors: Optional[List[Tensor]] = None
    eigen: List[Tuple[Tensor, Tensor]] = field(default_factory=list)
    #: Shape to view the parameter in first (a factor's stage weight shape).
    view: Optional[Tuple[int, ...]] = None
    #: Groups of the factors (a factor's stage); ``None``: the module's.
    groups: Optional[int] = None

    def as_weight(self, tensor: Tensor) -> Tensor:
        """A parameter-shaped tensor in the layout its factors describe."""
        return tensor if self.view is None else tensor.reshape(self.view)


def to_blocks(
    tensor: Tensor, module: nn.Module, is_weight: bool, groups: int
) -> Tensor:
    """View a parameter-shaped tensor as ``[G, rows, columns]`` matrices.

    Args:
        tensor: Tensor shaped like the parameter (e.g. its gradient).
        module: The layer owning the parameter.
        is_weight: Whether the parameter is the layer's weight (else its bias).
        groups: Number of blocks ``G`` (the number of stacked factors).

    Returns:
        ``[G, C_out/G, C_in/G·∏K]`` for a weight, ``[G, C_out/G, 1]`` for a bias.
    """
    if not is_weight:
        return tensor.reshape(groups, -1, 1)
    if isinstance(module, _TRANSPOSED):
        c_in, c_out = tensor.shape[:2]  # c_out is per group
        grouped = tensor.reshape(groups, c_in // groups, c_out, -1)
        return grouped.transpose(1, 2).reshape(groups, c_out, -1)
    return tensor.reshape(groups, tensor.shape[0] // groups, -1)


def from_blocks(
    blocks: Tensor, like: Tensor, module: nn.Module, is_weight: bool
) -> Tensor:
    """Inverse of :func:`to_blocks`: back to the parameter's shape ``like``."""
    if not is_weight or not isinstance(module, _TRANSPOSED):
        return blocks.reshape(like.shape)
    groups, c_out = blocks.shape[:2]
    c_in = like.shape[0]
    taps = prod(like.shape[2:])
    grouped = blocks.reshape(groups, c_out, c_in // groups, taps).transpose(1, 2)
    return grouped.reshape(like.shape)


def factor_shapes(block: _Block) -> List[Tuple[int, int, int]]:
    """The ``[G, d, d]`` shapes tnbackpack's extensions give ``block``'s factors.

    One stacked pair per group for a grouped convolution's weight; one
    ``[C_out, C_out]`` block for every bias.
    """
    groups = 1
    if block.is_weight:
        groups = block.groups or getattr(block.module, "groups", 1)
    matrix = to_blocks(
        block.as_weight(block.param), block.module, block.is_weight, groups
    )
    sizes = [matrix.shape[1]] + ([matrix.shape[2]] if block.is_weight else [])
    return [(groups, size, size) for size in sizes]


def eigendecompose(factors: List[Tensor]) -> List[Tuple[Tensor, Tensor]]:
    """Eigenvalues (clamped at 0) and eigenvectors of each ``[G, d, d]`` factor.

    Computed in float64 for robustness, returned in the factors' dtype.
    """
    result = []
    for factor in factors:
        values, vectors = torch.linalg.eigh(factor.double())
        result.append((values.clamp(min=0).to(factor.dtype), vectors.to(factor.dtype)))
    return result


class KFACPreconditioner:
    """Precondition gradients by damped inverses of running-average K-FAC factors.

    Call :meth:`step` after each backward pass and before the optimizer's
    step. It reads (and removes) the factors that the last backward pass stored
    under ``savefield``, so the extension may also run only on some steps: on
    the others the running averages are reused.

    The update is ``grad ← (B̄ ⊗ Ā + λ I)⁻¹ grad`` per block, evaluated exactly
    through the eigendecompositions ``B̄ = Q_B Λ_B Q_Bᵀ`` and
    ``Ā = Q_A Λ_A Q_Aᵀ``: ``Q_B [(Q_Bᵀ G Q_A) / (λ_B λ_Aᵀ + λ)] Q_Aᵀ``. A bias is
    preconditioned by ``(B̄ + λ I)⁻¹``. With a mean-reduced loss BackPACK's
    factors approximate the curvature of the mean loss, so ``λ`` is on that
    scale.

    Args:
        model: The network; every ``Linear``/``Conv``/``ConvTranspose`` layer
            with trainable parameters is preconditioned.
        damping: ``λ`` added to the eigenvalues of the Kronecker product.
        update_every: Refresh the eigendecompositions every this many steps
            (the first step always computes them).
        ema: Weight of the old running average when new factors arrive
            (``0`` uses only the newest factors).
        kl_clip: If given, shrink all preconditioned gradients ``v`` by one
            factor so that ``lr² Σ vᵀ grad ≤ kl_clip`` (KL clipping, Ba et
            al. 2017): a trust region against huge steps along directions
            of small curvature.
        lr: The optimizer's learning rate, used only by ``kl_clip`` (update
            the attribute ``lr`` if a schedule changes it).
        savefield: Where the factors are stored (``kfac``, ``kflr``, ``kfra``).
        process_group: Under ``torch.distributed``, the processes whose
            factors are averaged (default: all, once the default group is
            initialized; outside ``torch.distributed`` nothing is
            communicated). ``model`` may then be the
            ``DistributedDataParallel`` wrapper or its inner module; the
            gradients must already be averaged (DDP does it). Every process
            of the group must construct the preconditioner (it creates its
            own communicators) and call :meth:`step` equally often.
        distribute_inverses: Under ``torch.distributed``, eigendecompose each
            parameter's factors on one process (assigned by cost, see
            :func:`tnbackpack.distributed.assign_by_cost`) and broadcast
            the results; ``False``: every process eigendecomposes everything
            (no messages, more compute).
        bucket_cap_mb: Under ``torch.distributed``, the largest all-reduce
            message of factors, in MiB.
        timeout: Under ``torch.distributed``, seconds a collective may wait
            for the other processes before it raises.

    Raises:
        ValueError: If a hyper-parameter is out of range, or (under
            ``torch.distributed``) if the processes' models differ.
    """

    def __init__(
        self,
        model: nn.Module,
        damping: float = 1e-3,
        update_every: int = 10,
        ema: float = 0.95,
        kl_clip: Optional[float] = None,
        lr: float = 1.0,
        savefield: str = "kfac",
        process_group: Optional[object] = None,
        distribute_inverses: bool = True,
        bucket_cap_mb: float = 25.0,
        timeout: float = 300.0,
    ) -> None:
        if damping <= 0:
            raise ValueError(f"damping must be positive, got {damping}")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        if not 0 <= ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        if kl_clip is not None and kl_clip <= 0:
            raise ValueError(f"kl_clip must be positive, got {kl_clip}")
        self.damping = damping
        self.update_every = update_every
        self.ema = ema
        self.kl_clip = kl_clip
        self.lr = lr
        self.savefield = savefield
        self.steps = 0
        self.blocks: List[_Block] = []
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module  # parameter names without DDP's "module."
        for module_name, module in model.named_modules():
            if isinstance(module, FACTORIZED_CONV_TYPES):
                self._add_factorized(module_name, module)
                continue
            if not isinstance(module, SUPPORTED_LAYERS):
                continue
            for param_name in ("weight", "bias"):
                param = getattr(module, param_name, None)
                if param is None or not param.requires_grad:
                    continue
                name = f"{module_name}.{param_name}" if module_name else param_name
                self.blocks.append(
                    _Block(name, param, module, is_weight=param_name == "weight")
                )
        self.sync = FactorSync.create(
            self,
            [factor_shapes(block) for block in self.blocks],
            process_group,
            distribute_inverses=distribute_inverses,
            bucket_cap_mb=bucket_cap_mb,
            timeout=timeout,
        )

    def _add_factorized(self, module_name: str, module: nn.Module) -> None:
        """One block per factor (viewed as its stage weight) and the bias."""
        prefix = f"{module_name}." if module_name else ""
        for factor in module.factor_plan():
            param = getattr(module, factor.name)
            if param.requires_grad:
                stage = factor.stage
                self.blocks.append(
                    _Block(
                        prefix + factor.name,
                        param,
                        module,
                        True,
                        view=stage.weight_shape(),
                        groups=stage.groups,
                    )
                )
        if module.bias is not None and module.bias.requires_grad:
            self.blocks.append(_Block(prefix + "bias", module.bias, module, False))

    # ----------------------------------------------------------------- factors
    def _read_factors(
        self, block: _Block, remove: bool = True
    ) -> Optional[List[Tensor]]:
        """The factors stored on the parameter, as ``[G, d, d]`` (then removed).

        Raises:
            ValueError: If their number or shapes do not fit the parameter.
        """
        stored = getattr(block.param, self.savefield, None)
        if stored is None:
            return None
        if remove:
            delattr(block.param, self.savefield)
        expected = 2 if block.is_weight else 1
        if len(stored) != expected:
            raise ValueError(
                f"{block.name}: expected {expected} Kronecker factor(s) in "
                f"'{self.savefield}', got {len(stored)}"
            )
        factors = [
            f.detach() if f.ndim == 3 else f.detach().unsqueeze(0) for f in stored
        ]
        groups = factors[0].shape[0]
        matrix = to_blocks(
            block.as_weight(block.param), block.module, block.is_weight, groups
        )
        sizes = [matrix.shape[1]] + ([matrix.shape[2]] if block.is_weight else [])
        for factor, size in zip(factors, sizes):
            if factor.shape != (groups, size, size):
                raise ValueError(
                    f"{block.name} {tuple(block.param.shape)}: factor of shape "
                    f"{tuple(factor.shape)} does not fit; expected "
                    f"({groups}, {size}, {size}) for {groups} block(s)"
                )
        return factors

    def update_factors(self) -> None:
        """Fold the factors of the last backward pass into the running averages."""
        if self.sync is not None:
            news = self.sync.average_factors()
        else:
            news = [self._read_factors(block) for block in self.blocks]
        for block, new in zip(self.blocks, news):
            if new is None:
                continue
            if block.factors is None or block.factors[0].shape != new[0].shape:
                block.factors = [f.clone() for f in new]
            else:
                for old, fresh in zip(block.factors, new):
                    old.mul_(self.ema).add_(fresh, alpha=1 - self.ema)

    def refresh_inverses(self, only_missing: bool = False) -> None:
        """Eigendecompose the running factors (in float64, for robustness).

        Args:
            only_missing: Only for parameters that have factors but no
                eigendecomposition yet (their first factors arrived late).
        """
        due = [
            block
            for block in self.blocks
            if block.factors is not None and not (only_missing and block.eigen)
        ]
        if self.sync is not None and self.sync.distribute_inverses:
            self.sync.eigendecompose(due)
            return
        for block in due:
            block.eigen = eigendecompose(block.factors)

    # ---------------------------------------------------------- preconditioning
    def precondition(self) -> None:
        """Replace every gradient by its damped-inverse-preconditioned version.

        Raises:
            RuntimeError: If a parameter has a gradient but no factors have
                ever been read for it.
        """
        inner = 0.0  # Σ vᵀ grad, for KL clipping
        for block in self.blocks:
            grad = block.param.grad
            if grad is None:
                continue
            if not block.eigen:
                raise RuntimeError(
                    f"no Kronecker factors for {block.name}: run the backward pass "
                    f"inside `with backpack(KFAC())` before the first step"
                )
            block.param.grad = self.apply(block, grad)
            if self.kl_clip is not None:
                inner += (block.param.grad * grad).sum().item()
        if self.kl_clip is not None and inner > 0:
            shrink = min(1.0, sqrt(self.kl_clip / (self.lr**2 * inner)))
            for block in self.blocks:
                if block.param.grad is not None:
                    block.param.grad.mul_(shrink)

    def apply(self, block: _Block, grad: Tensor) -> Tensor:
        """``(B ⊗ A + λ I)⁻¹ grad`` for one parameter (``B + λ I`` for a bias)."""
        (values_b, q_b), *rest = block.eigen
        matrix = to_blocks(
            block.as_weight(grad), block.module, block.is_weight, q_b.shape[0]
        )
        rotated = q_b.transpose(1, 2) @ matrix
        if rest:
            values_a, q_a = rest[0]
            rotated = rotated @ q_a
            scale = values_b.unsqueeze(2) * values_a.unsqueeze(1)
        else:
            scale = values_b.unsqueeze(2)
        rotated = rotated / (scale + self.damping)
        result = q_b @ rotated
        if rest:
            result = result @ q_a.transpose(1, 2)
        return from_blocks(result, grad, block.module, block.is_weight)

    def step(self) -> None:
        """Update the factors, refresh the inverses if due, precondition ``.grad``."""
        self.update_factors()
        self.refresh_inverses(only_missing=self.steps % self.update_every != 0)
        self.precondition()
        self.steps += 1

    def remove_hooks(self) -> None:
        """Stop overlapping factor communication with backward (distributed only)."""
        if self.sync is not None:
            self.sync.remove_hooks()

    def state(self) -> Dict[str, List[Tensor]]:
        """The running factors by parameter name (for inspection)."""
        return {b.name: b.factors for b in self.blocks if b.factors is not None}
