"""cockpit on tnbackpack's conv rules through ``tnbackpack.enable()``.

cockpit's quantities construct BackPACK's ``BatchGrad``, ``DiagHessian`` (and
hooks on their results) inside cockpit. Three SGD steps of a small CNN with
the "economy" and "business" presets: every tracked value equals stock
BackPACK's where BackPACK is right (zero padding, groups), also for "full"
(``create_graph=True`` for HessMaxEV, float32: cockpit's HessMaxEV refuses
float64); with circular
padding, where stock BackPACK is wrong, ``HessTrace``, ``NormTest``,
``InnerTest`` and ``OrthoTest`` equal torch.func references (the Hessian
diagonal; the tests' definitions in the papers cockpit cites, on per-sample
gradients). Skipped without cockpit
(the optional ``clients`` extra, which pins ``setuptools<81`` for its
``pkg_resources`` import).
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Dict

import clients_common as common
import pytest
import torch
from clients_common import switched_off  # noqa: F401
from torch import nn
from torch.func import functional_call, grad, hessian, vmap

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # cockpit's pkg_resources deprecation warning
    cockpit = pytest.importorskip("cockpit")

from backpack import extend  # noqa: E402
from cockpit.utils.configuration import configuration  # noqa: E402

from tnbackpack.benchmark.clients import cockpit_step  # noqa: E402

DTYPE = common.DTYPE
BATCH = 6
STEPS = 3


def cnn(padding_mode: str) -> nn.Sequential:
    return common.cnn(padding_mode, groups=2, size=5)


def batches():
    for step in range(STEPS):
        yield common.data(BATCH, 5, seed=step)


def train(preset: str, padding_mode: str, switched: bool, dtype=DTYPE):
    """cockpit's output and, per step, the parameters and batch it saw."""
    model = extend(cnn(padding_mode).to(dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker = cockpit.Cockpit(model.parameters(), quantities=configuration(preset))
    seen = []
    with common.switch(switched):
        for step, (x, y) in enumerate(batches()):
            x = x.to(dtype)
            seen.append(
                ({n: p.detach().clone() for n, p in model.named_parameters()}, x, y)
            )
            torch.manual_seed(step)  # HessMaxEV's random start vector
            cockpit_step(tracker, model, optimizer, x, y, step)
    return tracker.get_output(), seen


def flat(value) -> torch.Tensor:
    """Any cockpit value (number, list, dict, array) as one float64 vector."""
    if isinstance(value, dict):
        return torch.cat([flat(value[k]) for k in sorted(value)] or [torch.zeros(0)])
    if isinstance(value, (list, tuple)):
        return torch.cat([flat(v) for v in value] or [torch.zeros(0)])
    return torch.as_tensor(value, dtype=DTYPE).flatten()


def assert_outputs_equal(actual: Dict, expected: Dict, rtol=1e-9, atol=1e-12):
    assert actual.keys() == expected.keys()
    for step in expected:
        assert actual[step].keys() == expected[step].keys()
        for name in expected[step]:
            torch.testing.assert_close(
                flat(actual[step][name]),
                flat(expected[step][name]),
                rtol=rtol,
                atol=atol,
                msg=f"step {step}, {name}",
            )


@pytest.mark.parametrize("preset", ["economy", "business"])
def test_equal_to_stock_backpack_where_it_is_right(preset):
    expected, _ = train(preset, "zeros", switched=False)
    actual, _ = train(preset, "zeros", switched=True)
    assert_outputs_equal(actual, expected)


def test_full_preset_with_create_graph_equals_stock():
    """ "full" adds HessMaxEV: Hessian-vector products through the graph that
    ``backward(create_graph=True)`` builds around the extensions' results.
    cockpit's HessMaxEV works in float32 only ("Float did not match Double").
    """
    expected, _ = train("full", "zeros", switched=False, dtype=torch.float32)
    actual, _ = train("full", "zeros", switched=True, dtype=torch.float32)
    assert any("HessMaxEV" in values for values in actual.values())
    assert_outputs_equal(actual, expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------- torch.func references
def reference_quantities(params: Dict, x, y) -> Dict[str, object]:
    """``HessTrace`` (per parameter) and the three gradient tests, mean loss.

    Norm test (Byrd et al. 2012, eq. 3.9), inner-product and orthogonality
    tests (Bollapragada et al. 2018, eqs. 2.6 and 3.3), from the sample
    variances of the per-sample gradients ``∇ℓ_n`` around their mean ``ḡ``.
    """
    model = copy.deepcopy(cnn("circular"))
    loss_fn = nn.CrossEntropyLoss()

    def loss(p, inputs, targets):
        return loss_fn(functional_call(model, p, (inputs,)), targets)

    traces = [
        torch.diagonal(h.flatten(0, h.ndim // 2 - 1).flatten(1)).sum().item()
        for h in (hessian(loss)(params, x, y)[name][name] for name in params)
    ]
    per_sample = vmap(grad(loss), (None, 0, 0))(params, x[:, None], y[:, None])
    g = torch.cat([v.flatten(1) for v in per_sample.values()], dim=1)  # [N, P]
    n, mean = g.shape[0], g.mean(0)
    mean_sq = mean @ mean
    projections = g @ mean
    orthogonal = g - projections[:, None] / mean_sq * mean
    norm_var = ((g - mean) ** 2).sum() / (n - 1)
    inner_var = ((projections - mean_sq) ** 2).sum() / (n - 1)
    ortho_var = (orthogonal**2).sum() / (n - 1)
    return {
        "HessTrace": traces,
        "NormTest": math.sqrt(norm_var / n / mean_sq),
        "InnerTest": math.sqrt(inner_var / n / mean_sq**2),
        "OrthoTest": math.sqrt(ortho_var / n / mean_sq),
    }


def test_equal_to_torch_func_where_backpack_is_wrong():
    """Circular padding: stock BackPACK's values are off, the switched ones exact."""
    stock, _ = train("business", "circular", switched=False)
    actual, seen = train("business", "circular", switched=True)
    for step, (params, x, y) in enumerate(seen):
        truth = reference_quantities(params, x, y)
        for name, value in truth.items():
            torch.testing.assert_close(
                flat(actual[step][name]), flat(value), rtol=1e-9, atol=1e-12
            )
            off = (flat(stock[step][name]) - flat(value)).abs().max()
            assert off > 1e-6 * flat(value).abs().max(), name
