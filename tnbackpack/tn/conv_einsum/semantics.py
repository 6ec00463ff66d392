"""From a parsed string, shapes and hyper-parameters to a network of legs.

Semantics of a convolution letter ``h`` (DESIGN.md §7): the first operand that
holds ``h`` is the signal (size ``I``), every other holder is a kernel (sizes
``K_1..K_m``), the output holds the output position ``o`` and

    y[.., o, ..] = Σ x[.., S·o + D·(k_1 + … + k_m) − P_left, ..] · Π_j w_j[.., k_j, ..]

Each letter is one linear constraint on the positions of its legs. Writing a
leg as ``coef · (position + offset)``, the signal's leg is ``−1·(i + P_left)``,
a kernel's ``D·(k + 0)``, the output's ``S·(o + 0)``, and the constraint is that
the legs of a letter sum to zero. This is the index pattern ``Π[k_1..k_m, o, i]``
of the letter, kept symbolic: the planner merges legs of intermediate results
(:mod:`.legs`) and the evaluator turns each step into a convolution kernel,
a matrix product or, failing both, a materialized pattern.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Sequence, Tuple, Union

from .grammar import Equation
from .legs import Leg

Hyper = Union[int, str, Sequence, Mapping]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


@dataclass(frozen=True)
class Letter:
    """Hyper-parameters and sizes of one convolution letter.

    Attributes:
        signal: Operand holding the signal.
        kernels: Operands holding the kernels.
        input_size: Signal size ``I`` (before padding).
        kernel_sizes: ``K_1..K_m``.
        stride: ``S``.
        dilation: ``D``.
        padding: ``(P_left, P_right)``.
        output_size: ``O``.
    """

    signal: int
    kernels: Tuple[int, ...]
    input_size: int
    kernel_sizes: Tuple[int, ...]
    stride: int
    dilation: int
    padding: Tuple[int, int]
    output_size: int


@dataclass(frozen=True, eq=False)
class Network:
    """Nodes (the operands, then the output ``Y``) with their letters and legs.

    Attributes:
        subscripts: Letters of every node; the last node is the output.
        sizes: Size of every plain (non-convolution) letter.
        legs: Per node, the ``(letter, Leg)`` pairs of its convolution letters.

    Compared and hashed by identity: :func:`.api.network_of` builds one per
    (string, shapes, hyper-parameters) and the plan caches key on it cheaply.
    """

    subscripts: Tuple[str, ...]
    sizes: Tuple[Tuple[str, int], ...]
    legs: Tuple[Tuple[Tuple[str, Leg], ...], ...]

    @property
    def output_node(self) -> int:
        """Index of the node ``Y`` (the result of the forward contraction)."""
        return len(self.subscripts) - 1

    def shape(self, node: int) -> Tuple[int, ...]:
        """Shape of a node's tensor."""
        plain, legs = dict(self.sizes), dict(self.legs[node])
        return tuple(
            legs[c].size if c in legs else plain[c] for c in self.subscripts[node]
        )


def _per_letter(name: str, value, conv: Tuple[str, ...], default) -> Dict[str, object]:
    """Spread an int, tuple (in the order of ``conv``) or dict over the letters."""
    if isinstance(value, Mapping):
        for letter in value:
            if letter not in conv:
                raise ValueError(
                    f"conv_einsum: {name} given for letter {letter!r}, which is not a "
                    f"convolution letter (those are {''.join(conv)!r})"
                )
        return {c: value.get(c, default) for c in conv}
    if isinstance(value, (tuple, list)):
        if len(value) != len(conv):
            raise ValueError(
                f"conv_einsum: {name}={tuple(value)} has {len(value)} entries but "
                f"there "
                f"are {len(conv)} convolution letters {''.join(conv)!r}"
            )
        return dict(zip(conv, value))
    return {c: value for c in conv}


def _positive(name: str, letter: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"conv_einsum: {name} of letter {letter!r} must be a positive int, "
            f"got {value!r}"
        )
    return value


def _padding(letter: str, value, stride: int, span: int) -> Tuple[int, int]:
    """``(left, right)`` from an int, a pair, ``'same'`` or ``'valid'``."""
    if value == "valid":
        return (0, 0)
    if value == "same":
        if stride != 1:
            raise ValueError(
                f"conv_einsum: padding='same' needs stride 1, but letter {letter!r} "
                f"has stride {stride}"
            )
        return (span // 2, span - span // 2)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        pair = tuple(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    else:
        raise ValueError(
            f"conv_einsum: padding of letter {letter!r} must be an int, a (left, "
            f"right) pair, 'same' or 'valid', got {value!r}"
        )
    if any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in pair):
        raise ValueError(
            f"conv_einsum: padding of letter {letter!r} must be >= 0, got {value!r}"
        )
    return pair  # type: ignore[return-value]


def letter_sizes(
    equation: Equation, shapes: Sequence[Tuple[int, ...]]
) -> Dict[str, Tuple[int, ...]]:
    """Size of every letter in every operand holding it, after checking the ranks."""
    if len(shapes) != len(equation.inputs):
        raise ValueError(
            f"conv_einsum: the equation has {len(equation.inputs)} operands "
            f"({','.join(equation.inputs)}) but {len(shapes)} were given"
        )
    sizes: Dict[str, Tuple[int, ...]] = {}
    for position, (subs, shape) in enumerate(zip(equation.inputs, shapes)):
        if len(shape) != len(subs):
            raise ValueError(
                f"conv_einsum: operand {position} has subscripts {subs!r} but shape "
                f"{tuple(shape)} ({len(shape)} dims)"
            )
        for letter, size in zip(subs, shape):
            sizes[letter] = sizes.get(letter, ()) + (int(size),)
    return sizes


def describe(
    equation: Equation,
    shapes: Sequence[Tuple[int, ...]],
    stride: Hyper = 1,
    padding: Hyper = 0,
    dilation: Hyper = 1,
    padding_mode: str = "zeros",
) -> Tuple[Dict[str, Letter], Network]:
    """Check sizes and hyper-parameters; build the letters and the network.

    With a padding mode other than zeros the signal is padded explicitly by
    the caller (:func:`.api.pad_signals`), so the network sees the padded
    signal and no padding.

    Raises:
        ValueError: Naming the letter or operand at fault.
    """
    if padding_mode not in PADDING_MODES:
        raise ValueError(
            f"conv_einsum: padding_mode must be one of {PADDING_MODES}, got "
            f"{padding_mode!r}"
        )
    sizes = letter_sizes(equation, shapes)
    conv = equation.conv
    strides = _per_letter("stride", stride, conv, 1)
    dilations = _per_letter("dilation", dilation, conv, 1)
    paddings = (
        {c: padding for c in conv}
        if isinstance(padding, str)
        else _per_letter("padding", padding, conv, 0)
    )
    plain = {}
    for letter, found in sizes.items():
        if letter in conv:
            continue
        if len(set(found)) > 1:
            holders = equation.holders(letter)
            raise ValueError(
                f"conv_einsum: letter {letter!r} has sizes {found} in operands "
                f"{holders}; a letter that is not a convolution letter must have "
                f"one size"
            )
        plain[letter] = found[0]
    letters: Dict[str, Letter] = {}
    for letter in conv:
        holders = equation.holders(letter)
        found = sizes[letter]
        s = _positive("stride", letter, strides[letter])
        d = _positive("dilation", letter, dilations[letter])
        span = d * sum(k - 1 for k in found[1:])
        left, right = _padding(letter, paddings[letter], s, span)
        signal = found[0]
        out = (signal + left + right - span - 1) // s + 1
        if min(found) < 1 or signal + left + right - span < 1:
            raise ValueError(
                f"conv_einsum: along letter {letter!r} the kernels (sizes {found[1:]}, "
                f"dilation {d}, span {span + 1}) are longer than the padded signal "
                f"(size {signal} + padding {left}+{right}) of operand {holders[0]}"
            )
        letters[letter] = Letter(
            signal=holders[0],
            kernels=holders[1:],
            input_size=signal,
            kernel_sizes=found[1:],
            stride=s,
            dilation=d,
            padding=(left, right),
            output_size=out,
        )
    return letters, network(equation, letters, plain, padding_mode != "zeros")


def network(
    equation: Equation,
    letters: Dict[str, Letter],
    plain: Dict[str, int],
    padded: bool,
) -> Network:
    """The nodes and legs; ``padded``: the signal arrives already padded."""
    nodes = equation.inputs + (equation.output,)
    output_node = len(nodes) - 1
    legs = []
    for node, subs in enumerate(nodes):
        node_legs = []
        for letter in subs:
            if letter not in letters:
                continue
            spec = letters[letter]
            left, right = spec.padding
            if node == output_node:
                leg = Leg(spec.stride, 0, spec.output_size)
            elif node == spec.signal:
                leg = (
                    Leg(-1, 0, spec.input_size + left + right)
                    if padded
                    else Leg(-1, left, spec.input_size)
                )
            else:
                size = spec.kernel_sizes[spec.kernels.index(node)]
                leg = Leg(spec.dilation, 0, size)
            node_legs.append((letter, leg))
        legs.append(tuple(node_legs))
    return Network(
        subscripts=nodes,
        sizes=tuple(sorted(plain.items())),
        legs=tuple(legs),
    )
