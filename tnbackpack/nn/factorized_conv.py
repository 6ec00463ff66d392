"""Factorized convolution layers: CP, Tucker-2, tensor-train and tensor-ring kernels.

``FactorizedConv{1,2,3}d`` take the arguments and carry the attributes of
PyTorch's ``Conv{1,2,3}d`` plus ``rank`` and ``factorization``. Their kernel
is never built: the forward pass evaluates the layer's :attr:`equation` with
:func:`tnbackpack.conv_einsum`. Each factor is the weight of one stage
convolution (:mod:`.factorizations`), which is how tnbackpack's BackPACK
extensions compute per-factor quantities.
"""

from __future__ import annotations

from functools import lru_cache
from math import prod
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..tn.conv_einsum import PerSampleRequest, conv_einsum
from ..tn.spec import ConvSpec, IntOrTuple
from . import stages
from .factorizations import Factor, Rank, build_factors, resolve_ranks, spatial_letters

__all__ = ["FactorizedConv1d", "FactorizedConv2d", "FactorizedConv3d"]

_DENSE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}

#: Set by :mod:`tnbackpack.extensions.factorized`: whether the running
#: backward wants per-sample factor gradients of a layer (an active
#: first-order extension for it). ``None``: never.
PER_SAMPLE_WANTED: Optional[Callable[[nn.Module], bool]] = None


@lru_cache(maxsize=256)
def _cached_factors(
    factorization: str, spec: ConvSpec, ranks: Tuple[int, ...]
) -> Tuple[Factor, ...]:
    return build_factors(factorization, spec, ranks)


class FactorizedConvNd(nn.Module):
    """A convolution whose kernel is a CP, Tucker-2, TT or TR tensor network.

    Args:
        in_channels: Input channels ``C_in``.
        out_channels: Output channels ``C_out``.
        kernel_size: Kernel size (int or one per spatial axis).
        rank: ``"cp"``: an int ``R``; ``"tucker"``: ``(R_in, R_out)``;
            ``"tt"``: ``d + 1`` bonds in the order ``(C_in, K_1, …, K_d,
            C_out)``; ``"tr"``: those and the ring bond last (``d + 2``).
            An int gives every rank that value; a float is a compression
            ratio (fraction of the dense kernel's parameters kept). Ranks are
            per channel group.
        factorization: ``"cp"``, ``"tucker"``, ``"tt"`` or ``"tr"``.
        stride: As in PyTorch.
        padding: As in PyTorch (int, tuple, ``'same'``, ``'valid'``).
        dilation: As in PyTorch.
        groups: As in PyTorch; every group has its own factors.
        bias: Whether to add a learnable bias.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
        device: Device of the parameters.
        dtype: Floating dtype of the parameters.

    Raises:
        ValueError: For hyper-parameters PyTorch rejects, an unknown
            factorization or invalid ranks.
    """

    ndim: int = 0

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        rank: Rank,
        factorization: str = "cp",
        stride: IntOrTuple = 1,
        padding: Union[str, IntOrTuple] = 0,
        dilation: IntOrTuple = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        try:
            spec = ConvSpec.from_kwargs(
                self.ndim,
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding,
                dilation,
                groups,
                bias,
                padding_mode,
            )
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name}: {error}") from error
        if not isinstance(padding, str) and any(a != b for a, b in spec.padding):
            raise ValueError(f"{name}: padding must be symmetric, got {padding!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = spec.kernel_size
        self.stride = spec.stride
        self.padding = (
            padding
            if isinstance(padding, str)
            else tuple(left for left, _ in spec.padding)
        )
        self.dilation = spec.dilation
        self.groups = groups
        self.padding_mode = padding_mode
        self.factorization = factorization
        self.rank = resolve_ranks(factorization, rank, spec, name)
        kwargs = {"device": device, "dtype": dtype}
        for factor in _cached_factors(factorization, spec, self.rank):
            self.register_parameter(
                factor.name, nn.Parameter(torch.empty(factor.shape, **kwargs))
            )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    # ------------------------------------------------------------- structure
    def dense_spec(self) -> ConvSpec:
        """Engine spec of the equivalent dense convolution."""
        return ConvSpec.from_kwargs(
            self.ndim,
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias is not None,
            self.padding_mode,
        )

    def factor_plan(self) -> Tuple[Factor, ...]:
        """The factors and their stage convolutions, in the order of the equation."""
        return _cached_factors(self.factorization, self.dense_spec(), self.rank)

    @property
    def factors(self) -> Dict[str, nn.Parameter]:
        """The factor parameters by name, in the order of the equation."""
        return {f.name: getattr(self, f.name) for f in self.factor_plan()}

    def factor_tensors(self) -> List[Tensor]:
        """The factor parameters in the order of the equation."""
        return [getattr(self, f.name) for f in self.factor_plan()]

    def _letters(self) -> Tuple[str, str, str]:
        group = "g" if self.groups > 1 else ""
        spatial = spatial_letters(self.dense_spec())
        return (
            group,
            spatial,
            ",".join(group + f.subscripts for f in self.factor_plan()),
        )

    @property
    def equation(self) -> str:
        """The conv_einsum string of the layer, e.g. ``"nchw,rc,rh,rw,or->nohw|hw"``.

        Its operands are :meth:`einsum_operands`: with ``groups > 1`` the
        input is viewed as ``[N, G, C_in/G, *I]`` and every factor gets a
        leading group axis (letter ``g``).
        """
        group, spatial, factors = self._letters()
        return f"n{group}c{spatial},{factors}->n{group}o{spatial}|{spatial}"

    def einsum_operands(
        self, x: Tensor, tensors: Optional[Sequence[Tensor]] = None
    ) -> List[Tensor]:
        """The input and the factors, viewed as the :attr:`equation` reads them.

        ``tensors`` replace the factor parameters (same shapes) if given.
        """
        grouped = self._grouped_factors(tensors)
        if self.groups == 1:
            return [x, *grouped]
        return [x.unflatten(1, (self.groups, -1)), *grouped]

    def _grouped_factors(
        self, tensors: Optional[Sequence[Tensor]] = None
    ) -> List[Tensor]:
        """The factors (or ``tensors``), with a leading group axis if ``groups > 1``."""
        tensors = list(self.factor_tensors() if tensors is None else tensors)
        if self.groups == 1:
            return tensors
        g = self.groups
        return [t.reshape(g, t.shape[0] // g, *t.shape[1:]) for t in tensors]

    def full_weight(self) -> Tensor:
        """The equivalent dense kernel ``[C_out, C_in/G, *K]`` (differentiable)."""
        group, spatial, factors = self._letters()
        equation = f"{factors}->{group}oc{spatial}"
        kernel = torch.einsum(equation, *self._grouped_factors())
        return kernel.reshape(
            self.out_channels, self.in_channels // self.groups, *self.kernel_size
        )

    def num_factor_parameters(self) -> int:
        """Number of entries of all factors (without the bias)."""
        return sum(prod(f.shape) for f in self.factor_plan())

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        """The layer output ``[N, C_out, *O]``: :attr:`equation` by conv_einsum.

        Twice differentiable, as conv_einsum is.
        """
        self._check_input(x)
        # a BackPACK-extended layer may be asked for per-sample gradients
        extended = getattr(self, "_backpack_extend", False)
        out = self._by_einsum(x, self.factor_tensors(), per_sample=extended)
        if self.bias is not None:
            out = out + self.bias.reshape(-1, *(1,) * self.ndim)
        # the evaluation order may leave a permuted layout; later layers (and
        # BackPACK's rules for them) expect PyTorch's contiguous one
        return out.contiguous()

    def _by_einsum(
        self, x: Tensor, tensors: Sequence[Tensor], per_sample: bool = False
    ) -> Tensor:
        """The layer output without bias, by conv_einsum, from given factor tensors.

        With ``per_sample``, the backward computes per-sample factor
        gradients when :data:`PER_SAMPLE_WANTED` says so for this layer, and
        leaves them in :attr:`per_sample_request`.
        """
        request = None
        if per_sample:
            request = PerSampleRequest(
                "n", tuple(range(1, len(tensors) + 1)), self._per_sample_positions
            )
        self.per_sample_request = request
        out = conv_einsum(
            self.equation,
            *self.einsum_operands(x, tensors),
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            padding_mode=self.padding_mode,
            per_sample=request,
        )
        return out.flatten(1, 2) if self.groups > 1 else out

    def _per_sample_positions(self) -> Tuple[int, ...]:
        """Factor operands whose per-sample gradients the backward should make."""
        if PER_SAMPLE_WANTED is None or not PER_SAMPLE_WANTED(self):
            return ()
        return tuple(range(1, len(self.factor_plan()) + 1))

    def per_sample_factor_gradients(
        self, grad_output: Optional[Tensor] = None
    ) -> Optional[List[Tensor]]:
        """Per-sample factor gradients ``[N, *factor]`` of the last backward.

        Left by the last backward of the last forward if it made them (a
        BackPACK-extended layer inside a tnbackpack first-order extension's
        context), in the order of the equation; ``None`` otherwise.

        Args:
            grad_output: The output gradient ``[N, C_out, *O]`` of the running
                backward, given when it has not reached the layer's
                contraction yet (BackPACK's hook of a layer whose input needs
                no gradient fires first): the per-sample gradients are made
                now, and the contraction's backward returns their sums. Once
                that backward has run, gradients left from it are not this
                backward's: ``None`` then.
        """
        request = getattr(self, "per_sample_request", None)
        if request is None:
            return None
        if grad_output is not None:
            if request.context is None:  # the contraction's backward already ran
                return None
            if request.gradients is None and not torch.is_grad_enabled():
                # (under create_graph the stage walk keeps the graph instead)
                if self.groups > 1:
                    grad_output = grad_output.unflatten(1, (self.groups, -1))
                request.compute(grad_output)
        grads = request.gradients
        if grads is None:
            return None
        plan = self.factor_plan()
        batch = next(iter(grads.values())).shape[0]
        return [
            None if k + 1 not in grads else grads[k + 1].reshape(batch, *f.shape)
            for k, f in enumerate(plan)
        ]

    def forward_stages(self, x: Tensor) -> Tensor:
        """The layer output computed stage by stage (ordinary convolutions)."""
        return stages.run_stages(
            self.factor_plan(), self.factor_tensors(), x, self.bias
        )[0]

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.ndim != self.ndim + 2:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__}: expected an input [N, C_in, "
                f"{self.ndim} spatial axes], got {shape}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: expected {self.in_channels} input channels, "
                f"got input of shape {tuple(x.shape)}"
            )

    # ---------------------------------------------------------- initialization
    def reset_parameters(self) -> None:
        """Match the output variance of PyTorch's default ``Conv`` initialization.

        PyTorch draws the dense kernel from ``U(±1/√fan_in)``, variance
        ``1/(3·fan_in)``. The factors here are independent, zero-mean normal
        tensors, so distinct kernel entries are uncorrelated and each has the
        variance ``(#summed rank terms) · ∏ σ_f²``; all ``σ_f`` are chosen
        equal so that this is ``1/(3·fan_in)``. The bias is PyTorch's.
        """
        fan_in = self.in_channels // self.groups * prod(self.kernel_size)
        target = 1.0 / (3.0 * fan_in)
        plan = self.factor_plan()
        terms = prod(self._rank_letter_sizes().values())
        std = (target / terms) ** (1.0 / (2 * len(plan)))
        with torch.no_grad():
            for tensor in self.factor_tensors():
                tensor.normal_(0.0, std)
            if self.bias is not None:
                bound = 1.0 / fan_in**0.5
                self.bias.uniform_(-bound, bound)

    def _rank_letter_sizes(self) -> Dict[str, int]:
        """Sizes of the letters summed in the kernel (ranks, per group)."""
        group, spatial, _ = self._letters()
        dense = set(group + "oc" + spatial)
        sizes: Dict[str, int] = {}
        for factor, tensor in zip(self.factor_plan(), self._grouped_factors()):
            letters = group + factor.subscripts
            for letter, size in zip(letters, tensor.shape):
                if letter not in dense:
                    sizes[letter] = size
        return sizes

    # ------------------------------------------------------------ conversions
    def to_conv(self) -> nn.Module:
        """The equivalent dense ``nn.Conv{1,2,3}d`` (a copy, not tied)."""
        first = self.factor_tensors()[0]
        conv = _DENSE[self.ndim](
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=first.device,
            dtype=first.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.full_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def to_stages(self) -> nn.Sequential:
        """The layer as an ``nn.Sequential`` of its stage convolutions (copies).

        What a user without factorized-layer support would write (and what
        BackPACK's own extensions can process).

        Raises:
            ValueError: For ``"tr"``: its kernel-core stages carry the ring
                bond as an extra spatial axis, which needs reshapes between
                the stages, not a plain sequence of convolutions.
        """
        if self.factorization == "tr":
            raise ValueError(
                f"{type(self).__name__}.to_stages: the tensor ring's stages need "
                "reshapes of the ring bond between them; use forward_stages"
            )
        stages = []
        for factor, tensor in zip(self.factor_plan(), self.factor_tensors()):
            spec = factor.stage
            # 'same' of the layer is 'same' of each stage (0 where a tap is 1)
            same = self.padding == "same"
            conv = _DENSE[spec.ndim](
                spec.in_channels,
                spec.out_channels,
                spec.kernel_size,
                stride=spec.stride,
                padding="same" if same else tuple(left for left, _ in spec.padding),
                dilation=spec.dilation,
                groups=spec.groups,
                bias=spec.bias,
                padding_mode=spec.padding_mode,
                device=tensor.device,
                dtype=tensor.dtype,
            )
            with torch.no_grad():
                conv.weight.copy_(tensor.reshape(conv.weight.shape))
                if spec.bias:
                    conv.bias.copy_(self.bias)
            stages.append(conv)
        return nn.Sequential(*stages)

    @classmethod
    def from_conv(
        cls, conv: nn.Module, factorization: str, rank: Rank, **options
    ) -> FactorizedConvNd:
        """Decompose a (trained) dense convolution's kernel with tensorly.

        CP by ALS (``parafac``), Tucker-2 by HOOI (``tucker`` on the channel
        modes), TT by TT-SVD (``tensor_train``), TR by ``tensor_ring``; per
        channel group. ``options`` go to the tensorly function. Needs
        ``pip install tensorly`` (the ``decompositions`` extra).

        Raises:
            TypeError: If ``conv`` is not an ``nn.Conv{1,2,3}d`` of this
                layer's dimension.
        """
        from .decompose import factorize_conv

        return factorize_conv(cls, conv, factorization, rank, **options)

    def extra_repr(self) -> str:
        """PyTorch's conv summary plus the factorization and its ranks."""
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"factorization={self.factorization!r}, rank={self.rank}, "
            f"stride={self.stride}"
        )
        if self.padding != (0,) * self.ndim:
            text += f", padding={self.padding!r}"
        if self.dilation != (1,) * self.ndim:
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        return text


class FactorizedConv1d(FactorizedConvNd):
    """Factorized ``Conv1d``; see :class:`FactorizedConvNd`."""

    ndim = 1


class FactorizedConv2d(FactorizedConvNd):
    """Factorized ``Conv2d``; see :class:`FactorizedConvNd`."""

    ndim = 2


class FactorizedConv3d(FactorizedConvNd):
    """Factorized ``Conv3d``; see :class:`FactorizedConvNd`."""

    ndim = 3


#: The layer types tnbackpack's extensions register module extensions for.
FACTORIZED_CONV_TYPES = (FactorizedConv1d, FactorizedConv2d, FactorizedConv3d)
