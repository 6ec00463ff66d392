"""Statistical tests of the sampled weight gradient: unbiasedness and variance.

Deterministic: every draw comes from a seeded generator. Unbiasedness is a
per-entry z-test of the mean of many draws against PyTorch's exact gradient,
with a Bonferroni bound over the entries (family-wise error 1e-4 if the
estimator is unbiased). The same test rejects the estimator without its 1/p
scaling, so it has the power to see a bias of that size. The mean squared
error is compared with the variance formulas of docs/randomized.md.
"""

import itertools
from statistics import NormalDist

import pytest
import torch
from torch import nn

from tnbackpack.randomized import SampledConv

DRAWS = 2000
FAMILY_ERROR = 1e-4

LAYERS = {
    "2d-stride-reflect": (
        lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="reflect"),
        (3, 2, 7, 6),
    ),
    "1d-dilated-same": (
        lambda: nn.Conv1d(2, 2, 3, padding="same", dilation=2),
        (4, 2, 9),
    ),
    "3d-groups": (lambda: nn.Conv3d(4, 2, 2, padding=1, groups=2), (2, 4, 3, 4, 3)),
}


def _setup(name):
    build, shape = LAYERS[name]
    torch.manual_seed(0)
    conv = build().double()
    x = torch.randn(*shape, dtype=torch.float64)
    grad_output = torch.randn_like(conv(x))
    (exact,) = torch.autograd.grad(conv(x), conv.weight, grad_output)
    return conv, x, grad_output, exact


def _draws(conv, x, grad_output, keep, mode, seed=0):
    generator = torch.Generator().manual_seed(seed)
    layer = SampledConv(conv, keep=keep, sample=mode, generator=generator)
    return torch.stack(
        [
            torch.autograd.grad(layer(x), layer.weight, grad_output)[0]
            for _ in range(DRAWS)
        ]
    )


def _max_abs_z(draws, exact):
    mean, std = draws.mean(0), draws.std(0)
    constant = std == 0  # e.g. entries no sampled slice contributes to
    assert torch.allclose(mean[constant], exact[constant])
    z = (mean - exact)[~constant] / (std[~constant] / DRAWS**0.5)
    return z.abs().max().item(), int((~constant).sum())


def _bonferroni(entries):
    return NormalDist().inv_cdf(1 - FAMILY_ERROR / (2 * entries))


#: The default run covers every mode on one layer and spatial sampling on all
#: layers; the rest (another ~15 s) runs with ``-m slow``.
UNBIASED_CASES = [
    pytest.param(name, mode, marks=[] if fast else pytest.mark.slow)
    for name in LAYERS
    for mode in ("spatial", "channels", "batch")
    for fast in [name == "2d-stride-reflect" or mode == "spatial"]
]


@pytest.mark.parametrize("name, mode", UNBIASED_CASES)
def test_mean_of_draws_is_the_exact_gradient(name, mode):
    conv, x, grad_output, exact = _setup(name)
    keep = 0.4
    draws = _draws(conv, x, grad_output, keep, mode)
    z, entries = _max_abs_z(draws, exact)
    bound = _bonferroni(entries)
    assert z < bound, f"max |z| = {z:.2f} over {entries} entries, bound {bound:.2f}"
    # power: the same draws without the 1/p scaling are rejected
    assert _max_abs_z(draws * keep, exact)[0] > bound
    # and the estimate is random (not the exact gradient in disguise)
    assert (draws - exact).abs().max() > 1e-3 * exact.abs().max()


def _contributions(conv, x, grad_output):
    """Weight-gradient contribution of every input position (masking one at a time)."""
    parts = {}
    for index in itertools.product(*(range(s) for s in x.shape[2:])):
        mask = torch.zeros_like(x)
        mask[(slice(None), slice(None), *index)] = 1
        w = conv.weight.detach().clone().requires_grad_(True)
        (part,) = torch.autograd.grad(
            conv._conv_forward(x * mask, w, None), w, grad_output
        )
        parts[index] = part
    return parts


def _spatial_variance(parts, ndim, per_axis):
    """Σ over non-empty axis sets S of (1/q − 1)^|S| Σ_{a_S} ‖Σ_{a_rest} c_a‖²."""
    total = 0.0
    for size in range(1, ndim + 1):
        for axes in itertools.combinations(range(ndim), size):
            sums = {}
            for index, part in parts.items():
                key = tuple(index[d] for d in axes)
                sums[key] = sums.get(key, 0) + part
            squares = sum(s.square().sum().item() for s in sums.values())
            total += (1 / per_axis - 1) ** size * squares
    return total


@pytest.mark.parametrize("mode", ["spatial", "channels", "batch"])
def test_mean_squared_error_matches_the_variance_formula(mode):
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False).double()
    x = torch.randn(3, 2, 5, 4, dtype=torch.float64)
    grad_output = torch.randn(3, 3, 5, 4, dtype=torch.float64)
    (exact,) = torch.autograd.grad(conv(x), conv.weight, grad_output)
    keep = 0.3
    draws = _draws(conv, x, grad_output, keep, mode, seed=2)
    measured = (draws - exact).square().sum((1, 2, 3, 4)).mean().item()
    factor = (1 - keep) / keep
    if mode == "channels":  # whole input-channel columns of G are dropped
        predicted = factor * exact.square().sum().item()
    elif mode == "batch":
        per_sample = [
            torch.autograd.grad(
                conv(x[n : n + 1]), conv.weight, grad_output[n : n + 1]
            )[0]
            for n in range(3)
        ]
        predicted = factor * sum(g.square().sum().item() for g in per_sample)
    else:
        parts = _contributions(conv, x, grad_output)
        predicted = _spatial_variance(parts, 2, keep**0.5)
    assert abs(measured / predicted - 1) < 0.1, (measured, predicted)
