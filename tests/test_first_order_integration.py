"""First-order extensions inside BackPACK: API, combinations, frozen and no-grad parts.

Also pins where tnbackpack departs from BackPACK 1.7.1: equal where BackPACK is
right, right (against torch.func) where BackPACK is wrong or crashes.
"""

from __future__ import annotations

import copy
from importlib.metadata import version
from typing import Any, Dict, List

import backpack as backpack_package
import backpack.extensions as bp_extensions
import pytest
import torch
from models import conv_layer
from test_first_order import (
    EXTENSIONS,
    SAVEFIELDS,
    TOLERANCES,
    check_quantities,
    make_problem,
    per_sample_gradients,
    run_backpack,
)
from torch import Tensor, nn

import tnbackpack
from tnbackpack import extensions as tn_extensions
from tnbackpack.extensions.layer import CONV_TYPES
from tnbackpack.nn import FACTORIZED_CONV_TYPES

# PyTorch warns on every pass whose first layer input needs no gradient.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing:UserWarning"
)


def tn_extension(name: str) -> Any:
    return getattr(tn_extensions, name)()


def bp_extension(name: str) -> Any:
    return getattr(bp_extensions, name)()


def savefields_of(model: nn.Module, savefield: str) -> Dict[str, Tensor]:
    return {
        key: getattr(p, savefield)
        for key, p in model.named_parameters()
        if hasattr(p, savefield)
    }


def assert_same(actual: Dict[str, Tensor], expected: Dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    rtol, atol = TOLERANCES[torch.float64]
    for key, value in expected.items():
        scale = max(value.abs().max().item(), 1e-30)
        torch.testing.assert_close(actual[key], value, rtol=rtol, atol=atol * scale)


# ----------------------------------------------------------------------- API
@pytest.mark.parametrize("name", EXTENSIONS)
def test_drop_in_subclass(name: str) -> None:
    ext = tn_extension(name)
    assert isinstance(ext, getattr(bp_extensions, name))
    assert ext.savefield == SAVEFIELDS[name]
    assert ext.get_subsampling() is None


def _module_extensions(extension: Any) -> Dict[type, Any]:
    return extension._BackpropExtension__module_extensions  # BackPACK's private map


@pytest.mark.parametrize("name", EXTENSIONS)
def test_only_convolutions_are_replaced(name: str) -> None:
    """One tnbackpack rule for all six conv types; BackPACK's everywhere else.

    tnbackpack adds rules for its own factorized convolutions.
    """
    ours = _module_extensions(tn_extension(name))
    theirs = _module_extensions(bp_extension(name))  # built after ours: untouched
    assert ours.keys() == theirs.keys() | set(FACTORIZED_CONV_TYPES)
    for layer in FACTORIZED_CONV_TYPES:
        assert type(ours[layer]).__module__ == "tnbackpack.extensions.factorized"
    conv_rules = {id(ours[conv_type]) for conv_type in CONV_TYPES}
    assert len(conv_rules) == 1
    for layer, rule in theirs.items():
        if layer in CONV_TYPES:
            assert type(ours[layer]).__module__ == "tnbackpack.extensions.first_order"
            assert type(rule).__module__.startswith("backpack.")
        else:
            assert type(ours[layer]) is type(rule)


def test_batch_grad_keeps_subsampling_argument() -> None:
    assert tn_extensions.BatchGrad(subsampling=[3, 1]).get_subsampling() == [3, 1]


def test_reexports_backpack() -> None:
    assert tnbackpack.backpack is backpack_package.backpack
    assert tnbackpack.extend is backpack_package.extend


# ---------------------------------------------------- agreement with BackPACK
# Configurations where BackPACK 1.7.1 is right for every first-order quantity.
BACKPACK_RIGHT = {
    "Conv1d-k3-p1": (1, dict(out_channels=3, kernel_size=3, padding=1)),
    "Conv2d-k3-s2-p1": (2, dict(out_channels=3, kernel_size=3, stride=2, padding=1)),
    "Conv3d-k2-d2": (3, dict(out_channels=2, kernel_size=2, dilation=2)),
    "ConvTranspose1d-k2-s2": (
        1,
        dict(out_channels=3, kernel_size=2, stride=2, transposed=True),
    ),
    "ConvTranspose2d-k3-s2-p1": (
        2,
        dict(out_channels=3, kernel_size=3, stride=2, padding=1, transposed=True),
    ),
    "ConvTranspose3d-k2": (3, dict(out_channels=2, kernel_size=2, transposed=True)),
}


def _backpack_vs_tnbackpack(name: str, ndim: int, convs: List[Dict], **problem: Any):
    """Savefields of one problem under BackPACK's and under tnbackpack's extension."""
    model, loss_func, x, y = make_problem(ndim, convs, **problem)
    twin, twin_loss = copy.deepcopy(model), copy.deepcopy(loss_func)
    run_backpack(model, loss_func, x, y, [bp_extension(name)])
    run_backpack(twin, twin_loss, x, y, [tn_extension(name)])
    savefield = SAVEFIELDS[name]
    return savefields_of(model, savefield), savefields_of(twin, savefield)


@pytest.mark.parametrize("name", EXTENSIONS)
@pytest.mark.parametrize("case", BACKPACK_RIGHT)
def test_equals_backpack_where_backpack_is_right(name: str, case: str) -> None:
    ndim, conv = BACKPACK_RIGHT[case]
    expected, actual = _backpack_vs_tnbackpack(name, ndim, [conv], sizes=(6, 5, 4))
    assert_same(actual, expected)


@pytest.mark.parametrize("name", ["BatchGrad", "SumGradSquared", "Variance"])
def test_equals_backpack_with_groups(name: str) -> None:
    conv = dict(out_channels=4, kernel_size=3, padding=1, groups=2)
    expected, actual = _backpack_vs_tnbackpack(name, 2, [conv], in_channels=4)
    assert_same(actual, expected)


# Where BackPACK 1.7.1 is wrong (DESIGN.md §4); each case is checked to really
# expose the error, so the sweep in test_first_order.py covers it meaningfully.
BACKPACK_WRONG = {
    "same-even-kernel": (
        "BatchGrad",
        dict(out_channels=3, kernel_size=4, padding="same"),
    ),
    "circular": (
        "SumGradSquared",
        dict(out_channels=3, kernel_size=3, padding=1, padding_mode="circular"),
    ),
    "reflect": (
        "Variance",
        dict(out_channels=3, kernel_size=3, padding=1, padding_mode="reflect"),
    ),
    "groups": ("BatchL2Grad", dict(out_channels=4, kernel_size=3, groups=2)),
}


@pytest.mark.skipif(
    version("backpack-for-pytorch") != "1.7.1", reason="pins BackPACK 1.7.1's errors"
)
@pytest.mark.parametrize("case", BACKPACK_WRONG)
def test_right_where_backpack_is_wrong(case: str) -> None:
    name, conv = BACKPACK_WRONG[case]
    problem = dict(ndim=2, convs=[conv], in_channels=4)
    model, loss_func, x, y = make_problem(**problem)
    reference = per_sample_gradients(model, loss_func, x, y)
    bp_model, bp_loss = copy.deepcopy(model), copy.deepcopy(loss_func)
    run_backpack(bp_model, bp_loss, x, y, [bp_extension(name)])
    with pytest.raises(AssertionError):
        check_quantities(bp_model, reference, [name], x.dtype)
    run_backpack(model, loss_func, x, y, [tn_extension(name)])
    check_quantities(model, reference, [name], x.dtype)


@pytest.mark.skipif(
    version("backpack-for-pytorch") != "1.7.1", reason="pins BackPACK 1.7.1's errors"
)
@pytest.mark.parametrize("name", EXTENSIONS)
def test_output_padding_where_backpack_crashes(name: str) -> None:
    conv = dict(
        out_channels=3,
        kernel_size=3,
        stride=2,
        padding=1,
        output_padding=1,
        transposed=True,
    )
    model, loss_func, x, y = make_problem(2, [conv])
    bp_model, bp_loss = copy.deepcopy(model), copy.deepcopy(loss_func)
    with pytest.raises((RuntimeError, ValueError)):
        run_backpack(bp_model, bp_loss, x, y, [bp_extension(name)])
    reference = per_sample_gradients(model, loss_func, x, y)
    run_backpack(model, loss_func, x, y, [tn_extension(name)])
    check_quantities(model, reference, [name], x.dtype)


# ------------------------------------------------------------- combinations
@pytest.mark.filterwarnings("ignore:The Kronecker factors stored:UserWarning")
def test_combined_with_backpack_extensions() -> None:
    """tnbackpack's four + BackPACK's DiagGGNExact and KFLR in one context."""
    convs = [
        dict(out_channels=4, kernel_size=3, padding=1),
        dict(out_channels=3, kernel_size=3, stride=2, padding=1, transposed=True),
    ]
    model, loss_func, x, y = make_problem(2, convs, sizes=(5, 4))
    reference = per_sample_gradients(model, loss_func, x, y)
    bp_model, bp_loss = copy.deepcopy(model), copy.deepcopy(loss_func)
    extensions = [
        tn_extensions.BatchGrad(),
        tn_extensions.BatchL2Grad(),
        bp_extensions.DiagGGNExact(),
        bp_extensions.KFLR(),
        tn_extensions.SumGradSquared(),
        tn_extensions.Variance(),
    ]
    run_backpack(model, loss_func, x, y, extensions)
    check_quantities(model, reference, EXTENSIONS, x.dtype)

    bp_run = [
        bp_extensions.BatchGrad(),
        bp_extensions.DiagGGNExact(),
        bp_extensions.KFLR(),
    ]
    run_backpack(bp_model, bp_loss, x, y, bp_run)
    assert_same(
        savefields_of(model, "diag_ggn_exact"),
        savefields_of(bp_model, "diag_ggn_exact"),
    )
    params = dict(model.named_parameters())
    for key, param in bp_model.named_parameters():
        assert len(params[key].kflr) == len(param.kflr)
        for factor, expected in zip(params[key].kflr, param.kflr):
            assert_same({key: factor}, {key: expected})
    # The linear layer keeps BackPACK's own BatchGrad rule.
    linear = [key for key in params if key.startswith(f"{len(model) - 1}.")]
    assert isinstance(model[-1], nn.Linear) and linear
    grad_batch, bp_grad_batch = (
        savefields_of(m, "grad_batch") for m in (model, bp_model)
    )
    assert_same(
        {k: grad_batch[k] for k in linear}, {k: bp_grad_batch[k] for k in linear}
    )


def test_repeated_passes_with_new_sizes() -> None:
    """The spec cached on a module serves other batch and input sizes."""
    torch.manual_seed(0)
    conv = conv_layer(2, in_channels=2, out_channels=3, kernel_size=3, stride=2)
    model = nn.Sequential(
        conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3)
    ).double()
    loss_func = nn.CrossEntropyLoss()
    twin = copy.deepcopy(model)  # torch.func does not run through BackPACK's hooks
    extensions = [tn_extension(name) for name in EXTENSIONS]
    for batch_size, sizes in [(3, (6, 5)), (2, (6, 5)), (1, (9, 7)), (3, (6, 5))]:
        x = torch.randn(batch_size, 2, *sizes, dtype=torch.float64)
        y = torch.randint(0, 3, (batch_size,))
        reference = per_sample_gradients(twin, loss_func, x, y)
        run_backpack(model, loss_func, x, y, extensions)
        check_quantities(model, reference, EXTENSIONS, x.dtype)


# --------------------------------------------------- frozen and no-grad parts
@pytest.mark.parametrize("frozen", ["weight", "bias"])
@pytest.mark.parametrize("transposed", [False, True], ids=["Conv", "ConvTranspose"])
@pytest.mark.parametrize("name", EXTENSIONS)
def test_frozen_parameter(name: str, transposed: bool, frozen: str) -> None:
    conv = dict(out_channels=3, kernel_size=2, stride=2, transposed=transposed)
    model, loss_func, x, y = make_problem(2, [conv])
    getattr(model[0], frozen).requires_grad_(False)
    reference = per_sample_gradients(model, loss_func, x, y)
    assert f"0.{frozen}" not in reference
    run_backpack(model, loss_func, x, y, [tn_extension(name)])
    check_quantities(model, reference, [name], x.dtype)
    assert not hasattr(getattr(model[0], frozen), SAVEFIELDS[name])


@pytest.mark.parametrize("name", EXTENSIONS)
def test_first_conv_under_no_grad(name: str) -> None:
    convs = [
        dict(out_channels=4, kernel_size=3, padding=1),
        dict(out_channels=3, kernel_size=3, stride=2, transposed=True),
    ]
    model, loss_func, x, y = make_problem(2, convs)
    with torch.no_grad():
        hidden = model[:2](x)
    head = model[2:]
    reference = per_sample_gradients(head, loss_func, hidden, y)

    def forward(net: nn.Module, inputs: Tensor) -> Tensor:
        with torch.no_grad():
            h = net[:2](inputs)
        return net[2:](h)

    run_backpack(model, loss_func, x, y, [tn_extension(name)], forward=forward)
    check_quantities(head, reference, [name], x.dtype)
    for param in model[0].parameters():
        assert not hasattr(param, SAVEFIELDS[name])


@pytest.mark.parametrize("name", EXTENSIONS)
def test_input_requires_grad(name: str) -> None:
    conv = dict(out_channels=3, kernel_size=3, padding="same", padding_mode="reflect")
    model, loss_func, x, y = make_problem(1, [conv])
    reference = per_sample_gradients(model, loss_func, x, y)
    run_backpack(model, loss_func, x.requires_grad_(True), y, [tn_extension(name)])
    check_quantities(model, reference, [name], x.dtype)
    assert x.grad is not None


class OutputSized(nn.Module):
    """A transposed conv called with ``output_size=`` (beyond its output_padding)."""

    def __init__(self, conv: nn.Module, output_size: List[int]) -> None:
        super().__init__()
        self.conv, self.output_size = conv, output_size

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x, output_size=self.output_size)


@pytest.mark.parametrize("name", EXTENSIONS)
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_transposed_called_with_output_size(name: str, ndim: int) -> None:
    torch.manual_seed(0)
    conv = conv_layer(
        ndim,
        True,
        in_channels=2,
        out_channels=3,
        kernel_size=3,
        stride=(2, 3, 2),
        padding=1,
        groups=1,
    ).double()
    x = torch.randn(2, 2, *(4, 3, 3)[:ndim], dtype=torch.float64)
    size = [s + 1 for s in conv(x).shape[2:]]  # needs output padding 1 everywhere
    head = nn.Linear(3 * torch.Size(size).numel(), 3)
    model = nn.Sequential(OutputSized(conv, size), nn.Tanh(), nn.Flatten(), head)
    model = model.double()
    loss_func = nn.CrossEntropyLoss()
    y = torch.tensor([0, 2])
    reference = per_sample_gradients(model, loss_func, x, y)
    for layer in (conv, *model[1:], loss_func):
        tnbackpack.extend(layer)  # not the wrapper: it is no BackPACK layer
    with tnbackpack.backpack(tn_extension(name)):
        loss_func(model(x), y).backward()
    check_quantities(model, reference, [name], x.dtype)
