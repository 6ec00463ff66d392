"""Is BackPACK's result right on a case? One cheap float64 comparison.

tnbackpack's extensions are tested against first principles (torch.func,
explicit loops) in the test suite; here they serve as the reference for
BackPACK on each benchmark case, so that the table can say "wrong" next to a
fast-but-wrong BackPACK number instead of silently comparing against it. The
comparison runs in float64 at a small batch size (the quantities' structure,
and any error in it, does not depend on the batch size). Where a non-conv
layer of BackPACK cannot run in float64 (its pooling derivatives build float32
modules), it falls back to float32 with a looser tolerance; BackPACK's known
conv errors are of order 0.1 to 1, far above either tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import Tensor

from .cases import Case
from .extensions import ExtensionPair
from .timing import describe_error
from .workload import Quantity, Workload

#: BackPACK's result counts as wrong above this relative error, per dtype.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}

#: Seed set before both backward passes: Monte-Carlo extensions draw alike.
_MC_SEED = 2147483647


@dataclass(frozen=True)
class CheckResult:
    """Outcome of running both implementations once and comparing them.

    Attributes:
        tnbackpack_error: Exception of tnbackpack's run, if any.
        backpack_error: Exception of BackPACK's run, if any.
        relative_error: ``||bp - tn|| / ||tn||`` over all parameters, ``inf``
            on a structure or shape mismatch, ``None`` if a run failed.
        dtype: Floating point type the comparison ran in.
    """

    tnbackpack_error: Optional[str] = None
    backpack_error: Optional[str] = None
    relative_error: Optional[float] = None
    dtype: torch.dtype = torch.float64

    @property
    def tolerance(self) -> float:
        """Largest relative error that counts as agreement in ``dtype``."""
        return TOLERANCE[self.dtype]

    def status(self) -> str:
        """Short text for the table's status column."""
        if self.tnbackpack_error is not None:
            return f"tnbackpack fails: {self.tnbackpack_error}"
        if self.backpack_error is not None:
            return f"fails: {self.backpack_error}"
        if self.relative_error is None:
            return "unchecked"
        if self.relative_error == float("inf"):
            return "wrong (shapes differ)"
        in_float32 = self.dtype == torch.float32
        if self.relative_error > self.tolerance:
            note = ", float32 check" if in_float32 else ""
            return f"wrong (rel. err {self.relative_error:.2g}{note})"
        return "ok (float32 check)" if in_float32 else "ok"


def _flatten(quantity: Quantity) -> List[Tensor]:
    return list(quantity) if isinstance(quantity, (list, tuple)) else [quantity]


def relative_error(reference: Dict[str, Quantity], other: Dict[str, Quantity]) -> float:
    """``||other - reference|| / ||reference||`` over all parameters' tensors.

    Returns ``inf`` if the parameters, list lengths or shapes differ.
    """
    if reference.keys() != other.keys():
        return float("inf")
    difference, norm = 0.0, 0.0
    for name, quantity in reference.items():
        ref_tensors, other_tensors = _flatten(quantity), _flatten(other[name])
        if len(ref_tensors) != len(other_tensors):
            return float("inf")
        for ref, oth in zip(ref_tensors, other_tensors):
            if ref.shape != oth.shape:
                return float("inf")
            difference += (oth - ref).square().sum().item()
            norm += ref.square().sum().item()
    if norm == 0.0:
        return 0.0 if difference == 0.0 else float("inf")
    return (difference / norm) ** 0.5


def _run(workload: Workload, extension, monte_carlo: bool) -> Dict[str, Quantity]:
    loss = workload.forward()
    workload.backward(loss, extension, seed=_MC_SEED if monte_carlo else None)
    results = {name: _detach(q) for name, q in workload.results(extension).items()}
    workload.clear()
    return results


def _detach(quantity: Quantity) -> Quantity:
    if isinstance(quantity, (list, tuple)):
        return [t.detach() for t in quantity]
    return quantity.detach()


def check_backpack(case: Case, pair: ExtensionPair, batch_size: int = 2) -> CheckResult:
    """Compare BackPACK's extension with ``pair.reference`` on ``case``.

    In float64; in float32 if tnbackpack's run fails in float64 but works in
    float32 (a float32-only layer of BackPACK elsewhere in the model).
    """
    result = _check(case, pair, batch_size, torch.float64)
    if result.tnbackpack_error is None:
        return result
    fallback = _check(case, pair, batch_size, torch.float32)
    return result if fallback.tnbackpack_error is not None else fallback


def _check(
    case: Case, pair: ExtensionPair, batch_size: int, dtype: torch.dtype
) -> CheckResult:
    workload = Workload(case, batch_size, dtype=dtype)
    try:
        reference = _run(workload, pair.reference(), pair.monte_carlo)
    except Exception as error:  # noqa: BLE001 - reported in the table
        workload.clear()
        return CheckResult(tnbackpack_error=describe_error(error), dtype=dtype)
    try:
        result = _run(workload, pair.backpack(), pair.monte_carlo)
    except Exception as error:  # noqa: BLE001 - reported in the table
        workload.clear()
        return CheckResult(backpack_error=describe_error(error), dtype=dtype)
    return CheckResult(relative_error=relative_error(reference, result), dtype=dtype)
