"""Contraction plans and index patterns are built once and then reused."""

import torch
import torch.nn.functional as F

from tnbackpack.tn import ConvSpec
from tnbackpack.tn import functional as engine
from tnbackpack.tn.network import plan
from tnbackpack.tn.pattern import index_pattern

# Unusual sizes, so that no other test has planned these shapes before.
SPEC = ConvSpec.from_kwargs(
    2, 3, 5, kernel_size=(5, 2), stride=(3, 1), padding=(2, 1), dilation=(1, 3)
)
SHAPE = (3, 3, 17, 13)


def conv(x, w):
    return F.conv2d(x, w, stride=(3, 1), padding=(2, 1), dilation=(1, 3))


def test_second_call_reuses_plan_and_patterns():
    torch.manual_seed(0)
    w = torch.randn(SPEC.weight_shape(), dtype=torch.float64)
    engine.forward(SPEC, torch.randn(SHAPE, dtype=torch.float64), w)
    plans, patterns = plan.cache_info(), index_pattern.cache_info()

    x = torch.randn(SHAPE, dtype=torch.float64)
    y = engine.forward(SPEC, x, w)

    assert plan.cache_info().misses == plans.misses
    assert plan.cache_info().hits > plans.hits
    assert index_pattern.cache_info().misses == patterns.misses
    assert index_pattern.cache_info().hits >= patterns.hits + SPEC.ndim
    # the cached plan is applied to the new data, not to stale operands
    torch.testing.assert_close(y, conv(x, w), rtol=1e-10, atol=1e-12)


def test_new_resolution_plans_again_with_the_same_spec():
    w = torch.randn(SPEC.weight_shape(), dtype=torch.float64)
    engine.forward(SPEC, torch.randn(SHAPE, dtype=torch.float64), w)
    misses = plan.cache_info().misses
    x = torch.randn(2, 3, 19, 14, dtype=torch.float64)
    y = engine.forward(SPEC, x, w)
    assert plan.cache_info().misses == misses + 1
    torch.testing.assert_close(y, conv(x, w), rtol=1e-10, atol=1e-12)


def test_patterns_are_shared_and_follow_the_dtype():
    args = (17, 7, 5, 3, 2, 1, "zeros", False, torch.device("cpu"))
    first = index_pattern(*args, torch.float64)
    assert index_pattern(*args, torch.float64) is first
    assert index_pattern(*args, torch.float32).dtype == torch.float32

    w = torch.randn(SPEC.weight_shape())
    x = torch.randn(SHAPE)
    y = engine.forward(SPEC, x, w)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, conv(x, w), rtol=1e-5, atol=1e-5)


def test_patterns_are_built_only_for_contracted_networks():
    # An 80-tap Conv1d's pattern [80, 4000, 981] is 1.2 GB; routes that do not
    # contract a network (and argument checks) must not build it.
    # (smaller sizes here, same code path)
    spec = ConvSpec.from_kwargs(1, 1, 4, kernel_size=20, stride=4)
    x = torch.randn(2, 1, 400, dtype=torch.float64)
    w = torch.randn(spec.weight_shape(), dtype=torch.float64)
    gy = torch.randn(3, 2, 4, 96, dtype=torch.float64)  # 3 vectors
    misses = index_pattern.cache_info().misses
    per_sample = engine.per_sample_weight_vjp(spec, x, gy, vectors=True, route="unfold")
    engine.weight_vjp(spec, x, gy[0], route="torch")
    engine.input_vjp(spec, gy, w, (400,), vectors=True, route="torch")
    assert index_pattern.cache_info().misses == misses
    # the network route still builds (and caches) it when it runs
    torch.testing.assert_close(
        engine.per_sample_weight_vjp(spec, x, gy, vectors=True, route="tn"), per_sample
    )
    assert index_pattern.cache_info().misses == misses + 1
