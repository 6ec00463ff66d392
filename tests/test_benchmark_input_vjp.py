"""Smoke test of the input-VJP route benchmark (timings are not checked)."""

import torch
from torch import nn

from tnbackpack.benchmark import input_vjp
from tnbackpack.tn import ConvSpec, autotune


def test_one_row_and_case_sizes():
    autotune.clear()
    conv = nn.Conv2d(4, 8, 1, bias=False)
    layer = input_vjp.Layer(
        "1x1", ConvSpec.from_module(conv), conv.weight.detach(), (5, 5), (5, 5)
    )
    row = input_vjp.measure(layer, batch=2, vectors=3, repeats=1)
    assert row.auto_route in ("tn", "torch")
    assert min(row.tn_ms, row.torch_ms, row.auto_ms) > 0
    assert "auto/best" in row.line()
    autotune.clear()
    model = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.ReLU())
    sizes = input_vjp.conv_sizes(model, torch.zeros(1, 1, 9, 9))
    assert sizes == {model[0]: ((9, 9), (4, 4))}
    assert len(list(input_vjp.grid_layers())) == 3 * len(input_vjp.GRID_1X1)
