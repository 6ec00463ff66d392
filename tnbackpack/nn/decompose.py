"""Decompose a dense convolution kernel into a factorized layer, with tensorly.

tensorly is imported here only (``pip install tensorly``, or the
``decompositions`` extra). Each channel group's kernel ``[C_out/G, C_in/G,
*K]`` is decomposed on its own, in float64 on the CPU (tensorly's NumPy
backend), then copied into the layer's factors:

- CP by alternating least squares (``parafac``, SVD initialization); the
  weights λ are spread evenly over the factors (every factor's column ``r``
  gets the norm ``(λ_r ∏ ‖a_r‖)^(1/F)``), which keeps gradient steps on the
  factors well scaled;
- Tucker-2 by higher-order orthogonal iteration on the two channel modes
  (``partial_tucker``); the core keeps the taps;
- TT by TT-SVD (``tensor_train``) of the kernel reordered to
  ``(C_in, K_1, …, K_d, C_out)``;
- TR by ``tensor_ring`` (sequential SVDs) of the same reordering.

Where a requested rank exceeds what the kernel's unfoldings support (TT and
Tucker ranks are bounded by the sizes they join), tensorly returns smaller
factors; they are padded with zeros, which leaves the kernel unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .factorizations import Rank

_DENSE_NAMES = {1: "Conv1d", 2: "Conv2d", 3: "Conv3d"}


def _tensorly() -> Any:
    try:
        import tensorly
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            "from_conv needs tensorly: pip install tensorly "
            "(or tnbackpack[decompositions])"
        ) from error
    return tensorly


def _cp(
    kernel: np.ndarray, ranks: Tuple[int, ...], options: Dict
) -> Dict[str, np.ndarray]:
    from tensorly.decomposition import parafac

    (rank,) = ranks
    # tensorly's SVD initialization needs rank <= every mode's size
    init = "svd" if rank <= min(kernel.shape) else "random"
    settings = {"init": init, "n_iter_max": 500, "tol": 1e-10, "random_state": 0}
    settings.update(options)
    weights, factors = parafac(kernel, rank, **settings)
    # balance: every factor's column r gets the same norm, (λ_r ∏_f ‖a_fr‖)^(1/F);
    # CP factors out of ALS can differ in scale by orders of magnitude, which
    # makes gradient steps on them badly conditioned
    norms = [np.linalg.norm(f, axis=0) for f in factors]
    scale = np.abs(weights) * np.prod(norms, axis=0)
    share = np.where(scale > 0, scale, 0.0) ** (1.0 / len(factors))
    signs = np.sign(weights)
    balanced = [f / np.where(n > 0, n, 1.0) * share for f, n in zip(factors, norms)]
    out, inp, *taps = balanced
    result = {"input_factor": inp.T, "output_factor": out * signs}
    for d, tap in enumerate(taps):
        result[f"kernel_factor_{d}"] = tap.T
    return result


def _tucker(
    kernel: np.ndarray, ranks: Tuple[int, ...], options: Dict
) -> Dict[str, np.ndarray]:
    from tensorly.decomposition import partial_tucker

    r_in, r_out = ranks
    fitting = [min(r_out, kernel.shape[0]), min(r_in, kernel.shape[1])]
    settings = {"n_iter_max": 200, "tol": 1e-10, "random_state": 0}
    settings.update(options)
    (core, (out, inp)), _ = partial_tucker(kernel, fitting, modes=[0, 1], **settings)
    return {"input_factor": inp.T, "core": core, "output_factor": out}


def _channel_order(kernel: np.ndarray) -> np.ndarray:
    """``[C_out, C_in, *K]`` → ``[C_in, *K, C_out]`` (the TT/TR core order)."""
    return np.moveaxis(kernel, 0, -1)


def _tt(
    kernel: np.ndarray, ranks: Tuple[int, ...], options: Dict
) -> Dict[str, np.ndarray]:
    from tensorly.decomposition import tensor_train

    cores = tensor_train(_channel_order(kernel), [1, *ranks, 1], **options).factors
    first, *middle, last = cores
    result = {"input_core": first[0].T, "output_core": last[:, :, 0].T}
    for d, core in enumerate(middle):  # [r_d, K_d, r_d+1] -> [r_d+1, r_d, K_d]
        result[f"kernel_core_{d}"] = core.transpose(2, 0, 1)
    return result


def _tr(
    kernel: np.ndarray, ranks: Tuple[int, ...], options: Dict
) -> Dict[str, np.ndarray]:
    from tensorly.decomposition import tensor_ring

    *bonds, ring = ranks
    cores = tensor_ring(_channel_order(kernel), [ring, *bonds, ring], **options).factors
    first, *middle, last = cores  # first [r_z, C, r_0], last [r_d, O, r_z]
    result = {
        "input_core": first.transpose(2, 0, 1),
        "output_core": last.transpose(1, 0, 2),
    }
    for d, core in enumerate(middle):
        result[f"kernel_core_{d}"] = core.transpose(2, 0, 1)
    return result


DECOMPOSERS: Dict[
    str, Callable[[np.ndarray, Tuple[int, ...], Dict], Dict[str, np.ndarray]]
] = {
    "cp": _cp,
    "tucker": _tucker,
    "tt": _tt,
    "tr": _tr,
}


def _zero_padded(block: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``block`` in the top-left corner of zeros of ``shape``."""
    if block.shape == tuple(shape):
        return block
    padded = np.zeros(shape)
    padded[tuple(slice(0, s) for s in block.shape)] = block
    return padded


def factorize_conv(
    cls: type, conv: nn.Module, factorization: str, rank: Rank, **options
) -> nn.Module:
    """A ``cls`` layer whose factors decompose ``conv``'s kernel (see the module doc).

    Raises:
        TypeError: If ``conv`` is not a convolution of ``cls``'s dimension.
        ValueError: If tensorly cannot decompose at these ranks.
    """
    expected = getattr(nn, _DENSE_NAMES[cls.ndim])
    if type(conv) is not expected:
        raise TypeError(
            f"{cls.__name__}.from_conv expects an nn.{expected.__name__}, "
            f"got {type(conv).__name__}"
        )
    tensorly = _tensorly()
    layer = cls(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        rank,
        factorization,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    groups = conv.groups
    kernel = conv.weight.detach().to("cpu", torch.float64).numpy()
    blocks = np.split(kernel, groups, axis=0)
    decompose = DECOMPOSERS[factorization]
    pieces = []
    for block in blocks:
        try:
            # NumPy whatever the global backend is (importing tensorly-torch
            # switches it to PyTorch for the whole process)
            with tensorly.backend_context("numpy"):
                pieces.append(decompose(block, layer.rank, options))
        except (ValueError, IndexError, np.linalg.LinAlgError) as error:
            raise ValueError(
                f"{cls.__name__}.from_conv: tensorly cannot decompose the "
                f"{list(block.shape)} kernel of each group by {factorization!r} "
                f"at rank {layer.rank}: {error}"
            ) from error
    with torch.no_grad():
        for name, param in layer.factors.items():
            shape = (param.shape[0] // groups, *param.shape[1:])
            stacked = np.concatenate([_zero_padded(p[name], shape) for p in pieces])
            param.copy_(torch.from_numpy(stacked))
        if conv.bias is not None:
            layer.bias.copy_(conv.bias)
    return layer
