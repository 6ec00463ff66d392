"""SampledConv and sample_convolutions: exact parts, sampled weight gradient, API."""

import pytest
import torch
from engine_cases import CONV_CASES, close
from randomized_reference import (
    batch_mask,
    channel_mask,
    masked_weight_gradient,
    position_mask,
)
from torch import nn

from tnbackpack.randomized import (
    SAMPLE_MODES,
    SampledConv,
    exact_gradients,
    restore_convolutions,
    sample_convolutions,
)
from tnbackpack.randomized.sampling import draw

NN_CASES = [c for c in CONV_CASES if c["module"] is not None]


def _layer(case, dtype=torch.float64):
    torch.manual_seed(case["seed"])
    shape = case["input_shape"]
    conv = getattr(nn, case["module"])(shape[1], **case["kwargs"]).to(dtype)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    return conv, x


def _mask(conv, x, sample):
    if sample.mode == "spatial":
        return position_mask(x, sample.kept)
    if sample.mode == "channels":
        return channel_mask(x, conv.groups, sample.kept[0])
    return batch_mask(x, sample.kept[0])


def _run(conv, x, keep, mode, seed):
    """Sampled layer's output, its gradients, and the slices it kept."""
    generator = torch.Generator().manual_seed(seed)
    state = generator.get_state()
    layer = SampledConv(conv, keep=keep, sample=mode, generator=generator)
    y = layer(x)
    fixed = torch.Generator().manual_seed(99)
    grad_output = torch.randn(y.shape, generator=fixed, dtype=y.dtype)
    wanted = [x, layer.weight] + ([layer.bias] if layer.bias is not None else [])
    grads = torch.autograd.grad(y, wanted, grad_output)
    replay = torch.Generator()
    replay.set_state(state)
    sample = draw(layer.spec, x.shape, keep, mode, replay, x.device)
    return y, grad_output, grads, sample


@pytest.mark.parametrize("mode", SAMPLE_MODES)
@pytest.mark.parametrize("case", NN_CASES, ids=[c["name"] for c in NN_CASES])
def test_exact_parts_and_estimate_for_the_kept_slices(case, mode):
    """Output, input and bias gradients exact; weight gradient = masked reference."""
    conv, x = _layer(case)
    y, grad_output, grads, sample = _run(conv, x, 0.6, mode, case["seed"])
    close(y, conv(x))
    expected = torch.autograd.grad(
        conv(x), [x] + list(conv.parameters())[1:], grad_output
    )
    close(grads[0], expected[0])
    if conv.bias is not None:
        close(grads[2], expected[1])
    reference = masked_weight_gradient(
        conv._conv_forward, x.detach(), conv.weight, grad_output,
        _mask(conv, x.detach(), sample), sample.probability,
    )  # fmt: skip
    close(grads[1], reference)


@pytest.mark.parametrize("mode", SAMPLE_MODES)
def test_float32(mode):
    conv, x = _layer(NN_CASES[0], torch.float32)
    _, grad_output, grads, sample = _run(conv, x, 0.5, mode, 3)
    reference = masked_weight_gradient(
        conv._conv_forward, x.detach(), conv.weight, grad_output,
        _mask(conv, x.detach(), sample), sample.probability,
    )  # fmt: skip
    assert grads[1].dtype == torch.float32
    close(grads[1], reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", SAMPLE_MODES)
def test_keep_one_is_exact(mode):
    case = next(c for c in NN_CASES if c["name"] == "c2-groups-circular")
    conv, x = _layer(case)
    y, grad_output, grads, _ = _run(conv, x, 1.0, mode, 0)
    expected = torch.autograd.grad(conv(x), [x, *conv.parameters()], grad_output)
    for actual, wanted in zip(grads, expected):
        close(actual, wanted)


def test_same_generator_state_same_gradient_and_draws_differ():
    conv, x = _layer(NN_CASES[13])
    first = _run(conv, x, 0.5, "spatial", 7)[2][1]
    again = _run(conv, x, 0.5, "spatial", 7)[2][1]
    other = _run(conv, x, 0.5, "spatial", 8)[2][1]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    torch.manual_seed(5)  # generator=None uses PyTorch's global generator
    layer = SampledConv(conv, keep=0.5)
    (a,) = torch.autograd.grad(layer(x).sum(), layer.weight)
    torch.manual_seed(5)
    (b,) = torch.autograd.grad(layer(x).sum(), layer.weight)
    assert torch.equal(a, b)


def _saved_bytes(layer, x):
    """Bytes of the tensors autograd saves for backward, except the parameters."""
    saved = []
    params = {p.data_ptr() for p in layer.parameters()}

    def pack(tensor):
        if tensor.data_ptr() not in params:
            saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    floats = sum(t.numel() * t.element_size() for t in saved if t.is_floating_point())
    indices = sum(
        t.numel() * t.element_size() for t in saved if not t.is_floating_point()
    )
    return floats, indices


#: Input shapes with hundreds of slices of the sampled leg, so that the stored
#: fraction is close to ``keep`` (binomial standard deviation below 0.03).
STORAGE_SHAPES = {
    "spatial": (4, 2, 128, 128),
    "channels": (4, 256, 8, 8),
    "batch": (256, 2, 8, 8),
}


@pytest.mark.parametrize("mode", SAMPLE_MODES)
@pytest.mark.parametrize("input_needs_grad", [False, True])
def test_stored_input_is_the_kept_slices(mode, input_needs_grad):
    """Only the kept slices (and small indices) are saved: ≈ keep of the input."""
    torch.manual_seed(0)
    shape = STORAGE_SHAPES[mode]
    conv = nn.Conv2d(shape[1], 2, 3, padding=1)
    x = torch.randn(*shape).requires_grad_(input_needs_grad)
    whole = x.numel() * x.element_size()
    assert _saved_bytes(conv, x)[0] == whole  # the plain layer saves all of x
    generator = torch.Generator().manual_seed(0)
    layer = SampledConv(conv, keep=0.25, sample=mode, generator=generator)
    fractions = []
    for _ in range(3):
        state = generator.get_state()
        floats, indices = _saved_bytes(layer, x)
        replay = torch.Generator()
        replay.set_state(state)
        sample = draw(layer.spec, x.shape, 0.25, mode, replay, x.device)
        slices = [len(k) for k in sample.kept]
        full = (
            [x.shape[2 + d] for d in range(2)]
            if mode == "spatial"
            else [shape[0] if mode == "batch" else shape[1]]
        )
        expected = whole
        for kept, total in zip(slices, full):
            expected = expected * kept // total
        assert floats == expected
        assert indices == 8 * sum(slices)
        fractions.append(floats / whole)
    assert abs(sum(fractions) / 3 - 0.25) < 0.05, fractions


def test_strided_layer_stores_only_read_rows():
    """A 1x1 stride-2 layer never stores the rows no output reads."""
    layer = SampledConv(nn.Conv2d(2, 2, 1, stride=2), keep=1 - 1e-12)
    x = torch.randn(2, 2, 32, 32)
    floats, _ = _saved_bytes(layer, x)
    assert floats == x.numel() * x.element_size() // 4


def test_sample_convolutions_replaces_in_place_and_shares_parameters():
    model = nn.Sequential(
        nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(2, 2, 1)),
        nn.Conv3d(2, 2, 1), nn.ConvTranspose2d(2, 2, 2), nn.Linear(2, 2),
    )  # fmt: skip
    keys = list(model.state_dict())
    params = list(model.parameters())
    returned = sample_convolutions(model, keep=0.25, sample="channels")
    assert returned is model
    assert isinstance(model[0], SampledConv) and isinstance(model[2][0], SampledConv)
    assert isinstance(model[3], SampledConv)
    assert isinstance(model[4], nn.ConvTranspose2d)  # not a convolution it samples
    assert model[0].keep == 0.25 and model[0].sample == "channels"
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params))
    sample_convolutions(model)  # sampled layers are not wrapped twice
    assert isinstance(model[0].conv, nn.Conv1d)
    restore_convolutions(model)
    assert isinstance(model[0], nn.Conv1d) and isinstance(model[2][0], nn.Conv2d)
    assert isinstance(sample_convolutions(nn.Conv2d(1, 1, 1)), SampledConv)


def test_sample_convolutions_include():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Sequential(nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 1))
    )
    seen = []

    def include(name, layer):
        seen.append(name)
        return layer.kernel_size != (1, 1)

    sample_convolutions(model, include=include)
    assert seen == ["0", "1.0", "1.1"]
    assert isinstance(model[0], SampledConv) and isinstance(model[1][0], SampledConv)
    assert isinstance(model[1][1], nn.Conv2d)
    single = nn.Conv2d(1, 1, 1)
    assert sample_convolutions(single, include=lambda name, layer: False) is single


def test_exact_gradients_context_manager():
    torch.manual_seed(0)
    model = sample_convolutions(
        nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten()), keep=0.1
    )
    x = torch.randn(4, 2, 6, 6)
    exact_model = restore_convolutions(sample_convolutions(
        nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten()), keep=1
    ))  # fmt: skip
    exact_model.load_state_dict(model.state_dict())
    (expected,) = torch.autograd.grad(
        exact_model(x).square().sum(), exact_model[0].weight
    )
    with exact_gradients(model):
        (inside,) = torch.autograd.grad(model(x).square().sum(), model[0].weight)
    close(inside, expected, rtol=1e-5, atol=1e-6)
    assert model[0].enabled
    (outside,) = torch.autograd.grad(model(x).square().sum(), model[0].weight)
    assert not torch.allclose(outside, expected)


def test_unbatched_input_no_grad_and_frozen_weight():
    conv = nn.Conv2d(2, 3, 3).double()
    layer = SampledConv(conv, keep=0.5)
    x = torch.randn(2, 5, 5, dtype=torch.float64)
    close(layer(x), conv(x))
    with torch.no_grad():
        close(layer(x), conv(x))
    conv.weight.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    close(torch.autograd.grad(layer(xg).sum(), xg)[0],
          torch.autograd.grad(conv(xg).sum(), xg)[0])  # fmt: skip


def test_bad_arguments_raise_value_errors():
    conv = nn.Conv2d(1, 1, 1)
    for keep in (0, -0.5, 1.5, float("nan"), True, "half"):
        with pytest.raises(ValueError, match="keep must be"):
            SampledConv(conv, keep=keep)
        with pytest.raises(ValueError, match="keep must be"):
            sample_convolutions(nn.Sequential(conv), keep=keep)
    with pytest.raises(ValueError, match="sample must be one of"):
        SampledConv(conv, sample="pixels")
    with pytest.raises(ValueError, match="sample must be one of"):
        sample_convolutions(nn.Sequential(), sample="pixels")
    for module in (nn.Linear(1, 1), nn.ConvTranspose2d(1, 1, 1), nn.ReLU()):
        with pytest.raises(ValueError, match="wraps nn.Conv1d, nn.Conv2d or nn.Conv3d"):
            SampledConv(module)
    with pytest.raises(ValueError, match="must be an nn.Module"):
        sample_convolutions("model")
    with pytest.raises(ValueError, match="generator must be"):
        SampledConv(conv, generator=0)
    with pytest.raises(ValueError, match="expected an input with 4"):
        SampledConv(conv)(torch.randn(1, 1, 1, 1, 1))
