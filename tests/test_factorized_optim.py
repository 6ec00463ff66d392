"""KFACPreconditioner on factorized layers: each factor as its stage's weight."""

from __future__ import annotations

import torch
from factorized_cases import Case, model_pair, stage_sequence
from torch import nn

from tnbackpack import backpack, extend
from tnbackpack.extensions import KFAC
from tnbackpack.optim import KFACPreconditioner


def preconditioned(model: nn.Module, x, y, damping=0.1):
    """Gradients after one preconditioner step (fresh factors, no averaging)."""
    extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    preconditioner = KFACPreconditioner(model, damping=damping, ema=0.0)
    model.zero_grad()
    torch.manual_seed(4)
    with backpack(KFAC(kfac_approx="reduce")):
        loss_fn(model(x), y).backward()
    preconditioner.step()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_same_as_on_the_stage_sequence():
    """CP with groups (stacked depthwise factors): as for the explicit stages."""
    case = Case("cp", 2, kwargs={"groups": 2, "padding": 1})
    model, _, x, y = *model_pair(case), case.x(), torch.tensor([0, 2, 1])
    stages = stage_sequence(model[2])
    sequence = nn.Sequential(*model[:2], *stages, *model[3:])
    ours = preconditioned(model, x, y)
    theirs = preconditioned(sequence, x, y)
    for i, name in enumerate(model[2].factors):
        expected = theirs[f"{2 + i}.weight"].reshape(ours[f"2.{name}"].shape)
        torch.testing.assert_close(ours[f"2.{name}"], expected)
    torch.testing.assert_close(ours["0.weight"], theirs["0.weight"])


def test_tensor_ring_input_core_by_kronecker_product():
    """The TR input core [r_0, r_z, C] is viewed as its stage weight [r_0·r_z, C]."""
    case = Case("tr", 2)
    model, _, x, y = *model_pair(case), case.x(), torch.tensor([0, 2, 1])
    extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    core = model[2].input_core
    with backpack(KFAC(kfac_approx="expand")):
        loss_fn(model(x), y).backward()
    b, a = core.kfac
    grad = core.grad.clone()
    damping = 0.05
    curvature = torch.kron(b, a) + damping * torch.eye(b.shape[0] * a.shape[0]).double()
    expected = torch.linalg.solve(curvature, grad.flatten()).reshape(grad.shape)
    preconditioner = KFACPreconditioner(model, damping=damping, ema=0.0)
    preconditioner.step()
    torch.testing.assert_close(core.grad, expected)
