"""Drop-in subclasses of BackPACK's extensions whose conv rules are tensor networks."""

from .first_order import BatchGrad, BatchL2Grad, SumGradSquared, Variance

__all__ = [
    "BatchGrad",
    "BatchL2Grad",
    "SumGradSquared",
    "Variance",
]
