"""The input VJP's ``auto`` route: the model's rule, one-time measurement, results.

References are PyTorch's own convolution differentiated by ``torch.func.vjp``.
"""

import pytest
import torch
from torch import nn
from torch.func import vjp

from tnbackpack.tn import ConvSpec, autotune, functional


@pytest.fixture(autouse=True)
def fresh_choices():
    autotune.clear()
    yield
    autotune.clear()


def reference(layer: nn.Module, grad_outputs, input_size):
    """Input VJPs of ``layer`` for each of ``grad_outputs [V, N, C_out, *O]``."""
    x = torch.zeros(grad_outputs.shape[1], layer.in_channels, *input_size).double()
    _, pull_back = vjp(layer, x)
    return torch.stack([pull_back(g)[0] for g in grad_outputs])


@pytest.mark.parametrize(
    "layer, route",
    [
        (nn.Conv2d(4, 16, 1), "torch"),  # widening 1x1: kernel reads in chunks
        (nn.Conv2d(16, 4, 1), "tn"),  # narrowing 1x1
        (nn.Conv2d(16, 16, 1, groups=16), "tn"),  # depthwise 1x1
        (nn.Conv3d(2, 8, 1, groups=2), "torch"),
        (nn.Conv2d(4, 16, 1, stride=2), "tn"),  # down-sampling shortcut
        (nn.Conv2d(3, 8, 4, stride=4), "tn"),  # patchify
        (nn.Conv2d(4, 4, 3, padding=1), "torch"),  # overlapping windows
        (nn.ConvTranspose2d(4, 16, 1), "torch"),
    ],
)
def test_model_rule(layer, route):
    assert functional.input_vjp_route(ConvSpec.from_module(layer)) == route


def test_rule_beyond_three_dimensions_is_the_network():
    spec = ConvSpec.from_kwargs(4, 2, 8, 1)
    assert functional.input_vjp_route(spec) == "tn"
    assert not functional.input_vjp_measured(spec)


@pytest.mark.parametrize(
    "layer, size, measured",
    [
        (nn.Conv2d(3, 8, 1), (5, 5), True),
        (nn.Conv2d(8, 4, 1, groups=2), (5, 5), True),
        (nn.Conv1d(2, 6, 2, stride=3), (10,), True),
        (nn.Conv2d(3, 4, 3, padding=1), (5, 5), False),
        (nn.ConvTranspose2d(4, 6, 1), (5, 5), False),
    ],
)
def test_measured_once_and_correct(layer, size, measured):
    """Windowed convolutions are timed once per key; either route is exact."""
    torch.manual_seed(0)
    layer = layer.double().requires_grad_(False)
    spec = ConvSpec.from_module(layer)
    x = torch.zeros(2, layer.in_channels, *size, dtype=torch.float64)
    grad_outputs = torch.randn(3, *layer(x).shape, dtype=torch.float64)
    expected = reference(layer, grad_outputs, size)
    key = functional.input_vjp_key(spec, grad_outputs, size, True)

    def auto():
        return functional.input_vjp(spec, grad_outputs, layer.weight, size, True)

    first = auto()
    choice = autotune.remembered(key)
    assert (choice in ("tn", "torch")) if measured else choice is None
    again = auto()
    assert autotune.remembered(key) == choice
    assert len(autotune.choices()) == int(measured)
    for result in (first, again):
        torch.testing.assert_close(result, expected, rtol=1e-10, atol=1e-12)


def test_model_policy_is_the_rule_bit_for_bit(monkeypatch):
    monkeypatch.setattr(autotune, "POLICY", "model")
    layer = nn.Conv2d(4, 12, 1).double()
    spec = ConvSpec.from_module(layer)
    grad_outputs = torch.randn(2, 3, 12, 6, 6, dtype=torch.float64)
    weight = layer.weight.detach()
    auto = functional.input_vjp(spec, grad_outputs, weight, (6, 6), True)
    rule = functional.input_vjp(spec, grad_outputs, weight, (6, 6), True, route="torch")
    assert autotune.choices() == {}
    assert torch.equal(auto, rule)
