"""BackPACK derivatives of every (transposed) convolution, N-d generic.

BackPACK's second-order module extensions ask a derivatives object for
transposed Jacobian products: to the layer input (backpropagating square roots
of the GGN or Hessian), to the weight and the bias (``param_mjp``), and for
KFRA the batch-averaged ``Jᵀ Ḡ J``. :class:`ConvDerivatives` answers all of
them for ``Conv{1,2,3}d`` and ``ConvTranspose{1,2,3}d`` with every
hyper-parameter (strings ``'same'``/``'valid'``, every padding mode, groups,
dilation, ``output_padding`` and transposed layers called with
``output_size=``), where BackPACK's own classes are wrong or crash.

The input VJP uses the engine's routes
(:func:`~tnbackpack.tn.functional.input_vjp`): PyTorch's kernels for
overlapping kernels and transposed layers; where the index patterns are
strided windows (1×1, patchify, down-sampling shortcuts) the faster of the
tensor network and the kernel, timed once per layer shape (with
:data:`tnbackpack.tn.autotune.POLICY` ``"model"``: the network, except for 1×1
stride-1 layers that widen their channels). Measured CPU seconds (one thread,
V=10 vectors, N=32, 32→64 channels, 32×32 inputs;
``examples/bench_second_order.py --routes``), torch vs tn: 3×3 stride 1 0.32
vs 1.25; 3×3 stride 2 0.18 vs 0.52; 1×1 stride 2 0.17 vs 0.06; transposed 2×2
stride 2 0.13 vs 0.19. For 1×1 stride-1 layers see
``python -m tnbackpack.benchmark.input_vjp``.
"""

from __future__ import annotations

from math import prod
from typing import List, Optional, Sequence, Tuple

from backpack.core.derivatives.basederivatives import BaseParameterDerivatives
from torch import Tensor, nn

from ..tn import functional
from ..tn.spec import ConvSpec
from .layer import conv_spec, layer_input

INPUT_VJP_ROUTES = ("auto", "torch", "tn")

Grads = Tuple[Optional[Tensor], ...]


# ------------------------------------------------------------------ input VJP
def input_vjp(
    module: nn.Module,
    mat: Tensor,
    input_size: Optional[Sequence[int]] = None,
    route: str = "auto",
) -> Tensor:
    """Transposed input Jacobian of a conv layer applied to ``V`` vectors.

    Args:
        module: The layer (BackPACK has stored its input and output).
        mat: ``[V, N, C_out, *O]``; ``N`` may be a sub-sample of the batch.
        input_size: Spatial input size; defaults to that of the stored input.
        route: ``"torch"``, ``"tn"`` or ``"auto"`` (see the module docstring).

    Returns:
        ``[V, N, C_in, *I]``.
    """
    if route not in INPUT_VJP_ROUTES:
        raise ValueError(f"route must be one of {INPUT_VJP_ROUTES}, got {route!r}")
    if input_size is None:
        input_size = tuple(module.input0.shape[2:])
    # not detached: differentiable under create_graph=True, as BackPACK's
    return functional.input_vjp(
        conv_spec(module), mat, module.weight, input_size, vectors=True, route=route
    )


# ---------------------------------------------------------------- derivatives
class ConvDerivatives(BaseParameterDerivatives):
    """Derivatives of ``Conv{1,2,3}d`` and ``ConvTranspose{1,2,3}d`` for BackPACK.

    One object serves every conv type: the layer's spec is read off the module.
    """

    def __init__(self, input_vjp_route: str = "auto") -> None:
        """Store the input-VJP route (``"auto"``, ``"torch"`` or ``"tn"``)."""
        if input_vjp_route not in INPUT_VJP_ROUTES:
            raise ValueError(
                f"input_vjp_route must be one of {INPUT_VJP_ROUTES}, "
                f"got {input_vjp_route!r}"
            )
        self.input_vjp_route = input_vjp_route

    def hessian_is_zero(self, module: nn.Module) -> bool:
        """A convolution is linear in its input."""
        return True

    def _jac_t_mat_prod(
        self,
        module: nn.Module,
        g_inp: Grads,
        g_out: Grads,
        mat: Tensor,
        subsampling: Optional[List[int]] = None,
    ) -> Tensor:
        return input_vjp(module, mat, route=self.input_vjp_route)

    def _weight_jac_t_mat_prod(
        self,
        module: nn.Module,
        g_inp: Grads,
        g_out: Grads,
        mat: Tensor,
        sum_batch: bool = True,
        subsampling: Optional[List[int]] = None,
    ) -> Tensor:
        x = layer_input(module, subsampling)
        per_sample = functional.per_sample_weight_vjp(
            conv_spec(module), x, mat, vectors=True
        )
        return per_sample.sum(1) if sum_batch else per_sample

    def _bias_jac_t_mat_prod(
        self,
        module: nn.Module,
        g_inp: Grads,
        g_out: Grads,
        mat: Tensor,
        sum_batch: bool = True,
        subsampling: Optional[List[int]] = None,
    ) -> Tensor:
        return functional.bias_vjp(
            conv_spec(module), mat, vectors=True, per_sample=not sum_batch
        )

    def ea_jac_t_mat_jac_prod(
        self, module: nn.Module, g_inp: Grads, g_out: Grads, mat: Tensor
    ) -> Tensor:
        """``Jᵀ Ḡ J`` for KFRA, ``[D_in, D_in]`` from ``Ḡ [D_out, D_out]``.

        A convolution's Jacobian is the same for every sample, so the batch
        average is one product. The rows of ``Ḡ`` are pulled back as ``D_out``
        vectors of a batch of one, then the rows of the transposed result; as
        in BackPACK the result is ``(Jᵀ Ḡᵀ J)ᵀ``, i.e. ``Jᵀ Ḡ J``.
        """
        return ea_jac_t_mat_jac(
            conv_spec(module),
            module.weight,  # not detached: differentiable under create_graph
            tuple(module.input0.shape[1:]),
            tuple(module.output.shape[1:]),
            mat,
            self.input_vjp_route,
        )


def ea_jac_t_mat_jac(
    spec: ConvSpec,
    weight: Tensor,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    mat: Tensor,
    route: str = "auto",
) -> Tensor:
    """``Jᵀ Ḡ J`` of a conv layer, ``[D_in, D_in]`` from ``Ḡ [D_out, D_out]``.

    Args:
        spec: The layer.
        weight: Its weight.
        in_shape: Input shape without the batch axis, ``(C_in, *I)``.
        out_shape: Output shape without the batch axis, ``(C_out, *O)``.
        mat: ``Ḡ``.
        route: Input-VJP route (see :func:`input_vjp`).
    """
    d_out, d_in = prod(out_shape), prod(in_shape)

    def pull_back(rows: Tensor) -> Tensor:
        vectors = rows.reshape(rows.shape[0], 1, *out_shape)
        return functional.input_vjp(
            spec, vectors, weight, in_shape[1:], vectors=True, route=route
        ).reshape(rows.shape[0], d_in)

    mat_jac = pull_back(mat.reshape(d_out, d_out))
    return pull_back(mat_jac.t()).t()
