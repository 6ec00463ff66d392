"""Whether autograd records the current computation (``create_graph=True``).

BackPACK's quantities are differentiable: after
``loss.backward(create_graph=True)`` a user may differentiate them again (the
gradient of a gradient-norm penalty, laplace-torch's ``enable_backprop``,
cockpit's Hessian eigenvalue). Autograd refuses ``out=`` arguments and some
in-place updates of tensors it still needs, so the engine keeps those fast
paths for the usual case, where the backward pass runs without recording
(grad mode off, or no operand requiring grad), and takes the plain
out-of-place operations only when a graph is being built.
"""

from __future__ import annotations

import torch
from torch import Tensor


def records_graph(*tensors: Tensor) -> bool:
    """Whether an operation on ``tensors`` would be recorded by autograd now."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
