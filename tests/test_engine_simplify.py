"""The strided-window rewrite fires exactly where patterns are windows.

Numerical agreement of both paths is tested with every quantity; this checks
that those tests exercise the rewrite at all.
"""

import pytest
from engine_cases import NAMES, WINDOW_CASES, cached_layer, window_dims

from tnbackpack.tn import expressions
from tnbackpack.tn.simplify import simplify


def test_window_case_list_is_complete():
    every_dim = {name for name in NAMES if all(window_dims(cached_layer(name).spec))}
    assert every_dim == set(WINDOW_CASES)


@pytest.mark.parametrize("name", NAMES)
def test_rewrite_removes_exactly_the_window_patterns(name):
    layer = cached_layer(name)
    expected = sum(window_dims(layer.spec))
    gy = layer.random_output_like()
    networks = {
        "forward": expressions.forward(
            layer.spec, layer.x, layer.weight, layer.bias, layer.output_size
        ),
        "input_vjp": expressions.input_vjp(
            layer.spec, gy, layer.weight, layer.x.shape[2:]
        ),
        "weight_vjp": expressions.weight_vjp(layer.spec, layer.x, gy),
    }
    for quantity, tn in networks.items():
        assert len(tn.legs) == layer.spec.ndim, quantity
        removed = len(tn.operands) - len(simplify(tn).operands)
        assert removed == expected, quantity
