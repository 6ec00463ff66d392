"""KFACPreconditioner against a dense reference built from the same factors.

The reference writes each parameter block out explicitly (row-major
flattening, per group, transposed for ConvTranspose), forms ``B ⊗ A + λ I``
densely and solves the linear system; the preconditioner must give the same
gradient. This checks the preconditioner's algebra and layouts, not the
factors themselves (those are tested with the extensions).
"""

from __future__ import annotations

from typing import List

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from tnbackpack import backpack, extend
from tnbackpack.optim import KFACPreconditioner

DAMPING = 0.3


def random_spd(groups: int, size: int, generator: torch.Generator) -> Tensor:
    """Stacked symmetric positive semi-definite matrices ``[G, d, d]``."""
    root = torch.randn(groups, size, size + 1, dtype=torch.float64, generator=generator)
    return root @ root.transpose(1, 2) / size


def weight_blocks(module: nn.Module, weight: Tensor, groups: int) -> List[Tensor]:
    """Per group, the matrix whose row-major flattening ``B ⊗ A`` acts on."""
    blocks = []
    for g in range(groups):
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            rows = weight.shape[0] // groups
            part = weight[g * rows : (g + 1) * rows].transpose(0, 1)
        else:
            rows = weight.shape[0] // groups
            part = weight[g * rows : (g + 1) * rows]
        blocks.append(part.reshape(part.shape[0], -1))
    return blocks


def dense_reference(
    module: nn.Module, grad: Tensor, factors: List[Tensor], is_weight: bool
) -> Tensor:
    """Solve ``(B ⊗ A + λ I) x = g`` densely, group by group."""
    groups = factors[0].shape[0]
    result = torch.empty_like(grad)
    if not is_weight:
        size = grad.numel() // groups
        for g in range(groups):
            matrix = factors[0][g] + DAMPING * torch.eye(size, dtype=grad.dtype)
            piece = grad[g * size : (g + 1) * size]
            result[g * size : (g + 1) * size] = torch.linalg.solve(matrix, piece)
        return result
    rows = grad.shape[0] // groups
    for g, block in enumerate(weight_blocks(module, grad, groups)):
        kron = torch.kron(factors[0][g], factors[1][g])
        matrix = kron + DAMPING * torch.eye(kron.shape[0], dtype=grad.dtype)
        solved = torch.linalg.solve(matrix, block.flatten())
        part = result[g * rows : (g + 1) * rows]
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            part = part.transpose(0, 1)
        part.copy_(solved.reshape(part.shape))
    return result


LAYERS = {
    "linear": lambda: nn.Linear(5, 3),
    "conv1d": lambda: nn.Conv1d(2, 3, 3),
    "conv2d": lambda: nn.Conv2d(2, 4, (2, 3)),
    "conv2d-groups": lambda: nn.Conv2d(4, 6, 2, groups=2),
    "conv3d": lambda: nn.Conv3d(2, 2, (1, 2, 2)),
    "convT1d": lambda: nn.ConvTranspose1d(3, 2, 3),
    "convT2d-groups": lambda: nn.ConvTranspose2d(4, 6, 2, groups=2),
    "convT3d-groups": lambda: nn.ConvTranspose3d(6, 3, (2, 1, 2), groups=3),
}


def block_sizes(module: nn.Module, groups: int):
    weight = module.weight
    block = weight_blocks(module, weight, groups)[0]
    return block.shape[0], block.shape[1]


def precondition_once(module: nn.Module, stacked: bool, seed: int):
    """Store random factors and gradients, run one step; return all pieces."""
    generator = torch.Generator().manual_seed(seed)
    module = module.double()
    groups = getattr(module, "groups", 1)
    rows, columns = block_sizes(module, groups)
    weight_factors = [
        random_spd(groups, rows, generator),
        random_spd(groups, columns, generator),
    ]
    bias_factors = [weight_factors[0]]
    grads = {}
    for name, factors in (("weight", weight_factors), ("bias", bias_factors)):
        param = getattr(module, name)
        param.grad = torch.randn(param.shape, dtype=param.dtype, generator=generator)
        grads[name] = param.grad.clone()
        param.kfac = [f if stacked else f.squeeze(0) for f in factors]
    preconditioner = KFACPreconditioner(module, damping=DAMPING, ema=0.5)
    preconditioner.step()
    return module, grads, {"weight": weight_factors, "bias": bias_factors}


@pytest.mark.parametrize("name", list(LAYERS))
def test_matches_dense_inverse(name: str):
    module = LAYERS[name]()
    groups = getattr(module, "groups", 1)
    for stacked in (True, False) if groups == 1 else (True,):
        module, grads, factors = precondition_once(LAYERS[name](), stacked, seed=0)
        for param_name in ("weight", "bias"):
            expected = dense_reference(
                module, grads[param_name], factors[param_name], param_name == "weight"
            )
            actual = getattr(module, param_name).grad
            assert actual.shape == expected.shape
            torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
            # the factors were consumed
            assert not hasattr(getattr(module, param_name), "kfac")


@settings(max_examples=15)
@given(
    groups=st.integers(1, 3),
    c_in=st.integers(1, 2),
    c_out=st.integers(1, 2),
    kernel=st.tuples(st.integers(1, 2), st.integers(1, 3)),
    transposed=st.booleans(),
    seed=st.integers(0, 100),
)
def test_sweep_conv2d(groups, c_in, c_out, kernel, transposed, seed):
    cls = nn.ConvTranspose2d if transposed else nn.Conv2d
    module, grads, factors = precondition_once(
        cls(c_in * groups, c_out * groups, kernel, groups=groups), True, seed
    )
    for param_name in ("weight", "bias"):
        expected = dense_reference(
            module, grads[param_name], factors[param_name], param_name == "weight"
        )
        torch.testing.assert_close(
            getattr(module, param_name).grad, expected, rtol=1e-10, atol=1e-12
        )


def test_running_average_and_refresh():
    layer = nn.Linear(3, 2, bias=False).double()
    preconditioner = KFACPreconditioner(layer, damping=1.0, update_every=2, ema=0.75)
    eye_b, eye_a = torch.eye(2, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    grad = torch.ones(2, 3, dtype=torch.float64)

    layer.weight.kfac = [eye_b, eye_a]
    layer.weight.grad = grad.clone()
    preconditioner.step()  # running factors I, I -> (1 + 1)^-1
    torch.testing.assert_close(layer.weight.grad, grad / 2)

    layer.weight.kfac = [5 * eye_b, eye_a]
    layer.weight.grad = grad.clone()
    preconditioner.step()  # averaged to 2·I, but the inverse is not refreshed yet
    torch.testing.assert_close(preconditioner.state()["weight"][0][0], 2 * eye_b)
    torch.testing.assert_close(layer.weight.grad, grad / 2)

    layer.weight.grad = grad.clone()  # no new factors: the averages are reused
    preconditioner.step()  # refresh: (2 + 1)^-1
    torch.testing.assert_close(layer.weight.grad, grad / 3)


def test_errors():
    layer = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="damping"):
        KFACPreconditioner(layer, damping=0.0)
    preconditioner = KFACPreconditioner(layer)
    layer.weight.grad = torch.zeros_like(layer.weight)
    with pytest.raises(RuntimeError, match="no Kronecker factors for weight"):
        preconditioner.step()
    layer.weight.kfac = [torch.eye(3), torch.eye(3)]
    with pytest.raises(ValueError, match="weight.*does not fit"):
        preconditioner.step()


@pytest.mark.filterwarnings("ignore:Full backward hook")
@pytest.mark.parametrize("approx", ["backpack", "reduce"])
def test_with_tnbackpack_kfac_groups(approx: str):
    """tnbackpack's stacked factors of grouped (transposed) convolutions fit."""
    from tnbackpack.extensions import KFAC

    torch.manual_seed(0)
    model = extend(
        nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2),
            nn.ReLU(),
            nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(6 * 6 * 6, 3),
        ).double()
    )
    loss_function = extend(nn.CrossEntropyLoss())
    X, y = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    with backpack(KFAC(kfac_approx=approx)):
        loss_function(model(X), y).backward()
    assert model[2].weight.kfac[0].shape == (2, 3, 3)  # stacked per group
    factors = {
        name: [f.clone() for f in p.kfac] for name, p in model.named_parameters()
    }
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    KFACPreconditioner(model, damping=DAMPING).step()
    for name, param in model.named_parameters():
        module = model[int(name.split(".")[0])]
        stacked = [f if f.ndim == 3 else f.unsqueeze(0) for f in factors[name]]
        expected = dense_reference(
            module, grads[name], stacked, name.endswith("weight")
        )
        torch.testing.assert_close(param.grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_with_backpack_kfac():
    """End to end with BackPACK's KFAC: factors are read from a real backward."""
    from backpack.extensions import KFAC

    torch.manual_seed(0)
    model = extend(
        nn.Sequential(
            nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)
        ).double()
    )
    loss_function = extend(nn.CrossEntropyLoss())
    X, y = torch.randn(8, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    with backpack(KFAC()):
        loss_function(model(X), y).backward()
    factors = {
        name: [f.clone() for f in p.kfac] for name, p in model.named_parameters()
    }
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    KFACPreconditioner(model, damping=DAMPING).step()
    for name, param in model.named_parameters():
        module = model[int(name.split(".")[0])]
        stacked = [f.unsqueeze(0) for f in factors[name]]
        expected = dense_reference(
            module, grads[name], stacked, name.endswith("weight")
        )
        torch.testing.assert_close(param.grad, expected, rtol=1e-10, atol=1e-12)
