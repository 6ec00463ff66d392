"""Grid tensors, ConvACs and separation ranks (Levine et al. 2021).

What dependencies can a convolutional architecture model? For a function
``h`` of ``N`` patches and ``M`` templates, the grid tensor
``A[d_1..d_N] = h(x^(d_1), .., x^(d_N))`` matricized by a partition ``(I, J)``
of the patches has a rank that bounds the separation rank of ``h`` from below;
for ConvACs (1×1 convolutions and product pooling) the bound is tight and the
pooling geometry decides which partitions get high rank.

This package uses the engine (:mod:`tnbackpack.tn`); the engine does not
import it.
"""

from .coefficient import coefficient_network
from .convac import (
    ConvAC,
    block_windows,
    contiguous_windows,
    deep_convac,
    mirror_windows,
    shallow_convac,
)
from .grid import grid_tensor, matricize
from .mincut import Cut, min_cut
from .partitions import (
    checkerboard,
    grid_left_right,
    grid_top_bottom,
    left_right,
    odd_even,
    outer_inner,
    partitions_1d,
    partitions_2d,
)
from .rank import SeparationRank, gap_rank, mincut_bound, separation_rank

__all__ = [
    "ConvAC",
    "Cut",
    "SeparationRank",
    "block_windows",
    "checkerboard",
    "coefficient_network",
    "contiguous_windows",
    "deep_convac",
    "gap_rank",
    "grid_left_right",
    "grid_tensor",
    "grid_top_bottom",
    "left_right",
    "matricize",
    "min_cut",
    "mincut_bound",
    "mirror_windows",
    "odd_even",
    "outer_inner",
    "partitions_1d",
    "partitions_2d",
    "separation_rank",
    "shallow_convac",
]
