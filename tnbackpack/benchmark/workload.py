"""One case at one batch size, ready for a plain backward or one with an extension.

The plain baseline runs on an un-extended copy of the model: BackPACK's
``extend`` adds forward hooks (storing each layer's input and output) and
full backward hooks, and the baseline is what PyTorch costs without BackPACK.
Both implementations share the extended model; the ``with backpack(ext)``
context decides which module extensions run.
"""

from __future__ import annotations

import copy
import warnings
from typing import Dict, List, Optional, Union

import torch
from backpack import backpack, extend
from backpack.extensions.backprop_extension import BackpropExtension
from torch import Tensor, nn

from .cases import Case

Quantity = Union[Tensor, List[Tensor]]


class Workload:
    """A case's model, loss and data at a batch size and dtype.

    Args:
        case: The benchmark case.
        batch_size: Number of samples.
        dtype: Floating point type of parameters and data.
        seed: Seed of the parameter initialization (the data has its own).
    """

    def __init__(
        self,
        case: Case,
        batch_size: int,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        self.case = case
        self.plain_model = case.model(seed).to(dtype)
        self.model = extend(copy.deepcopy(self.plain_model))
        self.plain_loss = nn.CrossEntropyLoss()
        self.loss = extend(nn.CrossEntropyLoss())
        x, self.y = case.data(batch_size)
        self.x = x.to(dtype)

    def forward(self, plain: bool = False) -> Tensor:
        """The loss of the current batch (graph built, BackPACK I/O stored)."""
        if plain:
            return self.plain_loss(self.plain_model(self.x), self.y)
        return self.loss(self.model(self.x), self.y)

    @staticmethod
    def backward(
        loss: Tensor,
        extension: Optional[BackpropExtension],
        seed: Optional[int] = None,
    ) -> None:
        """Backward pass, with ``extension`` active unless it is ``None``.

        Args:
            loss: Output of :meth:`forward`.
            extension: The BackPACK extension, or ``None`` for a plain backward.
            seed: Torch seed set right before the backward, so that Monte-Carlo
                extensions of both implementations draw the same samples.
        """
        if seed is not None:
            torch.manual_seed(seed)
        with warnings.catch_warnings():
            # A frozen first layer's input needs no gradient; PyTorch then warns
            # on every full backward hook. Expected here, not informative.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            if extension is None:
                loss.backward()
                return
            with backpack(extension):
                loss.backward()

    def step(self, extension: Optional[BackpropExtension] = None) -> None:
        """Forward and backward; ``extension=None`` runs the plain model."""
        self.backward(self.forward(plain=extension is None), extension)

    def trainable(self) -> Dict[str, nn.Parameter]:
        """The trainable parameters of the extended model, by name."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def results(self, extension: BackpropExtension) -> Dict[str, Quantity]:
        """The quantities ``extension`` stored on the trainable parameters."""
        return {
            name: getattr(param, extension.savefield)
            for name, param in self.trainable().items()
            if hasattr(param, extension.savefield)
        }

    def clear(self) -> None:
        """Drop gradients, BackPACK's results and stored I/O.

        Reference counting frees them at once; no ``gc.collect()`` (it costs
        tens of ms with torch loaded, and nothing here makes cycles).
        """
        for model in (self.model, self.plain_model):
            for param in model.parameters():
                param.grad = None
                for name in [n for n in vars(param) if not n.startswith("_")]:
                    delattr(param, name)
            for module in model.modules():
                for name in ("input0", "output"):
                    if hasattr(module, name):
                        delattr(module, name)
