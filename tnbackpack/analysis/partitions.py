"""Standard partitions (I, J) of patch positions; each function returns I.

The complement of I is J. 1-d positions are ``0..N-1``; 2-d positions of an
``h×w`` grid are numbered row-major.
"""

from __future__ import annotations

from typing import Dict, Tuple

Positions = Tuple[int, ...]


def left_right(num_patches: int) -> Positions:
    """The left half ``0..N/2-1``."""
    return tuple(range(num_patches // 2))


def odd_even(num_patches: int) -> Positions:
    """The even positions (interleaved with the odd ones)."""
    return tuple(range(0, num_patches, 2))


def outer_inner(num_patches: int) -> Positions:
    """The outer quarters: the first ``N/4`` and the last ``N/4`` positions."""
    quarter = num_patches // 4
    return tuple(range(quarter)) + tuple(range(num_patches - quarter, num_patches))


def grid_left_right(height: int, width: int) -> Positions:
    """The left half of the columns."""
    return tuple(r * width + c for r in range(height) for c in range(width // 2))


def grid_top_bottom(height: int, width: int) -> Positions:
    """The top half of the rows."""
    return tuple(range((height // 2) * width))


def checkerboard(height: int, width: int) -> Positions:
    """The positions with even ``row + column``."""
    return tuple(
        r * width + c for r in range(height) for c in range(width) if (r + c) % 2 == 0
    )


def partitions_1d(num_patches: int) -> Dict[str, Positions]:
    """Left/right, odd/even and outer/inner, by name."""
    return {
        "left/right": left_right(num_patches),
        "odd/even": odd_even(num_patches),
        "outer/inner": outer_inner(num_patches),
    }


def partitions_2d(height: int, width: int) -> Dict[str, Positions]:
    """2-d left/right, top/bottom and checkerboard, by name."""
    return {
        "left/right": grid_left_right(height, width),
        "top/bottom": grid_top_bottom(height, width),
        "checkerboard": checkerboard(height, width),
    }
