"""Independent references for the second-order tests, and tests of the references.

The references use neither BackPACK nor the engine (only :func:`run`, which
runs the extensions under test, touches BackPACK): curvature comes from
``torch.func`` (``jacrev``, ``hessian``, ``vmap``) on PyTorch's own layers,
patches from the Jacobian of PyTorch's convolution w.r.t. its weight (no
``F.unfold``), and loss Hessian square roots from an eigendecomposition.

Test networks put the layer under test behind another convolution,
``conv -> act -> layer -> act -> flatten -> linear``, so every quantity of the
first convolution has been backpropagated through the layer under test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from backpack import backpack, extend
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev, vmap

TOLERANCES = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 2e-4, "atol": 1e-6},
}
NUM_CLASSES = 3

CONV_CLASSES = {
    (1, False): nn.Conv1d,
    (2, False): nn.Conv2d,
    (3, False): nn.Conv3d,
    (1, True): nn.ConvTranspose1d,
    (2, True): nn.ConvTranspose2d,
    (3, True): nn.ConvTranspose3d,
}


# ---------------------------------------------------------------------- cases
@dataclass
class Case:
    """A layer under test: class, hyper-parameters and the input it gets.

    ``in_channels`` of the layer is that of the preceding convolution's output.
    """

    ndim: int
    kwargs: Dict[str, Any]
    input_size: Tuple[int, ...]
    transposed: bool = False
    batch: int = 2
    output_size: Optional[Tuple[int, ...]] = None
    name: str = field(default="")

    def __str__(self) -> str:
        return self.name or f"{self.ndim}d{'T' if self.transposed else ''}{self.kwargs}"

    def layer(self) -> nn.Module:
        return CONV_CLASSES[(self.ndim, self.transposed)](**self.kwargs)


def case(
    ndim: int, input_size: Sequence[int], transposed: bool = False, **kwargs
) -> Case:
    kwargs.setdefault("in_channels", 2)
    kwargs.setdefault("out_channels", 3)
    name = f"{ndim}d{'T' if transposed else ''}-" + "-".join(
        f"{k}={v}" for k, v in kwargs.items() if k not in ("in_channels",)
    )
    return Case(ndim, kwargs, tuple(input_size), transposed, name=name)


#: Hand-picked layers: every hyper-parameter BackPACK mishandles plus the
#: structures with a dedicated engine or input-VJP route.
FIXED_CASES: List[Case] = [
    case(2, (5, 4), kernel_size=3, padding=1),
    case(2, (6, 5), kernel_size=(3, 2), stride=2, padding=(1, 0)),
    case(2, (6, 6), kernel_size=2, dilation=2, padding="same"),
    case(2, (5, 4), kernel_size=2, padding="valid"),
    case(2, (5, 5), kernel_size=3, padding=1, padding_mode="reflect"),
    case(2, (5, 4), kernel_size=3, padding=(2, 1), padding_mode="replicate"),
    case(2, (4, 5), kernel_size=3, stride=2, padding=1, padding_mode="circular"),
    case(2, (5, 4), in_channels=4, out_channels=2, kernel_size=3, groups=2, padding=1),
    case(2, (4, 4), in_channels=4, out_channels=4, kernel_size=3, groups=4),
    case(2, (6, 4), kernel_size=1, stride=2),
    case(2, (6, 4), kernel_size=2, stride=2),
    case(1, (7,), kernel_size=3, stride=2, padding=2, dilation=2),
    case(1, (6,), kernel_size=4, padding="same", padding_mode="circular"),
    case(3, (4, 3, 4), kernel_size=(2, 1, 3), padding=(1, 0, 1)),
    case(3, (3, 4, 3), kernel_size=2, padding="same", padding_mode="reflect"),
    case(2, (3, 4), True, kernel_size=3, stride=2, padding=1, output_padding=1),
    case(2, (3, 3), True, in_channels=4, out_channels=2, kernel_size=2, groups=2),
    case(2, (3, 2), True, kernel_size=(2, 3), stride=(2, 1), dilation=(1, 2)),
    case(1, (4,), True, kernel_size=3, stride=3, padding=1, output_padding=2),
    case(3, (2, 3, 2), True, kernel_size=2, stride=2, output_padding=(1, 0, 1)),
    case(2, (5, 4), kernel_size=(2, 4), padding="same"),
]


def with_output_size() -> Case:
    """A transposed layer called with ``output_size=`` (one more than default)."""
    spec = case(2, (3, 3), True, kernel_size=3, stride=2, padding=1)
    spec.output_size = (6, 6)
    spec.name += "-output_size=(6, 6)"
    return spec


@st.composite
def layer_cases(draw, max_ndim: int = 3) -> Case:
    """Random valid layers over every hyper-parameter (small sizes)."""
    ndim = draw(st.integers(1, max_ndim))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 1, 2]))
    per_dim = st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim)
    kernel = tuple(draw(per_dim))
    dilation = tuple(draw(st.lists(st.integers(1, 2), min_size=ndim, max_size=ndim)))
    kwargs: Dict[str, Any] = {
        "in_channels": 2 * groups,
        "out_channels": draw(st.sampled_from([1, 2])) * groups,
        "kernel_size": kernel,
        "dilation": dilation,
        "groups": groups,
        "bias": draw(st.booleans()),
    }
    string_padding = not transposed and draw(st.booleans())
    if string_padding:
        kwargs["padding"] = draw(st.sampled_from(["same", "valid"]))
    else:
        kwargs["stride"] = tuple(draw(per_dim))
        kwargs["padding"] = tuple(
            draw(st.integers(0, dilation[d] * (kernel[d] - 1))) for d in range(ndim)
        )
    if transposed:
        kwargs["output_padding"] = tuple(
            draw(st.integers(0, max(kwargs["stride"][d], dilation[d]) - 1))
            for d in range(ndim)
        )
    else:
        kwargs["padding_mode"] = draw(
            st.sampled_from(["zeros", "reflect", "replicate", "circular"])
        )
    low = 2 if transposed else 3
    sizes = tuple(draw(st.integers(low, 5 if ndim < 3 else 4)) for _ in range(ndim))
    return Case(ndim, kwargs, sizes, transposed, batch=draw(st.integers(1, 3)))


# ---------------------------------------------------------------------- nets
class CallWithOutputSize(nn.Module):
    """Calls a transposed layer with ``output_size=`` (Sequential cannot)."""

    def __init__(self, layer: nn.Module, output_size: Tuple[int, ...]):
        super().__init__()
        self.layer = layer
        self.output_size = output_size

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x, output_size=list(self.output_size))


def _first_conv(ndim: int, in_channels: int, out_channels: int) -> nn.Module:
    # Keeps the spatial size, so the layer under test sees `case.input_size`.
    return CONV_CLASSES[(ndim, False)](in_channels, out_channels, 3, padding=1)


def build_net(
    case: Case,
    activation: Callable[[], nn.Module] = nn.Sigmoid,
    dtype: torch.dtype = torch.float64,
    first_conv: bool = True,
) -> Tuple[nn.Sequential, Tensor]:
    """``[conv -> act ->] layer -> act -> flatten -> linear`` and an input batch."""
    layer = case.layer()
    in_channels = layer.in_channels
    layers: List[nn.Module] = []
    net_in = in_channels
    if first_conv:
        net_in = 2
        layers += [_first_conv(case.ndim, net_in, in_channels), activation()]
    layers.append(
        CallWithOutputSize(layer, case.output_size) if case.output_size else layer
    )
    layers += [activation(), nn.Flatten()]
    x = torch.randn(case.batch, net_in, *case.input_size)
    features = nn.Sequential(*layers)
    with torch.no_grad():
        num_features = features(x).shape[1]
    model = nn.Sequential(*layers, nn.Linear(num_features, NUM_CLASSES)).to(dtype)
    return model, x.to(dtype)


def is_valid(case: Case) -> bool:
    """Whether PyTorch accepts the layer on its input (e.g. reflect padding < size)."""
    try:
        model, x = build_net(case)
        model(x)  # under no_grad PyTorch lets an empty transposed output pass
    except (RuntimeError, ValueError):
        return False
    return not empty_without_output_padding(case)


def empty_without_output_padding(case: Case) -> bool:
    """A transposed layer whose output is empty but for ``output_padding``.

    The engine rejects these (see ``test_output_padding_rescues_empty_output``).
    """
    if not case.transposed:
        return False
    layer = case.layer()
    for d, size in enumerate(case.input_size):
        k, s = layer.kernel_size[d], layer.stride[d]
        p, dil = layer.padding[d], layer.dilation[d]
        if (size - 1) * s - 2 * p + dil * (k - 1) + 1 < 1:
            return True
    return False


def conv_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Names and modules of the (transposed) convolutions, in forward order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.conv._ConvNd)
    ]


def conv_parameter_names(model: nn.Module) -> List[str]:
    """Names of the convolution parameters, in ``named_parameters`` order."""
    prefixes = {name for name, _ in conv_modules(model)}
    return [
        name
        for name, _ in model.named_parameters()
        if name.rsplit(".", 1)[0] in prefixes
    ]


def extend_leaves(model: nn.Module) -> nn.Module:
    """``extend`` every leaf module (the output-size wrapper itself stays plain)."""
    for module in model.modules():
        if not list(module.children()):
            extend(module)
    return model


def make_loss(name: str) -> nn.Module:
    kind, reduction = name.split("-")
    return {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss}[kind](reduction=reduction)


def make_targets(loss_name: str, batch: int, dtype: torch.dtype) -> Tensor:
    if loss_name.startswith("ce"):
        return torch.randint(0, NUM_CLASSES, (batch,))
    return torch.randn(batch, NUM_CLASSES, dtype=dtype)


def run(model, loss_fn, x, y, *extensions, seed=None) -> Dict[str, Dict[str, Tensor]]:
    """One backward pass with ``extensions``; their savefields per parameter name."""
    extend_leaves(model)
    extend(loss_fn)
    loss = loss_fn(model(x), y)
    if seed is not None:
        torch.manual_seed(seed)
    with backpack(*extensions):
        loss.backward()
    results = {}
    for ext in extensions:
        results[ext.savefield] = {
            name: getattr(p, ext.savefield)
            for name, p in model.named_parameters()
            if hasattr(p, ext.savefield)
        }
    return results


def flat(values: Dict[str, Tensor], names: Sequence[str], lead: int = 0) -> Tensor:
    """Concatenate per-parameter tensors along one flat parameter axis."""
    return torch.cat([values[n].flatten(lead) for n in names], dim=-1)


# ---------------------------------------------------------- torch.func truth
def _flat_function(model: nn.Module, names: Sequence[str]):
    """``θ -> model output`` with the named parameters as one flat vector ``θ``."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [math.prod(s) for s in shapes]
    theta = torch.cat([params[n].detach().flatten() for n in names])

    def unflatten(vector: Tensor) -> Dict[str, Tensor]:
        pieces = vector.split(sizes)
        return {n: p.reshape(s) for n, p, s in zip(names, pieces, shapes)}

    def forward(vector: Tensor, x: Tensor) -> Tensor:
        return functional_call(model, unflatten(vector), (x,))

    return forward, theta, sizes


def output_jacobian(model: nn.Module, x: Tensor, names: Sequence[str]) -> Tensor:
    """``∂ model(x)[n, c] / ∂θ_p`` as ``[N, C, P]``."""
    forward, theta, _ = _flat_function(model, names)
    return jacrev(forward)(theta, x.detach())


def loss_output_hessian(loss_fn: nn.Module, output: Tensor, y: Tensor) -> Tensor:
    """Hessian of the reduced loss w.r.t. the model output, ``[N, C, N, C]``."""
    return hessian(lambda out: loss_fn(out, y))(output.detach())


def ggn(model, loss_fn, x, y, names) -> Tensor:
    """The GGN ``Jᵀ H J`` of the reduced loss w.r.t. the named parameters."""
    jac = output_jacobian(model, x, names)
    hess = loss_output_hessian(loss_fn, model(x), y)
    return torch.einsum("ncp,ncmd,mdq->pq", jac, hess, jac)


def per_sample_ggn_diagonal(model, loss_fn, x, y, names) -> Tensor:
    """Diagonals of the per-sample GGNs ``J_nᵀ H_nn J_n``, ``[N, P]``."""
    jac = output_jacobian(model, x, names)
    hess = loss_output_hessian(loss_fn, model(x), y)
    blocks = torch.einsum("ncnd->ncd", hess)
    return torch.einsum("ncp,ncd,ndp->np", jac, blocks, jac)


def loss_parameter_hessian(model, loss_fn, x, y, names) -> Tensor:
    """Hessian of the reduced loss w.r.t. the named parameters, ``[P, P]``."""
    forward, theta, _ = _flat_function(model, names)
    return hessian(lambda t: loss_fn(forward(t, x.detach()), y))(theta)


def per_sample_hessian_diagonal(model, loss_fn, x, y, names) -> Tensor:
    """Diagonals of the Hessians of each sample's term of the reduced loss.

    The losses used are separable over samples, so sample ``n``'s term is the
    loss with every other sample's output frozen.
    """
    forward, theta, _ = _flat_function(model, names)
    frozen = model(x).detach()
    rows = []
    for n in range(x.shape[0]):

        def term(t: Tensor, n: int = n) -> Tensor:
            out = frozen.clone()
            out[n] = forward(t, x[n : n + 1].detach())[0]
            return loss_fn(out, y)

        rows.append(torch.diagonal(hessian(term)(theta)))
    return torch.stack(rows)


# ---------------------------------------------------- Kronecker ingredients
def loss_hessian_sqrt(loss_fn, output: Tensor, y: Tensor) -> Tensor:
    """Per-sample square roots ``S_n`` with ``S_n S_nᵀ = H_nn``, as ``[V, N, C]``."""
    blocks = torch.einsum("ncnd->ncd", loss_output_hessian(loss_fn, output, y))
    values, vectors = torch.linalg.eigh(blocks)
    roots = vectors * values.clamp(min=0).sqrt().unsqueeze(1)  # [N, C, V]
    return roots.permute(2, 0, 1)


def sampled_loss_hessian_sqrt(
    logits: Tensor, mc_samples: int, reduction: str
) -> Tensor:
    """The cross-entropy MC square root BackPACK samples from torch's global RNG.

    ``(p − onehot(ŷ)) / √M`` with ``ŷ ~ Categorical(p)`` drawn as one
    ``[M, N]`` sample, divided by ``√N`` for a mean (reproduces the draw only).
    """
    probs = logits.detach().softmax(dim=1)
    draws = torch.distributions.Categorical(probs).sample(torch.Size([mc_samples]))
    onehot = nn.functional.one_hot(draws, probs.shape[1]).to(probs.dtype)
    root = (probs.unsqueeze(0) - onehot) / math.sqrt(mc_samples)
    return root / math.sqrt(logits.shape[0]) if reduction == "mean" else root


def backpropagated_sqrt(
    model: nn.Sequential, index: int, x: Tensor, root: Tensor
) -> Tensor:
    """``(∂f_n/∂z_n)ᵀ S_n`` at the output ``z`` of ``model[index]``, ``[V, N, *z]``."""
    head, tail = model[: index + 1], model[index + 1 :]
    z = head(x).detach()

    def single(sample: Tensor) -> Tensor:
        return tail(sample.unsqueeze(0))[0]

    jac = vmap(jacrev(single))(z)  # [N, C, *z]
    return torch.einsum("nc...,vnc->vn...", jac, root)


def kfra_output_matrix(model: nn.Sequential, indices: Sequence[int], x, loss_fn, y):
    """KFRA's ``Ḡ`` at the output of ``model[indices[0]]``, by per-segment Jacobians.

    Starts from ``Σ_n H_nn`` at the model output and pulls back through each
    segment between consecutive boundaries as ``(1/N) Σ_n J_nᵀ Ḡ J_n``. This is
    KFRA's recursion whenever every segment has at most one sample-dependent
    (nonlinear, curvature-free) layer, e.g. ``ReLU -> conv`` or
    ``ReLU -> flatten -> linear``.
    """
    output = model(x).detach()
    hess = loss_output_hessian(loss_fn, output, y)
    matrix = torch.einsum("ncnd->cd", hess)
    bounds = list(indices) + [len(model) - 1]
    for start, stop in reversed(list(zip(bounds[:-1], bounds[1:]))):
        z = model[: start + 1](x).detach()
        segment = model[start + 1 : stop + 1]

        def single(sample: Tensor, segment=segment) -> Tensor:
            return segment(sample.unsqueeze(0))[0].flatten()

        jac = vmap(jacrev(single))(z).flatten(2)  # [N, D_out, D_in]
        matrix = torch.einsum("nai,ab,nbj->ij", jac, matrix, jac) / x.shape[0]
    return matrix


def patches(layer: nn.Module, x: Tensor, output_size=None) -> Tensor:
    """Patches ``x̃ [N, G, C_in/G·∏K, T]`` from the Jacobian of PyTorch's layer.

    A convolution's output is ``z[n, g·co + j, t] = Σ_{i,k} W[g·co + j, i, k]
    x̃[n, g, (i,k), t]`` (``co = C_out/G``), so ``x̃`` is the derivative of
    output channel ``g·co`` w.r.t. weight row ``g·co``. A transposed layer's is
    ``z[n, g·co + j, t] = Σ_{i,k} W[g·ci + i, j, k] x̃[n, g, (i,k), t]``.
    """
    groups = layer.groups
    co = layer.out_channels // groups
    ci = layer.in_channels // groups
    kwargs = {} if output_size is None else {"output_size": list(output_size)}
    weight = layer.weight.detach()

    def forward(w: Tensor) -> Tensor:
        z = functional_call(layer, {"weight": w}, (x.detach(),), kwargs)
        return z[:, ::co].flatten(2)  # [N, G, T]: first channel of each group

    jac = jacrev(forward)(weight)  # [N, G, T, *weight]
    rows = []
    for g in range(groups):
        if layer.transposed:
            block = jac[:, g, :, g * ci : (g + 1) * ci, 0]
        else:
            block = jac[:, g, :, g * co]
        rows.append(block.flatten(2).transpose(1, 2))  # [N, ci·∏K, T]
    return torch.stack(rows, dim=1)


def kronecker_reference(
    layer: nn.Module, x: Tensor, sqrt: Tensor, approx: str, output_size=None
) -> Tuple[Tensor, Tensor, Tensor]:
    """Weight factors ``B [G, co, co]``, ``A [G, d, d]`` and the bias factor.

    ``sqrt [V, N, C_out, *O]`` is the backpropagated square root at the output.
    """
    groups = layer.groups
    cols = sqrt.flatten(3).unflatten(2, (groups, -1))  # [V, N, G, co, T]
    xt = patches(layer, x, output_size)  # [N, G, d, T]
    batch, positions = xt.shape[0], xt.shape[-1]
    summed = cols.sum(-1)
    bias = torch.einsum("vnc,vnd->cd", summed.flatten(2), summed.flatten(2))
    if approx == "expand":
        b = torch.einsum("vngat,vngbt->gab", cols, cols)
        a = torch.einsum("ngit,ngjt->gij", xt, xt) / (batch * positions)
    elif approx == "reduce":
        b = torch.einsum("vnga,vngb->gab", summed, summed)
        xs = xt.sum(-1)
        a = torch.einsum("ngi,ngj->gij", xs, xs) / (batch * positions**2)
    else:
        b = torch.einsum("vnga,vngb->gab", summed, summed)
        a = torch.einsum("ngit,ngjt->gij", xt, xt) / batch
    return b, a, bias


def kfra_reference(layer, x, matrix: Tensor, approx: str, output_size=None):
    """KFRA's weight factors and bias factor from ``Ḡ [C_out·T, C_out·T]``."""
    groups, channels = layer.groups, layer.out_channels
    positions = matrix.shape[0] // channels
    full = matrix.reshape(channels, positions, channels, positions)
    bias = full.sum((1, 3))
    blocks = full.reshape(groups, channels // groups, positions, groups, -1, positions)
    diagonal = torch.stack([blocks[g, :, :, g] for g in range(groups)])
    b = torch.einsum("gasbt->gab", diagonal)
    if approx == "expand":
        b = torch.einsum("gatbt->gab", diagonal)
    xt = patches(layer, x, output_size)
    batch, t = xt.shape[0], xt.shape[-1]
    if approx == "reduce":
        xs = xt.sum(-1)
        a = torch.einsum("ngi,ngj->gij", xs, xs) / (batch * t**2)
    else:
        a = torch.einsum("ngit,ngjt->gij", xt, xt) / batch
        a = a / t if approx == "expand" else a
    return b, a, bias


def unstack(factor: Tensor) -> Tensor:
    return factor[0] if factor.shape[0] == 1 else factor


def layer_index(model: nn.Sequential, layer: nn.Module) -> int:
    """Position in ``model`` of ``layer`` (or of its output-size wrapper)."""
    for i, m in enumerate(model):
        if m is layer or getattr(m, "layer", None) is layer:
            return i
    raise ValueError("layer not in model")


def assert_close(actual: Tensor, expected: Tensor, dtype=torch.float64):
    """Compare with the dtype's tolerance; ``atol`` relative to ``expected``'s size."""
    tol = TOLERANCES[dtype]
    size = max(expected.abs().max().item(), 1e-30) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual, expected, rtol=tol["rtol"], atol=tol["atol"] * size
    )


# ----------------------------------------------------- tests of the references
def test_patches_reproduce_the_layer():
    """``z = W̃ x̃`` per group for a grouped convolution and a transposed one."""
    torch.manual_seed(0)
    for spec in (FIXED_CASES[7], FIXED_CASES[16], FIXED_CASES[6], with_output_size()):
        layer = spec.layer().double()
        x = torch.randn(2, layer.in_channels, *spec.input_size, dtype=torch.float64)
        kwargs = {"output_size": list(spec.output_size)} if spec.output_size else {}
        z = layer(x, **kwargs).detach()
        if layer.bias is not None:
            z = z - layer.bias.detach().reshape(-1, *[1] * spec.ndim)
        xt = patches(layer, x, spec.output_size)
        g = layer.groups
        w = layer.weight.detach()
        if layer.transposed:
            w = w.unflatten(0, (g, -1)).transpose(1, 2)  # [G, co, ci, *K]
        else:
            w = w.unflatten(0, (g, -1))
        rebuilt = torch.einsum("gcd,ngdt->ngct", w.flatten(2), xt)
        assert_close(rebuilt.flatten(1, 2), z.flatten(2))


def test_ggn_equals_hessian_for_a_linear_model():
    """Without nonlinearities the model is affine in each layer's parameters."""
    torch.manual_seed(1)
    spec = FIXED_CASES[0]
    model, x = build_net(spec, activation=nn.Identity)
    loss_fn, y = (
        make_loss("ce-mean"),
        make_targets("ce-mean", spec.batch, torch.float64),
    )
    for prefix, _ in conv_modules(model):
        names = [n for n in conv_parameter_names(model) if n.startswith(prefix + ".")]
        assert_close(
            ggn(model, loss_fn, x, y, names),
            loss_parameter_hessian(model, loss_fn, x, y, names),
        )


def test_per_sample_references_sum_to_the_batch():
    torch.manual_seed(2)
    spec = FIXED_CASES[3]
    model, x = build_net(spec)
    loss_fn, y = (
        make_loss("mse-mean"),
        make_targets("mse-mean", spec.batch, torch.float64),
    )
    names = conv_parameter_names(model)
    assert_close(
        per_sample_ggn_diagonal(model, loss_fn, x, y, names).sum(0),
        torch.diagonal(ggn(model, loss_fn, x, y, names)),
    )
    assert_close(
        per_sample_hessian_diagonal(model, loss_fn, x, y, names).sum(0),
        torch.diagonal(loss_parameter_hessian(model, loss_fn, x, y, names)),
    )


@pytest.mark.parametrize("loss_name", ["ce-mean", "mse-sum"])
def test_loss_hessian_sqrt_squares_to_the_hessian(loss_name):
    torch.manual_seed(3)
    out = torch.randn(3, NUM_CLASSES, dtype=torch.float64)
    y = make_targets(loss_name, 3, torch.float64)
    root = loss_hessian_sqrt(make_loss(loss_name), out, y)
    hess = loss_output_hessian(make_loss(loss_name), out, y)
    assert_close(
        torch.einsum("vnc,vnd->ncd", root, root), torch.einsum("ncnd->ncd", hess)
    )
