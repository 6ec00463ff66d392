"""conv_einsum twice differentiable: gradients of gradients vs the rebuilt kernel.

With ``create_graph=True`` the gradients of ``conv_einsum`` must carry a graph
to every operand (a gradient penalty, Hessian-vector products, BackPACK
clients' ``create_graph``). The reference rebuilds the dense kernel with
``torch.einsum`` and runs PyTorch's own convolution; both sides are
differentiated twice by autograd.
"""

import pytest
import torch
import torch.nn.functional as F
from test_conv_einsum_layers import LAYERS

from tnbackpack import conv_einsum


def second_order(function, operands, seed):
    """Gradient of ``⟨∇ ⟨f, v⟩, u⟩`` w.r.t. every operand (a double backward)."""
    # own generator: the reference's nn.Conv2d draws from the global one
    gen = torch.Generator().manual_seed(seed)
    leaves = [op.detach().clone().requires_grad_(True) for op in operands]
    out = function(*leaves)
    v = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    grads = torch.autograd.grad(out, leaves, v, create_graph=True)
    us = [torch.randn(g.shape, generator=gen, dtype=g.dtype) for g in grads]
    total = sum((g * u).sum() for g, u in zip(grads, us))
    return torch.autograd.grad(total, leaves, allow_unused=True)


@pytest.mark.parametrize("name", ["cp", "cp_weights", "tucker2", "tt", "tr"])
@pytest.mark.parametrize(
    "stride,padding,padding_mode",
    [(1, 1, "zeros"), (2, "same", "zeros"), (1, 1, "circular")],
)
def test_double_backward_vs_rebuilt_kernel(name, stride, padding, padding_mode):
    if padding == "same" and stride != 1:
        stride = 1
    torch.manual_seed(0)
    equation, factor_shapes, rebuild = LAYERS[name]
    C, Co, R = 3, 4, 2
    operands = [torch.randn(2, C, 6, 5, dtype=torch.float64)]
    operands += [torch.randn(*s, dtype=torch.float64) for s in factor_shapes(C, Co, R)]

    def reference(x, *fs):
        conv = torch.nn.Conv2d(
            C, Co, 3, stride=stride, padding=padding, padding_mode=padding_mode,
            bias=False,
        ).double()  # fmt: skip
        weight = torch.einsum(rebuild, *fs)
        return torch.func.functional_call(conv, {"weight": weight}, (x,))

    def ours(*ops):
        return conv_einsum(
            equation, *ops, stride=stride, padding=padding, padding_mode=padding_mode
        )

    expected = second_order(reference, operands, seed=1)
    got = second_order(ours, operands, seed=1)
    for g, e in zip(got, expected):
        e = torch.zeros_like(g) if e is None else e
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_gradgradcheck_grouped():
    """Groups as a shared letter, numerically against finite differences."""
    torch.manual_seed(2)
    x = torch.randn(1, 2, 2, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)

    def ours(x, w):
        return conv_einsum("ngch,gdch->ngdh|h", x, w, padding=1)

    def reference(x, w):
        out = F.conv1d(x.flatten(1, 2), w.flatten(0, 1), padding=1, groups=2)
        return out.unflatten(1, (2, 3))

    torch.testing.assert_close(ours(x, w), reference(x, w))
    assert torch.autograd.gradgradcheck(ours, (x, w))
