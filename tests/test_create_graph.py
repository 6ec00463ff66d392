"""``loss.backward(create_graph=True)``: every extension's results are differentiable.

For each of the 15 extensions, a scalar function ``f = Σ_p <R_p, Q_p>`` of the
conv parameters' quantities ``Q_p`` (fixed random weights ``R_p``) is
differentiated w.r.t. *all* parameters by autograd after a backward pass with
``create_graph=True``, and compared with the double-backward reference
``torch.func.grad(θ -> f(Q(θ)))`` where ``Q(θ)`` is written here from first
principles: the output Jacobian ``J = ∂F/∂θ`` (``jacrev``), the loss gradient
and Hessian w.r.t. the output, ``torch.func.hessian`` for the Hessian
diagonals, and patches from a convolution with one-hot kernels (PyTorch's own
layer) for the Kronecker input factors.

Nets: ``conv -> sigmoid -> conv -> sigmoid -> flatten -> linear``, so the first
layer's quantities are backpropagated through the second one and the second
one's input depends on the parameters. KFRA's nets have no activations (then
its recursion is exact, see :func:`bias_ggn`) and cross-entropy (BackPACK's
KFRA fails for ``MSELoss`` in float64, ``expected scalar type Double``).

Monte-Carlo extensions: BackPACK's MSE square root is ``α (ỹ − F)`` for a
target ``ỹ`` sampled once and held fixed; the test records the sample BackPACK
drew and the reference differentiates ``α (ỹ − F(θ))``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import pytest
import torch
from backpack import backpack, extend
from backpack.core.derivatives.mseloss import MSELossDerivatives
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev

from tnbackpack import extensions as tn_extensions

DTYPE = torch.float64
CLASSES = 3
TOL = {"rtol": 1e-9, "atol": 1e-11}


# ---------------------------------------------------------------- networks
def _nets() -> Dict[str, Callable[[Optional[type]], nn.Sequential]]:
    def net(first: nn.Module, second: nn.Module, features: int):
        def build(act: Optional[type]) -> nn.Sequential:
            acts = [act(), act()] if act is not None else [None, None]
            layers = [first, acts[0], second, acts[1], nn.Flatten()]
            head = nn.Linear(features, CLASSES)
            return nn.Sequential(*[m for m in layers if m is not None], head)

        return build

    return {
        # circular padding: BackPACK 1.7.1 is silently wrong here
        "conv2d-circular": net(
            nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular"),
            nn.Conv2d(4, 2, 2, stride=2),
            2 * 2 * 2,
        ),
        "conv2d-grouped": net(
            nn.Conv2d(2, 4, 3, padding=1, groups=2),
            nn.Conv2d(4, 4, (2, 3), stride=2, padding=(0, 1), groups=2),
            4 * 2 * 2,
        ),
        "transposed-grouped": net(
            nn.ConvTranspose2d(2, 4, 2, stride=2, groups=2),
            nn.ConvTranspose2d(4, 2, 3, padding=2, output_padding=0, dilation=1),
            2 * 6 * 6,
        ),
        "conv1d": net(
            nn.Conv1d(2, 3, 3, padding="same", padding_mode="reflect"),
            nn.Conv1d(3, 2, 2, stride=2),
            2 * 2,
        ),
        "transposed3d": net(
            nn.ConvTranspose3d(2, 2, 2, stride=2, output_padding=1, dilation=2),
            # stride 2 reads every position: where a position is read by no
            # tap, its sigmoid residual is exactly 0 and BackPACK's square root
            # split of the Hessian has an infinite derivative (NaN, as in BackPACK)
            nn.Conv3d(2, 2, 2, stride=2),
            2 * 3 * 3 * 3,
        ),
    }


INPUT_SIZE = {
    "conv2d-circular": (4, 4),
    "conv2d-grouped": (4, 4),
    "transposed-grouped": (4, 4),
    "conv1d": (4,),
    "transposed3d": (2, 2, 2),
}
FAST_NETS = ["conv2d-circular", "conv2d-grouped", "transposed-grouped"]
SLOW_NETS = ["conv1d", "transposed3d"]

EXTENSIONS = tn_extensions.__all__
KRONECKER = ("KFAC", "KFLR", "KFRA")
MONTE_CARLO = ("KFAC", "DiagGGNMC", "BatchDiagGGNMC", "SqrtGGNMC")


def setup(net_name: str, extension: str, seed: int = 0):
    """Model, loss function, inputs, targets for one test."""
    torch.manual_seed(seed)
    act = None if extension == "KFRA" else nn.Sigmoid
    model = _nets()[net_name](act).to(DTYPE)
    x = torch.randn(2, 2, *INPUT_SIZE[net_name], dtype=DTYPE)
    if extension == "KFRA":
        loss_fn: nn.Module = nn.CrossEntropyLoss()
        y = torch.randint(0, CLASSES, (2,))
    else:
        loss_fn = nn.MSELoss()
        y = torch.randn(2, CLASSES, dtype=DTYPE)
    return model, loss_fn, x, y


def conv_layers(model: nn.Sequential) -> List[int]:
    return [i for i, m in enumerate(model) if isinstance(m, nn.modules.conv._ConvNd)]


# ------------------------------------------------------------- references
def patches(layer: nn.Module, x: Tensor) -> Tensor:
    """Patches ``[N, G, C_in/G·∏K, T]``: the layer's own forward with one-hot kernels.

    Output channel ``(g, i, k)`` of the patch layer reads input channel ``i``
    of group ``g`` at tap ``k``; a transposed layer stores its weight as
    ``[C_in, C_out/G, *K]``, hence the transpose.
    """
    groups, kernel = layer.groups, tuple(layer.kernel_size)
    ci = layer.in_channels // groups
    side = ci * math.prod(kernel)
    one_hot = torch.eye(side, dtype=x.dtype).reshape(side, ci, *kernel)
    if layer.transposed:
        one_hot = one_hot.transpose(0, 1)  # [ci, ci·∏K, *K]
    weight = one_hot.repeat(groups, *[1] * (one_hot.ndim - 1))
    zero_bias = torch.zeros(groups * side, dtype=x.dtype)
    out = functional_call(layer, {"weight": weight, "bias": zero_bias}, (x,))
    return out.reshape(x.shape[0], groups, side, -1)


class Reference:
    """Every quantity as a differentiable function of the flat parameters ``θ``."""

    def __init__(self, model: nn.Sequential, loss_fn: nn.Module, x: Tensor, y: Tensor):
        self.model, self.loss_fn, self.x, self.y = model, loss_fn, x, y
        named = dict(model.named_parameters())
        self.names = list(named)
        self.shapes = [named[n].shape for n in self.names]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.theta = torch.cat([named[n].detach().flatten() for n in self.names])

    def params(self, theta: Tensor) -> Dict[str, Tensor]:
        pieces = theta.split(self.sizes)
        return {n: p.reshape(s) for n, p, s in zip(self.names, pieces, self.shapes)}

    def output(self, theta: Tensor) -> Tensor:
        return functional_call(self.model, self.params(theta), (self.x,))

    def split(self, flat: Tensor) -> Dict[str, Tensor]:
        """``[..., P] -> {name: [..., *shape]}``."""
        lead = flat.shape[:-1]
        pieces = flat.split(self.sizes, dim=-1)
        return {
            n: p.reshape(*lead, *s) for n, p, s in zip(self.names, pieces, self.shapes)
        }

    def jacobian(self, theta: Tensor) -> Tensor:
        """``∂F[n, c]/∂θ``, ``[N, C, P]``."""
        return jacrev(self.output)(theta)

    def loss_gradient(self, theta: Tensor) -> Tensor:
        return grad(lambda out: self.loss_fn(out, self.y))(self.output(theta))

    def loss_hessian_blocks(self, theta: Tensor) -> Tensor:
        """Per-sample blocks ``H_nn`` of the loss Hessian w.r.t. the output."""
        full = hessian(lambda out: self.loss_fn(out, self.y))(self.output(theta))
        return torch.einsum("ncnd->ncd", full)

    def mse_sqrt(self, theta: Tensor) -> Tensor:
        """BackPACK's exact square root of MSE's ``h·I``: ``√h·I``, ``[C, N, C]``."""
        h = self.loss_hessian_blocks(theta)[0, 0, 0]
        eye = torch.eye(CLASSES, dtype=DTYPE)
        return h.sqrt() * eye.unsqueeze(1).expand(-1, self.x.shape[0], -1)

    def sampled_sqrt(self, theta: Tensor, recorded: Tensor, scale: float) -> Tensor:
        """``α (ỹ − F(θ))`` with the value BackPACK drew at the current ``θ``."""
        out = self.output(theta)
        return recorded + scale * (out.detach() - out)

    def per_sample_gradients(self, theta: Tensor) -> Tensor:
        return torch.einsum(
            "ncp,nc->np", self.jacobian(theta), self.loss_gradient(theta)
        )

    def hessian_diagonal(self, theta: Tensor) -> Tensor:
        loss = lambda t: self.loss_fn(self.output(t), self.y)  # noqa: E731
        return torch.diagonal(hessian(loss)(theta))

    def per_sample_hessian_diagonals(self, theta: Tensor) -> Tensor:
        """MSE (mean) is separable: sample ``n``'s term is its squared error / (N·C)."""
        scale = 1.0 / self.y.numel()

        def terms(t: Tensor) -> Tensor:
            return ((self.output(t) - self.y) ** 2).sum(1) * scale

        return torch.diagonal(jacrev(jacrev(terms))(theta), dim1=1, dim2=2)

    def layer_input(self, theta: Tensor, index: int) -> Tensor:
        head = self.model[:index]
        names = {
            n: p for n, p in self.params(theta).items() if int(n.split(".")[0]) < index
        }
        return functional_call(head, names, (self.x,))


def bias_ggn(sqrt_columns: Tensor) -> Tensor:
    """``Σ_{v,n} (J_bᵀ s)(J_bᵀ s)ᵀ`` from bias-Jacobian columns ``[V, N, C_out]``.

    The bias is added at every output position, so ``J_bᵀ s`` is the position
    sum of the backpropagated square root: this is the output-side factor of
    KFAC/KFLR (``"backpack"`` convention), and of KFRA for a network whose
    Jacobians do not depend on the sample (no activations).
    """
    flat = sqrt_columns.flatten(0, 1)
    return flat.t() @ flat


def kronecker_reference(
    ref: Reference, theta: Tensor, columns: Tensor, index: int
) -> Dict[str, List[Tensor]]:
    """``[B, A]`` for the weight and ``[B]`` for the bias of ``model[index]``."""
    layer = ref.model[index]
    bias = bias_ggn(columns)
    groups = layer.groups
    per_group = bias.shape[0] // groups
    diagonal = [slice(g * per_group, (g + 1) * per_group) for g in range(groups)]
    blocks = torch.stack([bias[rows, rows] for rows in diagonal])
    xt = patches(layer, ref.layer_input(theta, index))
    a = torch.einsum("ngit,ngjt->gij", xt, xt) / xt.shape[0]
    unstack = (lambda f: f[0]) if groups == 1 else (lambda f: f)  # noqa: E731
    return {
        f"{index}.weight": [unstack(blocks), unstack(a)],
        f"{index}.bias": [bias],
    }


def reference_quantities(
    extension: str, ref: Reference, theta: Tensor, sampled: Tensor, scale: float
) -> Dict[str, object]:
    """The extension's savefield values for every parameter, as functions of ``θ``."""
    if extension in ("BatchGrad", "BatchL2Grad", "SumGradSquared", "Variance"):
        per_sample = ref.split(ref.per_sample_gradients(theta))
        n = ref.x.shape[0]
        pick = {
            "BatchGrad": lambda g: g,
            "BatchL2Grad": lambda g: (g**2).flatten(1).sum(1),
            "SumGradSquared": lambda g: (g**2).sum(0),
            "Variance": lambda g: (g**2).sum(0) / n - (g.sum(0) / n) ** 2,
        }[extension]
        return {k: pick(g) for k, g in per_sample.items()}
    if extension == "DiagHessian":
        return ref.split(ref.hessian_diagonal(theta))
    if extension == "BatchDiagHessian":
        return ref.split(ref.per_sample_hessian_diagonals(theta))
    jac = ref.jacobian(theta)
    if extension in MONTE_CARLO:
        roots = ref.sampled_sqrt(theta, sampled, scale)  # [M, N, C]
    else:
        roots = ref.mse_sqrt(theta) if extension != "KFRA" else None
    if extension == "KFRA":  # cross-entropy: any square root of H_nn will do
        values, vectors = torch.linalg.eigh(ref.loss_hessian_blocks(theta))
        roots = (vectors * values.clamp(min=0).sqrt().unsqueeze(1)).permute(2, 0, 1)
    sqrt = torch.einsum("vnc,ncp->vnp", roots, jac)  # backpropagated to θ
    if extension in KRONECKER:
        split = ref.split(sqrt)
        result: Dict[str, object] = {}
        for index in conv_layers(ref.model):
            result.update(
                kronecker_reference(ref, theta, split[f"{index}.bias"], index)
            )
        return result
    if extension.startswith("SqrtGGN"):
        return ref.split(sqrt)
    squares = sqrt**2
    per_sample = extension.startswith("Batch")
    return ref.split(squares.sum(0) if per_sample else squares.sum((0, 1)))


# ------------------------------------------------------------------ test
def weighted_sum(values: Dict[str, object], weights: Dict[str, object]) -> Tensor:
    total = torch.zeros((), dtype=DTYPE)
    for name, weight in weights.items():
        value = values[name]
        if isinstance(weight, list):
            for v, w in zip(value, weight):
                total = total + (v * w).sum()
        else:
            total = total + (value * weight).sum()
    return total


@dataclass
class Run:
    """A ``backward(create_graph=True)`` under one extension, and what ``f`` needs."""

    params: Dict[str, Tensor]
    actual: Dict[str, object]  # savefield values of the checked parameters
    weights: Dict[str, object]  # fixed random R_p, shaped like them
    sampled: Tensor  # BackPACK's MC square root (zeros if none drawn)
    scale: float  # that square root's factor (MSE mean, one MC sample)


def backward_create_graph(
    model: nn.Module,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    extension: str,
    names: List[str],
) -> Run:
    """Extend, run ``backward(create_graph=True)``, record BackPACK's MC draw."""
    recorded: List[Tensor] = []
    original = MSELossDerivatives._sqrt_hessian_sampled

    def spy(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        recorded.append(result.detach().clone())
        return result

    ext = getattr(tn_extensions, extension)()
    extend(model)
    extend(loss_fn)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MSELossDerivatives, "_sqrt_hessian_sampled", spy)
        loss = loss_fn(model(x), y)
        with backpack(ext):
            loss.backward(create_graph=True)
    params = dict(model.named_parameters())
    actual = {n: getattr(params[n], ext.savefield) for n in names}
    generator = torch.Generator().manual_seed(1)

    def like(value):
        if isinstance(value, list):
            return [like(v) for v in value]
        return torch.randn(value.shape, generator=generator, dtype=DTYPE)

    return Run(
        params,
        actual,
        {n: like(v) for n, v in actual.items()},
        recorded[0] if recorded else torch.zeros(()),
        2.0 / math.sqrt(y.numel()),
    )


def check_create_graph(net_name: str, extension: str) -> None:
    model, loss_fn, x, y = setup(net_name, extension)
    # torch.func on a plain copy: BackPACK's hooks are no business of the reference
    ref = Reference(copy.deepcopy(model), copy.deepcopy(loss_fn), x, y)
    conv_names = [n for n in ref.names if int(n.split(".")[0]) in conv_layers(model)]
    run = backward_create_graph(model, loss_fn, x, y, extension, conv_names)
    params, actual, weights = run.params, run.actual, run.weights
    sampled, scale = run.sampled, run.scale

    def reference_f(theta: Tensor) -> Tensor:
        values = reference_quantities(extension, ref, theta, sampled, scale)
        return weighted_sum(values, weights)

    expected_values = reference_quantities(extension, ref, ref.theta, sampled, scale)
    for name in conv_names:
        got, want = actual[name], expected_values[name]
        pairs = list(zip(got, want)) if isinstance(got, list) else [(got, want)]
        # (a first layer's input factor A is a constant of the data)
        assert any(g.requires_grad for g, _ in pairs), f"{extension}: {name} detached"
        for g, w in pairs:
            torch.testing.assert_close(g.detach(), w.detach(), **TOL)

    f = weighted_sum(actual, weights)
    got = torch.autograd.grad(f, list(params.values()), allow_unused=True)
    got_flat = torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).flatten()
            for g, p in zip(got, params.values())
        ]
    )
    expected = grad(reference_f)(ref.theta)
    torch.testing.assert_close(got_flat, expected, **TOL)


@pytest.mark.parametrize("net_name", FAST_NETS)
@pytest.mark.parametrize("extension", EXTENSIONS)
def test_create_graph_matches_double_backward(extension, net_name):
    check_create_graph(net_name, extension)


@pytest.mark.slow
@pytest.mark.parametrize("net_name", SLOW_NETS)
@pytest.mark.parametrize("extension", EXTENSIONS)
def test_create_graph_matches_double_backward_slow(extension, net_name):
    check_create_graph(net_name, extension)


@pytest.mark.parametrize("extension", ["BatchGrad", "DiagGGNExact", "KFAC"])
def test_without_create_graph_nothing_is_recorded(extension):
    """The usual backward pass builds no graph (the out=/in-place paths run)."""
    model, loss_fn, x, y = setup("conv2d-grouped", extension)
    extend(model)
    extend(loss_fn)
    ext = getattr(tn_extensions, extension)()
    with backpack(ext):
        loss_fn(model(x), y).backward()
    for p in model[0].parameters():
        value = getattr(p, ext.savefield)
        for v in value if isinstance(value, list) else [value]:
            assert not v.requires_grad


# ------------------------------------------- every engine route, by gradcheck
ROUTE_LAYERS = {
    "conv": nn.Conv2d(4, 4, 3, padding=1, groups=2, padding_mode="circular"),
    "transposed": nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1),
}


def _engine_operands(kind: str, vectors: bool):
    from tnbackpack.tn import ConvSpec

    layer = ROUTE_LAYERS[kind].to(DTYPE)
    spec = ConvSpec.from_module(layer)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, layer.in_channels, 3, 3, generator=gen, dtype=DTYPE)
    out = layer(x)
    lead = (2,) if vectors else ()
    g = torch.randn(*lead, *out.shape, generator=gen, dtype=DTYPE)
    return spec, layer, x.requires_grad_(), g.requires_grad_()


@pytest.mark.parametrize("kind", list(ROUTE_LAYERS))
@pytest.mark.parametrize("vectors", [False, True])
@pytest.mark.parametrize("route", ["tn", "shifted", "unfold", "grouped"])
def test_per_sample_routes_are_differentiable(kind, vectors, route):
    """Autograd's derivatives of each route against finite differences."""
    from tnbackpack.tn import functional

    if kind == "transposed" and route == "unfold":
        pytest.skip("unfold is for convolutions only")
    spec, _, x, g = _engine_operands(kind, vectors)

    def quantity(x: Tensor, g: Tensor) -> Tensor:
        return functional.per_sample_weight_vjp(spec, x, g, vectors, route=route)

    assert torch.autograd.gradcheck(quantity, (x, g))


@pytest.mark.parametrize("kind", list(ROUTE_LAYERS))
@pytest.mark.parametrize("route", ["materialize", "contract"])
def test_squares_routes_are_differentiable(kind, route):
    from tnbackpack.tn import functional

    spec, _, x, g = _engine_operands(kind, vectors=True)

    def quantity(x: Tensor, g: Tensor) -> Tensor:
        return functional.weight_vjp_squares(spec, x, g, vectors=True, route=route)

    assert torch.autograd.gradcheck(quantity, (x, g))


@pytest.mark.parametrize("kind", list(ROUTE_LAYERS))
@pytest.mark.parametrize("route", ["torch", "tn"])
def test_input_vjp_routes_are_differentiable(kind, route):
    from tnbackpack.tn import functional

    spec, layer, x, g = _engine_operands(kind, vectors=True)
    weight = layer.weight.detach().clone().requires_grad_()

    def quantity(g: Tensor, w: Tensor) -> Tensor:
        return functional.input_vjp(spec, g, w, x.shape[2:], vectors=True, route=route)

    assert torch.autograd.gradcheck(quantity, (g, weight))


@pytest.mark.parametrize("kind", list(ROUTE_LAYERS))
def test_kfac_factors_are_differentiable(kind):
    from tnbackpack.tn import functional

    spec, _, x, g = _engine_operands(kind, vectors=True)
    routes = ["tn"] if kind == "transposed" else ["tn", "strided"]
    for route in routes:
        assert torch.autograd.gradcheck(
            lambda x, r=route: functional.kfac_input_factor(spec, x, "expand", route=r),
            (x,),
        )
    assert torch.autograd.gradcheck(
        lambda x: functional.kfac_input_factor(spec, x, "reduce"), (x,)
    )
    for approx in ("expand", "reduce"):
        assert torch.autograd.gradcheck(
            lambda g, a=approx: functional.kfac_output_factor(spec, g, a), (g,)
        )
