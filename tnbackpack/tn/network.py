"""Tensor networks with named axes, contracted through cached opt_einsum plans.

Axes carry names (``"n"``, ``"ci"``, ``"k0"``, ...) instead of letters, so an
expression can have any number of indices: names are mapped to opt_einsum's
symbols only when the equation is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import opt_einsum
from torch import Tensor

Axes = Tuple[str, ...]

#: opt_einsum strategy used to plan contractions. ``auto-hq`` is exhaustive for
#: the small networks a convolution produces and is paid once per shape.
OPTIMIZE = "auto-hq"


@dataclass(frozen=True)
class PatternLeg:
    """What the simplifier needs to know about one index pattern operand.

    The pattern ``Π[k, a, b]`` is a strided window when ``left == 0`` and the
    windows do not overlap: then position ``big = small·stride + k·dilation``
    and the contraction with ``Π`` is a reshape (see :mod:`.simplify`).

    Attributes:
        kernel: Kernel axis name.
        small: Name of the leg indexed by windows (conv output, transposed input).
        big: Name of the leg indexed by positions (conv input, transposed output).
        kernel_size: Kernel size.
        stride: Stride.
        dilation: Dilation.
        small_size: Size of the small leg.
        big_size: Size of the big leg.
        windows: Whether ``Π`` is a set of non-overlapping strided windows.
    """

    kernel: str
    small: str
    big: str
    kernel_size: int
    stride: int
    dilation: int
    small_size: int
    big_size: int
    windows: bool


@dataclass
class TensorNetwork:
    """Operands with named axes and the axes of the result.

    Attributes:
        operands: The tensors.
        axes: One tuple of axis names per operand.
        output: Axis names of the result.
        legs: Pattern metadata, keyed by operand position.
        finalize: Applied to the contraction result (reshape to the user-facing
            shape, undo rewrites of result axes).
        deferred: Operands that are data-less placeholders (``meta`` tensors
            of the right shape), keyed by ``id``, with the function that builds
            the real tensor. Index patterns are deferred: a network is also
            built just to check arguments or to estimate a route's cost, and a
            pattern can be large (``[80, 4000, 981]`` for an 80-tap Conv1d is
            1.2 GB), so it is built only when the network is contracted.
    """

    operands: List[Tensor]
    axes: List[Axes]
    output: Axes
    legs: Dict[int, PatternLeg] = field(default_factory=dict)
    finalize: Optional[Callable[[Tensor], Tensor]] = None
    deferred: Dict[int, Callable[[], Tensor]] = field(default_factory=dict)

    def add(
        self,
        operand: Tensor,
        axes: Sequence[str],
        leg: Optional[PatternLeg] = None,
        build: Optional[Callable[[], Tensor]] = None,
    ):
        """Append an operand (and its pattern metadata, if it is a pattern).

        With ``build``, ``operand`` is a placeholder of the right shape and
        ``build()`` makes the real tensor when the network is contracted.
        """
        if operand.ndim != len(axes):
            raise ValueError(f"operand of shape {tuple(operand.shape)} vs axes {axes}")
        if leg is not None:
            self.legs[len(self.operands)] = leg
        if build is not None:
            self.deferred[id(operand)] = build
        self.operands.append(operand)
        self.axes.append(tuple(axes))
        return self

    def materialized(self) -> List[Tensor]:
        """The operands, with every deferred placeholder built."""
        return [
            self.deferred[id(op)]() if id(op) in self.deferred else op
            for op in self.operands
        ]

    def then(self, function: Callable[[Tensor], Tensor]) -> TensorNetwork:
        """Compose ``function`` after the current finalization."""
        previous = self.finalize
        if previous is None:
            self.finalize = function
        else:
            self.finalize = lambda t: function(previous(t))
        return self

    def sizes(self) -> Dict[str, int]:
        """Size of every axis name, checking that shared names agree."""
        sizes: Dict[str, int] = {}
        for operand, names in zip(self.operands, self.axes):
            for name, size in zip(names, operand.shape):
                if sizes.setdefault(name, size) != size:
                    raise ValueError(
                        f"axis {name!r} has sizes {sizes[name]} and {size}"
                    )
        return sizes

    def equation(self) -> str:
        """The einsum equation, with one opt_einsum symbol per axis name."""
        symbols: Dict[str, str] = {}

        def spell(names: Sequence[str]) -> str:
            return "".join(
                symbols.setdefault(n, opt_einsum.get_symbol(len(symbols)))
                for n in names
            )

        inputs = ",".join(spell(names) for names in self.axes)
        missing = set(self.output) - {n for names in self.axes for n in names}
        if missing:
            raise ValueError(f"output axes {sorted(missing)} appear in no operand")
        return f"{inputs}->{spell(self.output)}"

    def cost(self) -> int:
        """Estimated FLOPs of the planned contraction (opt_einsum's estimate)."""
        shapes = tuple(tuple(op.shape) for op in self.operands)
        return _path_cost(self.equation(), shapes)

    def contract(self) -> Tensor:
        """Contract the network with its cached plan and finalize the result."""
        shapes = tuple(tuple(op.shape) for op in self.operands)
        operands = self.materialized()
        result = plan(self.equation(), shapes)(*operands, backend="torch")
        return result if self.finalize is None else self.finalize(result)


@lru_cache(maxsize=4096)
def plan(equation: str, shapes: Tuple[Tuple[int, ...], ...]):
    """Plan a contraction once per (equation, shapes); reused on every call."""
    return opt_einsum.contract_expression(equation, *shapes, optimize=OPTIMIZE)


@lru_cache(maxsize=4096)
def _path_cost(equation: str, shapes: Tuple[Tuple[int, ...], ...]) -> int:
    _, info = opt_einsum.contract_path(
        equation, *shapes, shapes=True, optimize=OPTIMIZE
    )
    return int(info.opt_cost)
