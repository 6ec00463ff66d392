"""The (tnbackpack, BackPACK) extension pairs the benchmark compares.

Each pair names one row of the table. BackPACK 1.7.1 has only one KFAC, so
the three ``kfac_approx`` variants of tnbackpack's KFAC are each timed against
it; BackPACK's result is checked against tnbackpack's ``"backpack"`` variant,
the one that computes BackPACK's factors.

tnbackpack extensions that cannot be imported (not written yet) are skipped
with a note, so the benchmark runs on whatever exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from backpack import extensions as backpack_extensions
from backpack.extensions.backprop_extension import BackpropExtension

ExtensionFactory = Callable[[], BackpropExtension]


@dataclass(frozen=True)
class ExtensionPair:
    """One extension in both implementations.

    Attributes:
        name: Row label, e.g. ``"KFAC(reduce)"``.
        tnbackpack: Builds tnbackpack's extension.
        backpack: Builds BackPACK's extension.
        reference: Builds the tnbackpack extension whose result BackPACK's
            must reproduce (``tnbackpack`` itself unless the quantities differ
            by definition, as for KFAC's expand/reduce).
        monte_carlo: Whether the extension samples (seed before comparing).
    """

    name: str
    tnbackpack: ExtensionFactory
    backpack: ExtensionFactory
    reference: ExtensionFactory
    monte_carlo: bool = False


_BACKPACK_KFAC = {"kfac_approx": "backpack"}

#: ``(row name, class name, tnbackpack kwargs, reference kwargs, monte carlo)``.
_ROWS: List[Tuple[str, str, dict, Optional[dict], bool]] = [
    ("BatchGrad", "BatchGrad", {}, None, False),
    ("BatchL2Grad", "BatchL2Grad", {}, None, False),
    ("SumGradSquared", "SumGradSquared", {}, None, False),
    ("Variance", "Variance", {}, None, False),
    ("KFAC(backpack)", "KFAC", {"kfac_approx": "backpack"}, None, True),
    ("KFAC(expand)", "KFAC", {"kfac_approx": "expand"}, _BACKPACK_KFAC, True),
    ("KFAC(reduce)", "KFAC", {"kfac_approx": "reduce"}, _BACKPACK_KFAC, True),
    ("KFLR", "KFLR", {}, None, False),
    ("DiagGGNExact", "DiagGGNExact", {}, None, False),
    ("DiagGGNMC", "DiagGGNMC", {}, None, True),
    ("DiagHessian", "DiagHessian", {}, None, False),
    ("SqrtGGNExact", "SqrtGGNExact", {}, None, False),
    ("BatchDiagGGNExact", "BatchDiagGGNExact", {}, None, False),
]

ALL_EXTENSIONS: Tuple[str, ...] = tuple(row[0] for row in _ROWS)

#: The extensions of ``--quick``.
QUICK_EXTENSIONS = ("BatchGrad", "BatchL2Grad", "KFAC(reduce)", "DiagGGNExact")


def _factory(cls: type, kwargs: dict) -> ExtensionFactory:
    return lambda: cls(**kwargs)


def extension_pairs(names: Tuple[str, ...]) -> Tuple[List[ExtensionPair], List[str]]:
    """The pairs for ``names`` (row names), and notes on the ones skipped.

    Raises:
        ValueError: If a name is not a known row.
    """
    unknown = set(names) - set(ALL_EXTENSIONS)
    if unknown:
        raise ValueError(
            f"Unknown extensions {sorted(unknown)}; known: {', '.join(ALL_EXTENSIONS)}"
        )
    try:
        from .. import extensions as tn_extensions
    except ImportError as error:  # the package itself may be mid-edit
        return [], [f"tnbackpack.extensions does not import: {error!r}"]

    pairs, notes = [], []
    for row, class_name, kwargs, reference_kwargs, monte_carlo in _ROWS:
        if row not in names:
            continue
        tn_class = getattr(tn_extensions, class_name, None)
        if tn_class is None:
            notes.append(f"skipped {row}: tnbackpack.extensions.{class_name} not found")
            continue
        reference = kwargs if reference_kwargs is None else reference_kwargs
        pairs.append(
            ExtensionPair(
                name=row,
                tnbackpack=_factory(tn_class, kwargs),
                backpack=_factory(getattr(backpack_extensions, class_name), {}),
                reference=_factory(tn_class, reference),
                monte_carlo=monte_carlo,
            )
        )
    return pairs, notes
