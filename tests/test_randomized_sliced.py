"""Sliced weight VJPs of the engine (tnbackpack.tn.sliced) against masked autograd."""

import pytest
import torch
from engine_cases import CONV_CASES, build_layer, close, random_cases
from hypothesis import given
from hypothesis import settings as hsettings
from randomized_reference import masked_weight_gradient, position_mask
from torch import nn

from tnbackpack.tn import sliced
from tnbackpack.tn.spec import ConvSpec

ROUTES = ("tn", "gather", "scatter")


def _draw_kept(spec, input_size, probability, seed):
    """Kept real positions per axis: every read position with ``probability``."""
    generator = torch.Generator().manual_seed(seed)
    kept = []
    for read in sliced.read_positions(spec, input_size):
        coin = torch.rand(len(read), generator=generator) < probability
        kept.append((read & coin).nonzero().squeeze(1))
    return kept


def _check_routes(case, probability, routes=ROUTES):
    layer = build_layer(case)
    x, spec = layer.x, layer.spec
    grad_output = layer.random_output_like()
    kept = _draw_kept(spec, x.shape[2:], probability, case["seed"])
    x_kept = x
    for d, rows in enumerate(kept):
        x_kept = x_kept.index_select(2 + d, rows)
    mask = position_mask(x, kept)
    expected = masked_weight_gradient(
        layer.apply, x, layer.weight, grad_output, mask, 1
    )
    for route in routes:
        actual = sliced.sliced_weight_vjp(
            spec, x_kept, kept, x.shape[2:], grad_output, route=route
        )
        close(actual, expected)


@pytest.mark.parametrize("case", CONV_CASES, ids=[c["name"] for c in CONV_CASES])
def test_sliced_weight_vjp_matches_masked_autograd(case):
    _check_routes(case, probability=0.6, routes=(*ROUTES, "auto"))


@pytest.mark.parametrize(
    "case", CONV_CASES[::4], ids=[c["name"] for c in CONV_CASES[::4]]
)
def test_every_position_kept_is_the_exact_gradient(case):
    """With every position kept, each route (and PyTorch's) is the exact gradient."""
    layer = build_layer(case)
    x, spec = layer.x, layer.spec
    grad_output = layer.random_output_like()
    kept = [torch.arange(size) for size in x.shape[2:]]
    w = layer.weight.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(layer.apply(x, w, None), w, grad_output)
    for route in (*ROUTES, "torch", "auto"):
        actual = sliced.sliced_weight_vjp(
            spec, x, kept, x.shape[2:], grad_output, route=route
        )
        close(actual, expected)


@hsettings(max_examples=25)
@given(case=random_cases(transposed=False))
def test_sliced_weight_vjp_random_layers(case):
    """Random layers, including asymmetric ``(left, right)`` padding."""
    _check_routes(case, probability=0.5)


def test_read_positions_skip_strided_rows():
    """A 1x1 stride-2 layer reads every other row, and nothing past the last window."""
    spec = ConvSpec.from_module(nn.Conv2d(1, 1, 1, stride=2))
    rows, cols = sliced.read_positions(spec, (7, 6))
    assert rows.tolist() == [True, False] * 3 + [True]
    assert cols.tolist() == [True, False] * 3
    spec = ConvSpec.from_module(nn.Conv1d(1, 1, 2, stride=2))
    (only,) = sliced.read_positions(spec, (5,))
    assert only.tolist() == [True, True, True, True, False]


def test_nothing_kept_gives_zeros():
    spec = ConvSpec.from_module(nn.Conv2d(2, 3, 3, padding=1))
    x = torch.randn(2, 2, 0, 4)
    kept = [torch.zeros(0, dtype=torch.long), torch.arange(4)]
    gy = torch.randn(2, 3, 5, 4)
    gw = sliced.sliced_weight_vjp(spec, x, kept, (5, 4), gy)
    assert torch.equal(gw, torch.zeros(3, 2, 3, 3))


def test_sliced_weight_vjp_errors():
    spec = ConvSpec.from_module(nn.Conv1d(2, 3, 3))
    x, gy = torch.randn(2, 2, 4), torch.randn(2, 3, 6)
    kept = [torch.tensor([0, 2, 5, 7])]
    with pytest.raises(ValueError, match="route must be one of"):
        sliced.sliced_weight_vjp(spec, x, kept, (8,), gy, route="fast")
    with pytest.raises(ValueError, match="every input position"):
        sliced.sliced_weight_vjp(spec, x, kept, (8,), gy, route="torch")
    with pytest.raises(ValueError, match="x_kept has shape"):
        sliced.sliced_weight_vjp(spec, x[:, :, :3], kept, (8,), gy)
    with pytest.raises(ValueError, match="grad_output has shape"):
        sliced.sliced_weight_vjp(spec, x, kept, (8,), gy[:, :, :5])
    transposed = ConvSpec.from_module(nn.ConvTranspose1d(2, 3, 3))
    with pytest.raises(ValueError, match="not transposed"):
        sliced.read_positions(transposed, (8,))


def test_sliced_index_pattern_rows():
    """The sliced pattern is the rows of the unpadded convolution's pattern."""
    positions = torch.tensor([0, 3, 4, 6])
    pattern = sliced.sliced_index_pattern(positions, 3, 3, 2, 1, torch.float64)
    for k in range(3):
        for a, i in enumerate(positions.tolist()):
            for o in range(3):
                assert pattern[k, a, o] == float(i == k + 2 * o)


def test_auto_route_by_channels():
    """Few input channels: PyTorch's kernel on the filled input; many: gather."""
    every_other = [torch.arange(0, 32, 2)] * 2
    rgb = ConvSpec.from_module(nn.Conv2d(3, 96, 3, padding=1))
    wide = ConvSpec.from_module(nn.Conv2d(64, 64, 3, padding=1))
    positions_rgb, _ = sliced.virtual_positions(rgb, (32, 32), every_other)
    assert sliced.sliced_weight_vjp_route(rgb, positions_rgb, (32, 32)) == "scatter"
    positions, _ = sliced.virtual_positions(wide, (32, 32), every_other)
    assert sliced.sliced_weight_vjp_route(wide, positions, (32, 32)) == "gather"


def test_scatter_needs_pytorch_kernels():
    spec = ConvSpec.from_kwargs(ndim=4, in_channels=1, out_channels=1, kernel_size=1)
    x, gy = torch.randn(1, 1, 1, 2, 2, 2), torch.randn(1, 1, 2, 2, 2, 2)
    kept = [torch.tensor([1]), torch.arange(2), torch.arange(2), torch.arange(2)]
    with pytest.raises(ValueError, match="route 'scatter' uses PyTorch's kernels"):
        sliced.sliced_weight_vjp(spec, x, kept, (2, 2, 2, 2), gy, route="scatter")
    close(
        sliced.sliced_weight_vjp(spec, x.double(), kept, (2, 2, 2, 2), gy.double()),
        sliced.sliced_weight_vjp(
            spec, x.double(), kept, (2, 2, 2, 2), gy.double(), route="tn"
        ),
    )
