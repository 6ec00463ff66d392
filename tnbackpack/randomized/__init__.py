"""TN dropout: unbiased, memory- and time-saving weight gradients of convolutions.

A convolution's weight gradient sums over the batch and the input positions.
Keeping each slice of such a summed leg with probability ``p`` and dividing
by ``p`` gives an unbiased estimate from a smaller, still dense tensor
network: only the kept slices of the input are stored in the forward pass,
and the weight VJP contracts smaller operands. See ``docs/randomized.md``.

    from tnbackpack.randomized import sample_convolutions, exact_gradients
    model = sample_convolutions(model, keep=0.25, sample="spatial")
    loss_fn(model(x), y).backward()      # sampled weight gradients
    with exact_gradients(model):
        loss_fn(model(x), y).backward()  # exact ones
"""

from .module import (
    SampledConv,
    exact_gradients,
    restore_convolutions,
    sample_convolutions,
)
from .sampling import SAMPLE_MODES

__all__ = [
    "SAMPLE_MODES",
    "SampledConv",
    "exact_gradients",
    "restore_convolutions",
    "sample_convolutions",
]
