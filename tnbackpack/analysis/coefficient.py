"""A ConvAC's coefficient tensor and grid tensor as networks of the engine.

Axis names: ``x{i}`` is the feature leg of patch ``i``; ``p{l}.{w}`` is the
channel leg shared by the nodes of window ``w`` of level ``l`` and by the node
of level ``l+1`` they pool into (product pooling is a hyperedge: a channel
index held by every node of the window). Leaves attach to the ``x{i}`` legs:
a template matrix ``[M, F]`` per patch gives the grid tensor, one template
vector fixes a patch (a sub-grid), and a matrix whose first leg is shared by
several patches enumerates chosen rows or columns only.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..tn.network import TensorNetwork
from .convac import ConvAC

Leaf = Tuple[Tensor, Tuple[str, ...]]


def feature_axis(patch: int) -> str:
    """The feature leg of patch ``patch``."""
    return f"x{patch}"


def template_axis(patch: int) -> str:
    """The template leg of patch ``patch`` in the grid tensor."""
    return f"d{patch}"


def convac_network(
    model: ConvAC,
    leaves: Sequence[Optional[Leaf]],
    output: Sequence[str],
    dtype: torch.dtype = torch.float64,
) -> TensorNetwork:
    """The ConvAC's network with a leaf (or an open feature leg) per patch.

    Args:
        model: The ConvAC.
        leaves: Per patch ``None`` (the feature leg stays open) or an operand
            and its axis names, one of which is the patch's feature axis.
        output: Axis names of the result.
        dtype: Dtype of the operands.
    """
    if not isinstance(model, ConvAC):
        raise TypeError(
            f"coefficient networks exist for ConvACs (deep_convac/shallow_convac), "
            f"not {type(model).__name__}; use grid_tensor for other models"
        )
    if len(leaves) != model.num_patches:
        raise ValueError(f"{len(leaves)} leaves for {model.num_patches} patches")
    network = TensorNetwork([], [], tuple(output))
    for patch, leaf in enumerate(leaves):
        if leaf is not None:
            operand, axes = leaf
            if feature_axis(patch) not in axes:
                raise ValueError(
                    f"leaf of patch {patch} lacks axis {feature_axis(patch)}"
                )
            network.add(operand.to(dtype), axes)
    inputs = [feature_axis(i) for i in range(model.num_patches)]
    for level, windows in enumerate(model.windows):
        pooled = [""] * len(inputs)
        for w, window in enumerate(windows):
            for node in window:
                pooled[node] = f"p{level}.{w}"
        for node, (out_axis, in_axis) in enumerate(zip(pooled, inputs)):
            weight = model.node_weight(level, node).detach().to(dtype)
            network.add(weight, (out_axis, in_axis))
        inputs = [f"p{level}.{w}" for w in range(len(windows))]
    network.add(model.output.detach().to(dtype), (inputs[0],))
    network.sizes()  # checks that the leaves agree with the model's sizes
    return network


def coefficient_network(
    model: ConvAC,
    templates: Optional[Tensor] = None,
    dtype: torch.dtype = torch.float64,
) -> TensorNetwork:
    """The coefficient tensor ``𝒜`` (or the grid tensor) as a tensor network.

    ``network.contract()`` runs the engine's planned opt_einsum contraction.

    Args:
        model: A ConvAC from :func:`deep_convac` or :func:`shallow_convac`.
        templates: ``[M, in_features]``. If given, the result is the grid tensor
            ``A[d_1..d_N] = h(x^(d_1), .., x^(d_N))`` of shape ``(M,) * N``
            (``𝒜`` contracted with the templates on every leg); otherwise ``𝒜``,
            of shape ``(in_features,) * N``.
        dtype: Dtype of the operands (float64 by default).
    """
    n = model.num_patches
    if templates is None:
        return convac_network(
            model, [None] * n, [feature_axis(i) for i in range(n)], dtype
        )
    if templates.ndim != 2 or templates.shape[1] != model.in_features:
        raise ValueError(
            f"templates must be [M, {model.in_features}], got {tuple(templates.shape)}"
        )
    leaves = [(templates, (template_axis(i), feature_axis(i))) for i in range(n)]
    return convac_network(model, leaves, [template_axis(i) for i in range(n)], dtype)
