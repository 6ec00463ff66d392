"""One-time route measurement: cached per key, correct whatever it picks."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from tnbackpack.tn import ConvSpec, autotune, functional


def reference(layer, x, grad_outputs):
    def loss(weight, x_n, g_n):
        y_n = functional_call(layer, {"weight": weight}, (x_n.unsqueeze(0),))
        return (y_n.squeeze(0) * g_n).sum()

    per_vector = vmap(grad(loss), in_dims=(None, 0, 0))
    return torch.stack([per_vector(layer.weight, x, g) for g in grad_outputs])


@pytest.fixture(autouse=True)
def fresh_choices():
    autotune.clear()
    yield
    autotune.clear()


@pytest.mark.parametrize(
    "layer, size",
    [
        (nn.Conv2d(3, 4, 3, padding=1), (6, 6)),
        (nn.ConvTranspose2d(3, 4, 3, stride=2, output_padding=1), (3, 3)),
        (nn.Conv1d(2, 4, 5, stride=2, padding="valid"), (17,)),
    ],
)
def test_measured_route_is_cached_and_correct(layer, size):
    torch.manual_seed(0)
    layer = layer.double()
    spec = ConvSpec.from_module(layer)
    x = torch.randn(3, layer.in_channels, *size, dtype=torch.float64)
    grad_outputs = torch.randn(2, *layer(x).shape, dtype=torch.float64)
    expected = reference(layer, x, grad_outputs)

    first = functional.per_sample_weight_vjp(spec, x, grad_outputs, vectors=True)
    (choice,) = autotune.choices().values()
    assert choice in ("tn", "shifted", "unfold")
    again = functional.per_sample_weight_vjp(spec, x, grad_outputs, vectors=True)
    assert list(autotune.choices().values()) == [choice]
    torch.testing.assert_close(first, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(again, expected, rtol=1e-10, atol=1e-12)


def test_model_policy_measures_nothing(monkeypatch):
    monkeypatch.setattr(autotune, "POLICY", "model")
    layer = nn.Conv2d(3, 4, 3).double()
    spec = ConvSpec.from_module(layer)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    grad_output = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    route, _ = functional.per_sample_weight_vjp_route(spec, x, grad_output)
    result = functional.per_sample_weight_vjp(spec, x, grad_output)
    assert autotune.choices() == {}
    expected = functional.per_sample_weight_vjp(spec, x, grad_output, route=route)
    torch.testing.assert_close(result, expected, rtol=0, atol=0)


def test_fastest_retimes_close_candidates(monkeypatch):
    """A slow first run (one-time costs) does not lose a route the race."""
    clock = iter([0.0, 3.0, 3.0, 4.2, 4.2, 5.2, 5.2, 6.0, 6.0, 7.5])
    monkeypatch.setattr(autotune.time, "process_time", lambda: next(clock))
    runs = {"a": 0, "b": 0, "c": 0}

    def route(name):
        def run():
            runs[name] += 1
            return torch.tensor(float(runs[name]))

        return run

    # first runs: a 3.0, b 1.2, c 1.0 (x0.9 as the preferred route: 0.9); a is
    # not within 1.5x of the best, b and c run again: b 0.8, c 1.5 (x0.9)
    name, result = autotune.fastest("key", {n: route(n) for n in "abc"})
    assert (name, runs) == ("b", {"a": 1, "b": 2, "c": 2})
    assert result.item() == 2.0  # b's result, from its faster second run
    assert autotune.remembered("key") == "b"


def test_candidates_include_unfold_and_grouped_only_for_one_vector():
    spec = ConvSpec.from_kwargs(3, 8, 16, 3, padding=1)  # Conv3d: shifted hopeless
    x_shape, g_shape = (4, 8, 6, 6, 6), (4, 16, 6, 6, 6)
    one = functional._measured_candidates(spec, x_shape, g_shape, False, "unfold")
    many = functional._measured_candidates(
        spec, x_shape, (10, *g_shape), True, "unfold"
    )
    assert "unfold" in one and "grouped" in one
    assert "unfold" in many and "grouped" not in many
    assert one[-1] == many[-1] == "unfold"  # the model's route is timed last
