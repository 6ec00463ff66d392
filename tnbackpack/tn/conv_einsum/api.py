"""``conv_einsum`` and ``conv_einsum_path``: the public front end."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..pattern import pad_by_reading
from .grammar import parse
from .legs import members
from .per_sample import PerSampleRequest
from .planner import Contraction, plan
from .semantics import Hyper, Letter, Network, describe

OPTIMIZE = ("auto",)


def _check_operands(operands: Sequence) -> None:
    for position, operand in enumerate(operands):
        if not isinstance(operand, Tensor):
            raise ValueError(
                f"conv_einsum: operand {position} is a {type(operand).__name__}, not a "
                f"tensor"
            )
        if not operand.is_floating_point():
            raise ValueError(
                f"conv_einsum: operand {position} has dtype {operand.dtype}; "
                f"floating-point tensors only"
            )
    first = operands[0]
    for position, operand in enumerate(operands[1:], start=1):
        if operand.dtype != first.dtype or operand.device != first.device:
            raise ValueError(
                f"conv_einsum: operand {position} is {operand.dtype} on "
                f"{operand.device} but operand 0 is {first.dtype} on {first.device}"
            )


def _pad_signal(
    x: Tensor, dim: int, spec: Letter, letter: str, padding_mode: str
) -> Tensor:
    """Pad one dimension of a signal the way ``padding_mode`` reads outside."""
    try:
        return pad_by_reading(x, dim, *spec.padding, padding_mode)
    except ValueError as error:
        raise ValueError(f"conv_einsum: letter {letter!r}: {error}") from None


def _freeze(value):
    """A hashable stand-in for a hyper-parameter (dicts and lists included)."""
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _freeze(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return ("seq", tuple(_freeze(v) for v in value))
    return value


def _thaw(value):
    if isinstance(value, tuple) and value and value[0] == "dict":
        return {k: _thaw(v) for k, v in value[1]}
    if isinstance(value, tuple) and value and value[0] == "seq":
        return tuple(_thaw(v) for v in value[1])
    return value


@lru_cache(maxsize=1024)
def network_of(equation: str, shapes, stride, padding, dilation, padding_mode):
    """Parse, check and build the network once per string, shapes and options."""
    parsed = parse(equation)
    letters, network = describe(
        parsed, shapes, _thaw(stride), _thaw(padding), _thaw(dilation), padding_mode
    )
    return network, letters


def _prepare(
    equation: str, shapes, stride, padding, dilation, padding_mode, optimize
) -> Tuple[Network, dict]:
    if optimize not in OPTIMIZE:
        raise ValueError(
            f"conv_einsum: optimize must be one of {OPTIMIZE}, got {optimize!r}"
        )
    try:
        key = (_freeze(stride), _freeze(padding), _freeze(dilation))
        hash(key)
    except TypeError:  # unhashable values: let describe() name the culprit
        return describe(
            parse(equation), shapes, stride, padding, dilation, padding_mode
        )[::-1]
    return network_of(equation, tuple(map(tuple, shapes)), *key, padding_mode)


def conv_einsum(
    equation: str,
    *operands: Tensor,
    stride: Hyper = 1,
    padding: Hyper = 0,
    dilation: Hyper = 1,
    padding_mode: str = "zeros",
    optimize: str = "auto",
    per_sample: Optional[PerSampleRequest] = None,
) -> Tensor:
    """Evaluate an einsum string with convolution letters.

    ``conv_einsum("nchw,rc,rh,rw,or->nohw|hw", x, A, Kh, Kw, B, stride=2,
    padding=1)`` is a CP-factorized ``Conv2d``. Letters after ``|`` are
    convolution letters: the first operand holding one is the signal, every
    other holder a kernel (several kernels add their taps), the output holds
    the output positions; PyTorch's cross-correlation convention. Every other
    letter follows ``torch.einsum``. See ``docs/conv_einsum.md``.

    Args:
        equation: ``"<operands>-><output>|<convolution letters>"``.
        *operands: The tensors, one per operand subscript.
        stride: Per convolution letter: an int, a tuple in the order of the
            letters after ``|``, or a dict letter -> int.
        padding: Likewise (an int or a ``(left, right)`` pair per letter), or
            ``'same'`` / ``'valid'``.
        dilation: Like ``stride``.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or
            ``'circular'``.
        optimize: ``'auto'``: plan by the cost model.
        per_sample: Asks the backward for per-sample gradients of some
            operands (:class:`~tnbackpack.tn.conv_einsum.PerSampleRequest`):
            it fills ``per_sample.gradients`` with ``[N, *operand]`` tensors,
            at about the cost of the ordinary gradients, which are their sums.

    Returns:
        The result, differentiable with respect to every operand.

    Raises:
        ValueError: For bad input, naming the letter or operand.
    """
    if not operands:
        raise ValueError("conv_einsum: no operands given")
    _check_operands(operands)
    network, letters = _prepare(
        equation, [tuple(op.shape) for op in operands], stride, padding, dilation,
        padding_mode, optimize,
    )  # fmt: skip
    operands = list(operands)
    if per_sample is not None:
        _check_request(per_sample, network)
        per_sample.folds = []
    if padding_mode != "zeros":
        subscripts = parse(equation).inputs
        for letter, spec in letters.items():
            if spec.padding == (0, 0):
                continue
            signal, dim = spec.signal, subscripts[spec.signal].index(letter)
            operands[signal] = _pad_signal(
                operands[signal], dim, spec, letter, padding_mode
            )
            if per_sample is not None and signal in per_sample.candidates:
                fold = (signal, dim, *spec.padding, spec.input_size, padding_mode)
                per_sample.folds.append(fold)
    from .function import differentiable, evaluate

    if not (torch.is_grad_enabled() and any(op.requires_grad for op in operands)):
        return evaluate(network, *operands)
    return differentiable(network, per_sample, *operands)


def _check_request(request: PerSampleRequest, network: Network) -> None:
    """Per-sample gradients need the batch letter in the output, not the operand."""
    if not isinstance(request, PerSampleRequest):
        raise ValueError(
            f"conv_einsum: per_sample must be a PerSampleRequest, got "
            f"{type(request).__name__}"
        )
    output = network.subscripts[network.output_node]
    if request.batch not in output:
        raise ValueError(
            f"conv_einsum: per_sample batch letter {request.batch!r} is not in the "
            f"output {output!r}"
        )
    for position in request.candidates:
        if not 0 <= position < network.output_node:
            raise ValueError(
                f"conv_einsum: per_sample names operand {position}, but there are "
                f"{network.output_node} operands"
            )
        if request.batch in network.subscripts[position]:
            raise ValueError(
                f"conv_einsum: operand {position} holds the batch letter "
                f"{request.batch!r}: it has no per-sample gradient"
            )


@dataclass(frozen=True)
class PathStep:
    """One step of a planned contraction, in terms of the operands.

    Attributes:
        operands: The input operands (positions) contracted by this step; ``Y``
            stands for the output (or its gradient).
        method: ``einsum``, ``conv``, ``wgrad``, ``transposed`` or ``pattern``.
        letters: Letters of the result.
        shape: Shape of the result.
        flops: Estimated FLOPs (2 per multiply-add).
        bytes: Bytes read and written.
        seconds: Estimated time on one core.
    """

    operands: Tuple[str, ...]
    method: str
    letters: str
    shape: Tuple[int, ...]
    flops: int
    bytes: int
    seconds: float


@dataclass(frozen=True)
class PathInfo:
    """Planned forward (and gradient) contractions, like opt_einsum's PathInfo.

    Attributes:
        equation: The string.
        forward: Steps of the forward.
        gradients: Per operand position, the steps of its gradient.
    """

    equation: str
    forward: Tuple[PathStep, ...]
    gradients: Tuple[Tuple[int, Tuple[PathStep, ...]], ...]

    @property
    def flops(self) -> int:
        """Estimated FLOPs of the forward."""
        return sum(step.flops for step in self.forward)

    @property
    def backward_flops(self) -> int:
        """Estimated FLOPs of the gradients (shared steps counted once)."""
        return sum(step.flops for _, steps in self.gradients for step in steps)

    def __str__(self) -> str:
        lines = [f"conv_einsum path of {self.equation!r}"]
        sections = [("forward", self.forward)] + [
            (f"gradient of operand {i}", steps) for i, steps in self.gradients
        ]
        for title, steps in sections:
            lines.append(f"  {title}:")
            for step in steps:
                lines.append(
                    f"    {'+'.join(step.operands):>12} -> {step.letters:<10} "
                    f"{step.method:<10} {step.flops / 1e6:12.2f} MFLOP "
                    f"{step.bytes / 1e6:10.2f} MB {step.seconds * 1e3:9.3f} ms"
                )
        return "\n".join(lines)


def _describe_steps(network: Network, contraction: Contraction) -> Tuple[PathStep, ...]:
    names = [str(i) for i in range(len(network.subscripts) - 1)] + ["Y"]
    out = []
    for step in contraction.steps:
        out.append(
            PathStep(
                operands=tuple(names[i] for i in members(step.result)),
                method=step.method,
                letters=step.out.letters,
                shape=step.out.sizes,
                flops=step.flops,
                bytes=step.bytes,
                seconds=step.seconds,
            )
        )
    return tuple(out)


def _opt_einsum_path(
    network: Network, contraction: Contraction
) -> List[Tuple[int, int]]:
    """The steps as positions in a shrinking operand list (opt_einsum style)."""
    groups = [1 << i for i in range(len(network.subscripts)) if i != contraction.node]
    path = []
    for step in contraction.steps:
        i, j = groups.index(step.left), groups.index(step.right)
        path.append((min(i, j), max(i, j)))
        groups = [g for g in groups if g not in (step.left, step.right)] + [step.result]
    return path


def conv_einsum_path(
    equation: str,
    *operands: Union[Tensor, Sequence[int]],
    stride: Hyper = 1,
    padding: Hyper = 0,
    dilation: Hyper = 1,
    padding_mode: str = "zeros",
    optimize: str = "auto",
    itemsize: int = 4,
    gradients: bool = True,
) -> Tuple[List[Tuple[int, int]], PathInfo]:
    """The plan :func:`conv_einsum` would use, with FLOPs and bytes per step.

    Args:
        equation: As for :func:`conv_einsum`.
        *operands: Tensors or shapes.
        stride: As for :func:`conv_einsum`.
        padding: As for :func:`conv_einsum`.
        dilation: As for :func:`conv_einsum`.
        padding_mode: As for :func:`conv_einsum`.
        optimize: As for :func:`conv_einsum`.
        itemsize: Bytes per entry when shapes are given (tensors: theirs).
        gradients: Also plan the gradients of every operand.

    Returns:
        The forward path as pairs of positions in the list of remaining
        operands (opt_einsum's convention; the output's gradient is the last
        operand of a gradient's list), and a :class:`PathInfo`.
    """
    if not operands:
        raise ValueError("conv_einsum_path: no operands given")
    shapes = [
        tuple(op.shape) if isinstance(op, Tensor) else tuple(op) for op in operands
    ]
    if isinstance(operands[0], Tensor):
        itemsize = operands[0].element_size()
    network, _ = _prepare(
        equation, shapes, stride, padding, dilation, padding_mode, optimize
    )
    wanted = tuple(range(len(shapes))) if gradients else ()
    chosen = plan(network, itemsize, wanted)
    info = PathInfo(
        equation=equation,
        forward=_describe_steps(network, chosen.forward),
        gradients=tuple(
            (grad.node, _describe_steps(network, grad)) for grad in chosen.gradients
        ),
    )
    return _opt_einsum_path(network, chosen.forward), info
