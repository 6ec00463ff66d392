"""Grid tensors of any model by forward passes, and matricization.

For templates ``x^(1..M)`` and a function ``h`` of ``N`` patches, the grid
tensor is ``A[d_1..d_N] = h(x^(d_1), .., x^(d_N))``. Here ``h`` is any torch
module; ``assemble`` turns a batch of patch tuples ``(B, N, *template_shape)``
into the module's input (the default passes them as they are).
"""

from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

Assemble = Callable[[Tensor], Tensor]

#: Default cap on the number of grid entries (forward evaluations): 2^24.
MAX_ENTRIES = 2**24


def check_positions(rows: Sequence[int], num_patches: int) -> tuple:
    """Validate a partition's row positions; return them as a sorted tuple."""
    rows = tuple(int(i) for i in rows)
    if len(set(rows)) != len(rows) or not all(0 <= i < num_patches for i in rows):
        raise ValueError(
            f"partition {rows} must be distinct positions in 0..{num_patches - 1}"
        )
    return tuple(sorted(rows))


def matricize(grid: Tensor, rows: Sequence[int]) -> Tensor:
    """``[A]_{I,J}``: rows indexed by the positions ``rows`` (in increasing order).

    Row and column indices are the mixed-radix numbers of the templates at the
    I (resp. J) positions, the lowest position most significant.
    """
    rows = check_positions(rows, grid.ndim)
    cols = tuple(i for i in range(grid.ndim) if i not in rows)
    permuted = grid.permute(rows + cols)
    num_rows = 1
    for i in rows:
        num_rows *= grid.shape[i]
    return permuted.reshape(num_rows, -1)


def evaluate(
    model: nn.Module,
    templates: Tensor,
    indices: Tensor,
    assemble: Optional[Assemble] = None,
    batch_size: int = 4096,
) -> Tensor:
    """``h`` on the template tuples ``indices`` ``(K, N)``, in float64 batches.

    The model is evaluated on a float64 copy (the caller's module is untouched),
    without gradients.
    """
    model64 = copy.deepcopy(model).to(torch.float64)
    templates = templates.to(torch.float64)
    outputs = []
    with torch.no_grad():
        for start in range(0, indices.shape[0], batch_size):
            patches = templates[indices[start : start + batch_size]]
            x = patches if assemble is None else assemble(patches)
            y = model64(x)
            if y.numel() != patches.shape[0]:
                raise ValueError(
                    f"the model must return one number per sample, got shape "
                    f"{tuple(y.shape)} for a batch of {patches.shape[0]}"
                )
            outputs.append(y.reshape(-1))
    return torch.cat(outputs)


def template_tuples(numbers: Tensor, num_templates: int, length: int) -> Tensor:
    """Row-major template tuples ``(K, length)`` of the numbers ``(K,)``."""
    powers = num_templates ** torch.arange(length - 1, -1, -1)
    return (numbers[:, None] // powers) % num_templates


def check_entries(count: int, max_entries: int, what: str) -> None:
    """Refuse grids above the cap, naming the cap and the alternatives."""
    if count > max_entries:
        raise ValueError(
            f"{what} has {count} entries, above max_entries={max_entries}; raise "
            "max_entries, fix some patches (a sub-grid) or sample rows and columns "
            "(separation_rank(..., fixed=..., samples=...))"
        )


def grid_tensor(
    model: nn.Module,
    templates: Tensor,
    num_patches: int,
    assemble: Optional[Assemble] = None,
    batch_size: int = 4096,
    max_entries: int = MAX_ENTRIES,
) -> Tensor:
    """The grid tensor of shape ``(M,) * N`` by ``M^N`` forward passes (float64).

    Args:
        model: Any module mapping assembled patches to one number per sample.
        templates: ``[M, *template_shape]``.
        num_patches: ``N``.
        assemble: Turns ``(B, N, *template_shape)`` into the model's input;
            ``None`` passes it unchanged (the ConvAC layout ``(B, N, F)``).
        batch_size: Forward passes per batch.
        max_entries: Cap on ``M^N``.

    Raises:
        ValueError: If ``M^N > max_entries``.
    """
    num_templates = templates.shape[0]
    check_entries(
        num_templates**num_patches,
        max_entries,
        f"the grid ({num_templates}^{num_patches})",
    )
    indices = template_tuples(
        torch.arange(num_templates**num_patches), num_templates, num_patches
    )
    values = evaluate(model, templates, indices, assemble, batch_size)
    return values.reshape((num_templates,) * num_patches)
