"""Convolutional arithmetic circuits (ConvACs): 1×1 convolutions and product pooling.

A ConvAC over ``N`` patches with features ``x_i ∈ R^F`` computes, per level
``l``, a 1×1 convolution (a matrix ``W_l[node]`` per node; one matrix for all
nodes of the level when the weights are shared) followed by *product pooling*:
the nodes of a window are replaced by one node whose channel ``c`` is the
product of the nodes' channels ``c``. After the last level one node is left,
and a linear output ``a`` maps its channels to a scalar. So ``h`` is
multilinear in the patches, ``h(x_1..x_N) = Σ_d 𝒜[d_1..d_N] Π_i x_{i,d_i}``,
and the coefficient tensor ``𝒜`` is a tree tensor network
(:func:`~tnbackpack.analysis.coefficient.coefficient_network`).

Pooling geometries are lists of levels; a level is a list of windows, a window
a tuple of node indices of the previous level. The window ``k`` of a level
becomes node ``k`` of the next level.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

Window = Tuple[int, ...]
Geometry = List[List[Window]]


def contiguous_windows(num_patches: int) -> Geometry:
    """Size-2 windows of neighbours at every level: ``(0, 1), (2, 3), ...``.

    Raises:
        ValueError: If ``num_patches`` is not a power of two (≥ 2).
    """
    _check_power_of_two(num_patches)
    levels, nodes = [], num_patches
    while nodes > 1:
        levels.append([(2 * k, 2 * k + 1) for k in range(nodes // 2)])
        nodes //= 2
    return levels


def mirror_windows(num_patches: int) -> Geometry:
    """Mirror pooling: patch ``i`` with patch ``N-1-i`` first, then contiguous.

    The first level's window ``k`` is ``(k, N-1-k)``, so node ``k`` of level 1
    stands for the patches ``k`` and ``N-1-k``.
    """
    _check_power_of_two(num_patches)
    first = [(k, num_patches - 1 - k) for k in range(num_patches // 2)]
    return (
        [first] + contiguous_windows(num_patches // 2) if num_patches > 2 else [first]
    )


def block_windows(height: int, width: int) -> Geometry:
    """2-d pooling over 2×2 blocks, positions numbered row-major at every level.

    Raises:
        ValueError: If height and width are not equal powers of two.
    """
    if height != width:
        raise ValueError(f"block_windows needs a square grid, got {height}×{width}")
    _check_power_of_two(height)
    levels, side = [], height
    while side > 1:
        half = side // 2
        levels.append(
            [
                (
                    2 * r * side + 2 * c,
                    2 * r * side + 2 * c + 1,
                    (2 * r + 1) * side + 2 * c,
                    (2 * r + 1) * side + 2 * c + 1,
                )
                for r in range(half)
                for c in range(half)
            ]
        )
        side = half
    return levels


def _check_power_of_two(n: int) -> None:
    if n < 2 or n & (n - 1):
        raise ValueError(f"this pooling geometry needs a power of two ≥ 2, got {n}")


def _check_geometry(num_patches: int, windows: Geometry) -> None:
    """Each level's windows cover its input nodes once; the last leaves one node."""
    nodes = num_patches
    for level, wins in enumerate(windows):
        covered = sorted(i for w in wins for i in w)
        if covered != list(range(nodes)) or any(len(w) == 0 for w in wins):
            raise ValueError(
                f"level {level}: the windows {wins} must cover the {nodes} nodes "
                f"0..{nodes - 1} of the previous level exactly once"
            )
        nodes = len(wins)
    if nodes != 1:
        raise ValueError(f"the last level leaves {nodes} nodes; it must leave one")


class ConvAC(nn.Module):
    """A ConvAC mapping patches ``(B, N, in_features)`` to outputs ``(B,)``.

    Attributes:
        num_patches: ``N``.
        in_features: Features per patch.
        widths: Output channels of each level's 1×1 convolution.
        windows: Pooling geometry (one list of windows per level).
        shared: Whether each level's 1×1 convolution is one matrix for all
            nodes (a true convolution) or one per node (locally connected).
        weights: Per level ``[nodes, out, in]`` (unshared) or ``[out, in]``.
        output: The output vector ``a`` over the last level's channels.
    """

    def __init__(
        self,
        num_patches: int,
        in_features: int,
        widths: Sequence[int],
        windows: Geometry,
        shared: bool = False,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        windows = [[tuple(int(i) for i in w) for w in level] for level in windows]
        _check_geometry(num_patches, windows)
        widths = [int(r) for r in widths]
        if len(widths) != len(windows):
            raise ValueError(
                f"{len(widths)} widths for {len(windows)} pooling levels; "
                "give one width per level"
            )
        if min(widths + [in_features]) < 1:
            raise ValueError(f"widths {widths} and in_features must be ≥ 1")
        self.num_patches, self.in_features = num_patches, in_features
        self.widths, self.windows, self.shared = widths, windows, shared
        self.weights = nn.ParameterList()
        nodes, fan_in = num_patches, in_features
        for width, level in zip(widths, windows):
            shape = (width, fan_in) if shared else (nodes, width, fan_in)
            # Unit-variance entries: the rank analysis does not care about scale,
            # and Gaussian weights have the generic rank with probability one.
            self.weights.append(nn.Parameter(torch.randn(shape, generator=generator)))
            nodes, fan_in = len(level), width
        self.output = nn.Parameter(torch.randn(fan_in, generator=generator))

    def node_weight(self, level: int, node: int) -> Tensor:
        """The 1×1 convolution matrix ``[out, in]`` of one node."""
        weight = self.weights[level]
        return weight if self.shared else weight[node]

    def forward(self, x: Tensor) -> Tensor:
        """Evaluate ``h`` on patches ``(B, N, in_features)``."""
        if x.ndim != 3 or x.shape[1:] != (self.num_patches, self.in_features):
            raise ValueError(
                f"ConvAC expects (B, {self.num_patches}, {self.in_features}), "
                f"got {tuple(x.shape)}"
            )
        h = x
        for level, windows in enumerate(self.windows):
            weight = self.weights[level]
            equation = "bni,oi->bno" if self.shared else "bni,noi->bno"
            h = torch.einsum(equation, h, weight.to(h.dtype))
            h = torch.stack([h[:, list(w)].prod(dim=1) for w in windows], dim=1)
        return h[:, 0] @ self.output.to(h.dtype)

    def extra_repr(self) -> str:
        """Sizes shown by ``print(model)``."""
        sizes = [len(level) for level in self.windows]
        return (
            f"num_patches={self.num_patches}, in_features={self.in_features}, "
            f"widths={self.widths}, nodes per level={sizes}, shared={self.shared}"
        )


def deep_convac(
    num_patches: int,
    in_features: int,
    widths: Sequence[int],
    windows: Optional[Geometry] = None,
    shared: bool = False,
    generator: Optional[torch.Generator] = None,
) -> ConvAC:
    """A deep ConvAC with random Gaussian weights.

    Args:
        num_patches: Number of patches ``N``.
        in_features: Features per patch.
        widths: Channels of each level's 1×1 convolution (one per level).
        windows: Pooling geometry; ``None`` means size-2 contiguous windows at
            every level (:func:`contiguous_windows`, ``N`` a power of two).
            See :func:`mirror_windows` and :func:`block_windows`.
        shared: One 1×1 convolution per level (a true convolution) instead of
            one per node (locally connected).
        generator: Random generator for the weights.
    """
    if windows is None:
        windows = contiguous_windows(num_patches)
    return ConvAC(num_patches, in_features, widths, windows, shared, generator)


def shallow_convac(
    num_patches: int,
    in_features: int,
    width: int,
    generator: Optional[torch.Generator] = None,
) -> ConvAC:
    """One locally connected 1×1 layer, global product pooling, a linear output.

    ``h = Σ_c a_c Π_i ⟨w_{i,c}, x_i⟩``: a CP decomposition of rank ``width``.
    """
    if num_patches < 1:
        raise ValueError(f"num_patches must be ≥ 1, got {num_patches}")
    windows = [[tuple(range(num_patches))]]
    return ConvAC(num_patches, in_features, [width], windows, False, generator)
