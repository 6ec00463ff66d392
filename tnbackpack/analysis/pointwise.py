"""Exact ConvAC values at chosen points, modulo a prime.

Sampled rows and columns pick entries ``A[r, c]`` of the matricization that
share no structure a network contraction could exploit: every contraction
order keeps both sample axes and several channel legs open (an ``N = 32``
odd/even sample of 512 × 512 needs a 6.7·10⁷-entry intermediate with
auto-hq, 8.6·10⁹ with greedy). Evaluating the ConvAC's forward pass at the
``R·C`` points, in GF(p), costs ``O(R·C·N·r²)`` and little memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .convac import ConvAC
from .modular import pair_mod, to_modular


def forward_modular(model: ConvAC, patches: Tensor, p: int) -> Tensor:
    """``h`` at float patches ``(B, N, F)``, exactly modulo ``p`` (int64 ``(B,)``)."""
    h = to_modular(patches, p)
    for level, windows in enumerate(model.windows):
        weight = to_modular(model.weights[level], p)
        if model.shared:
            h = pair_mod(h, "bni", weight, "oi", "bno", p)
        else:
            h = pair_mod(h, "bni", weight, "noi", "bno", p)
        pooled = []
        for window in windows:
            product = h[:, window[0]]
            for node in window[1:]:
                product = (product * h[:, node]).remainder_(p)
            pooled.append(product)
        h = torch.stack(pooled, dim=1)
    return pair_mod(h[:, 0], "bo", to_modular(model.output, p), "o", "b", p)
