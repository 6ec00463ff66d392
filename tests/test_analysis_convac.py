"""ConvACs, their coefficient networks and grid tensors against explicit references."""

from __future__ import annotations

import copy
import itertools
import subprocess
import sys

import pytest
import torch

from tnbackpack.analysis import (
    block_windows,
    coefficient_network,
    contiguous_windows,
    deep_convac,
    grid_tensor,
    matricize,
    mirror_windows,
    shallow_convac,
)

DTYPE = torch.float64


def reference_forward(model, x):
    """h by explicit loops: per node a matrix-vector product, per window a product."""
    outputs = []
    for sample in x:
        nodes = [sample[i] for i in range(model.num_patches)]
        for weight, wins in zip(model.weights, model.windows):
            weight = weight.detach().to(DTYPE)
            mapped = [
                (weight if model.shared else weight[k]) @ v for k, v in enumerate(nodes)
            ]
            pooled = []
            for window in wins:
                value = torch.ones_like(mapped[window[0]])
                for k in window:
                    value = value * mapped[k]
                pooled.append(value)
            nodes = pooled
        outputs.append(nodes[0] @ model.output)
    return torch.stack(outputs)


def double(model):
    model = copy.deepcopy(model).to(DTYPE)
    model.output.data = model.output.data.to(DTYPE)
    return model


CASES = [
    dict(n=8, f=2, widths=[2, 3, 4], windows=None, shared=False),
    dict(n=8, f=3, widths=[2, 2, 2], windows=None, shared=True),
    dict(n=8, f=2, widths=[3, 2, 2], windows=mirror_windows(8), shared=False),
    dict(n=16, f=2, widths=[2, 3], windows=block_windows(4, 4), shared=True),
    dict(
        n=6,
        f=2,
        widths=[2, 3],
        windows=[[(0, 3, 5), (1, 2, 4)], [(0, 1)]],
        shared=False,
    ),
]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"n{c['n']}-{c['widths']}-{c['shared']}"
)
def test_forward_matches_loops(case):
    g = torch.Generator().manual_seed(0)
    model = double(
        deep_convac(
            case["n"], case["f"], case["widths"], case["windows"], case["shared"], g
        )
    )
    x = torch.randn(5, case["n"], case["f"], generator=g, dtype=DTYPE)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x), reference_forward(model, x), rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize(
    "case", CASES[:3] + CASES[4:], ids=lambda c: f"n{c['n']}-{c['widths']}"
)
def test_coefficient_tensor_is_the_multilinear_form(case):
    """h(x) = Σ_d 𝒜[d] Π_i x_{i,d_i}, with 𝒜 contracted by the engine."""
    g = torch.Generator().manual_seed(1)
    model = deep_convac(
        case["n"], case["f"], case["widths"], case["windows"], case["shared"], g
    )
    coefficients = coefficient_network(model).contract()
    assert coefficients.shape == (case["f"],) * case["n"]
    x = torch.randn(4, case["n"], case["f"], generator=g, dtype=DTYPE)
    expected = reference_forward(double(model), x)
    result = []
    for b in range(4):  # contract the legs one patch at a time
        value = coefficients
        for i in range(case["n"]):
            value = torch.tensordot(x[b, i], value, dims=([0], [0]))
        result.append(value)
    result = torch.stack(result)
    torch.testing.assert_close(result, expected, rtol=1e-10, atol=1e-12)


def test_grid_by_forward_passes_equals_engine_contraction():
    g = torch.Generator().manual_seed(2)
    model = deep_convac(8, 2, [2, 2, 2], mirror_windows(8), generator=g)
    templates = torch.randn(3, 2, generator=g, dtype=DTYPE)
    by_forward = grid_tensor(model, templates, 8, batch_size=1000)
    by_engine = coefficient_network(model, templates).contract()
    assert by_forward.shape == (3,) * 8 and by_forward.dtype == DTYPE
    torch.testing.assert_close(by_forward, by_engine, rtol=1e-11, atol=1e-12)
    # spot-check one entry against a direct evaluation
    d = (2, 0, 1, 1, 0, 2, 2, 1)
    direct = reference_forward(double(model), templates[list(d)][None])
    torch.testing.assert_close(by_forward[d], direct[0], rtol=1e-12, atol=1e-12)


def test_shallow_is_a_cp_decomposition():
    g = torch.Generator().manual_seed(3)
    model = shallow_convac(5, 3, 4, generator=g)
    weights = model.weights[0].detach().to(DTYPE)  # [nodes, width, features]
    cp = torch.einsum(
        "r,ra,rb,rc,rd,re->abcde",
        model.output.detach().to(DTYPE),
        *[weights[i] for i in range(5)],
    )
    torch.testing.assert_close(coefficient_network(model).contract(), cp)


def test_matricize_rows_and_columns():
    grid = torch.arange(2 * 3 * 2 * 2, dtype=DTYPE).reshape(2, 3, 2, 2)
    matrix = matricize(grid, [3, 1])
    assert matrix.shape == (6, 4)
    # row index = (d1, d3) mixed radix, column = (d0, d2)
    for d in itertools.product(range(2), range(3), range(2), range(2)):
        assert matrix[d[1] * 2 + d[3], d[0] * 2 + d[2]] == grid[d]


def test_geometries():
    assert contiguous_windows(8) == [
        [(0, 1), (2, 3), (4, 5), (6, 7)],
        [(0, 1), (2, 3)],
        [(0, 1)],
    ]
    assert mirror_windows(8)[0] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert block_windows(4, 4)[0][:2] == [(0, 1, 4, 5), (2, 3, 6, 7)]
    assert block_windows(4, 4)[1] == [(0, 1, 2, 3)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_patches=6, in_features=2, widths=[2, 2]), "power of two"),
        (dict(num_patches=4, in_features=2, widths=[2]), "one width per level"),
        (
            dict(num_patches=4, in_features=2, widths=[2], windows=[[(0, 1, 2, 2)]]),
            "exactly once",
        ),
        (
            dict(num_patches=4, in_features=2, widths=[2], windows=[[(0, 1), (2, 3)]]),
            "leaves 2 nodes",
        ),
        (dict(num_patches=4, in_features=2, widths=[0, 2]), "≥ 1"),
    ],
)
def test_bad_architectures_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        deep_convac(**kwargs)


def test_bad_inputs_raise():
    model = deep_convac(4, 2, [2, 2])
    with pytest.raises(ValueError, match=r"expects \(B, 4, 2\)"):
        model(torch.zeros(3, 4, 3))
    with pytest.raises(ValueError, match="max_entries=100"):
        grid_tensor(model, torch.eye(2), 8, max_entries=100)
    with pytest.raises(ValueError, match="templates must be"):
        coefficient_network(model, torch.eye(3))


def test_layering():
    """The analysis package uses the engine, not BackPACK; the engine does not
    import the analysis package."""
    code = (
        "import sys, tnbackpack.tn;"
        "engine = any(m.startswith('tnbackpack.analysis') for m in sys.modules);"
        "import tnbackpack.analysis;"
        "bp = any(m == 'backpack' or m.startswith('backpack.') for m in sys.modules);"
        "print(engine, bp)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False False"
