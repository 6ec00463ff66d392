"""Data-parallel curvature on ``torch.distributed``.

- :class:`~tnbackpack.distributed.kfac.FactorSync`: what
  :class:`~tnbackpack.optim.KFACPreconditioner` uses under
  ``torch.distributed`` (factor all-reduce, inverse assignment and broadcast).
- :class:`~tnbackpack.distributed.privacy.PrivateGradient`: DP-SGD's clipped,
  noised, averaged gradient across processes.

See the "Distributed training" docs page.
"""

from .kfac import FactorSync, assign_by_cost, inverse_cost, packed_size
from .privacy import PrivateGradient

__all__ = [
    "FactorSync",
    "PrivateGradient",
    "assign_by_cost",
    "inverse_cost",
    "packed_size",
]
