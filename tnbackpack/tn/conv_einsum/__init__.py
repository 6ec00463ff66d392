"""Einsum strings with convolution letters, planned and differentiable (DESIGN §7).

``conv_einsum("nchw,rc,rh,rw,or->nohw|hw", x, A, Kh, Kw, B, padding=1)`` is a
CP-factorized ``Conv2d``. Modules: :mod:`.grammar` (parse), :mod:`.semantics`
(letters, hyper-parameters, the network of legs), :mod:`.legs` (merged legs of
intermediates), :mod:`.planner` (order and kernel per step, cost model),
:mod:`.steps` (the kernels), :mod:`.evaluate` (run a plan), :mod:`.function`
(autograd), :mod:`.per_sample` (per-sample gradients), :mod:`.api` (the public
functions).
"""

from .api import PathInfo, PathStep, conv_einsum, conv_einsum_path
from .per_sample import PerSampleRequest

__all__ = [
    "PathInfo",
    "PathStep",
    "PerSampleRequest",
    "conv_einsum",
    "conv_einsum_path",
]
