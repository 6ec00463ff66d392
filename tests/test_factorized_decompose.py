"""``FactorizedConv*d.from_conv``: tensorly decompositions of dense kernels.

Exact at full rank (Tucker-2, TT, TR) or at the kernel's own CP rank; below
full rank within the truncation bounds of the SVD-based methods, computed in
the test from NumPy SVDs of the kernel's unfoldings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factorized_cases import LAYERS
from torch import nn

pytest.importorskip("tensorly")


def relative_error(layer: nn.Module, conv: nn.Module) -> float:
    return ((layer.full_weight() - conv.weight).norm() / conv.weight.norm()).item()


def dense(groups: int = 1, ndim: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[ndim]
    return conv(4, 6, 3, padding=1, groups=groups, padding_mode="circular").double()


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize(
    "factorization, rank",
    [("tucker", (4, 6)), ("tt", (4, 12, 6)), ("tr", (1, 3, 9, 4))],
)
def test_exact_at_full_rank(factorization, rank, groups):
    conv = dense(groups)
    if groups == 2:  # per group: 2 input, 3 output channels
        rank = {"tucker": (2, 3), "tt": (2, 6, 3), "tr": (1, 3, 6, 2)}[factorization]
    layer = LAYERS[2].from_conv(conv, factorization, rank)
    assert relative_error(layer, conv) < 1e-12
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x))
    assert (layer.stride, layer.padding, layer.padding_mode) == (
        conv.stride, conv.padding, conv.padding_mode,
    )  # fmt: skip


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_cp_recovers_a_low_rank_kernel(ndim):
    torch.manual_seed(ndim)
    source = LAYERS[ndim](4, 6, 3, 3, "cp").double()
    conv = source.to_conv()
    # ALS converges linearly: tensorly options are passed through
    layer = LAYERS[ndim].from_conv(conv, "cp", 3, n_iter_max=5000, tol=1e-16)
    assert relative_error(layer, conv) < 1e-6
    assert relative_error(LAYERS[ndim].from_conv(conv, "cp", 1), conv) > 1e-2


def tail(matrix: np.ndarray, rank: int) -> float:
    """Frobenius norm of what a rank-``rank`` truncated SVD leaves out."""
    values = np.linalg.svd(matrix, compute_uv=False)
    return float(np.sqrt((values[rank:] ** 2).sum()))


def test_tt_within_the_tt_svd_bound():
    """‖W − TT‖ ≤ sqrt(Σ_k ε_k²), ε_k the tail of unfolding k (Oseledets 2011)."""
    conv = dense()
    ranks = (2, 3, 3)
    layer = LAYERS[2].from_conv(conv, "tt", ranks)
    tensor = np.moveaxis(conv.weight.detach().numpy(), 0, -1)  # [C, Kh, Kw, O]
    shape = tensor.shape
    bound = np.sqrt(sum(
        tail(tensor.reshape(int(np.prod(shape[: k + 1])), -1), r) ** 2
        for k, r in enumerate(ranks)
    ))  # fmt: skip
    error = (layer.full_weight() - conv.weight).norm().item()
    assert error <= bound * (1 + 1e-9)
    assert error > 0.1 * bound  # truncated indeed


def test_tucker_within_the_hosvd_bound():
    """HOOI does at least as well as HOSVD: ‖W − T‖² ≤ ε_out² + ε_in²."""
    conv = dense()
    r_in, r_out = 2, 3
    layer = LAYERS[2].from_conv(conv, "tucker", (r_in, r_out))
    kernel = conv.weight.detach().numpy()
    bound = np.hypot(
        tail(kernel.reshape(6, -1), r_out),
        tail(np.moveaxis(kernel, 1, 0).reshape(4, -1), r_in),
    )
    error = (layer.full_weight() - conv.weight).norm().item()
    assert error <= bound * (1 + 1e-9)


def test_ranks_above_what_the_kernel_supports_are_zero_padded():
    conv = dense()
    layer = LAYERS[2].from_conv(conv, "tucker", (8, 9))
    assert layer.core.shape == (9, 8, 3, 3)
    assert relative_error(layer, conv) < 1e-12


def test_errors():
    with pytest.raises(TypeError, match="expects an nn.Conv2d"):
        LAYERS[2].from_conv(nn.ConvTranspose2d(4, 6, 3), "cp", 2)
    with pytest.raises(TypeError, match="expects an nn.Conv1d"):
        LAYERS[1].from_conv(dense(), "cp", 2)
    with pytest.raises(ValueError, match="tensorly cannot decompose"):
        LAYERS[2].from_conv(dense(groups=2), "tr", (2, 2, 2, 2))


def test_independent_of_tensorlys_global_backend():
    """tensorly-torch sets tensorly's backend to PyTorch on import; still NumPy here."""
    import tensorly

    conv = dense()
    with tensorly.backend_context("pytorch"):
        layer = LAYERS[2].from_conv(conv, "tucker", (4, 6))
    assert relative_error(layer, conv) < 1e-12
