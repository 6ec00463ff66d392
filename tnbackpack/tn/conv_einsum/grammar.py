"""Parse conv_einsum strings: ``"nchw,rc,rh,rw,or->nohw|hw"``.

The part before ``|`` is an einsum equation with single-letter subscripts and
an explicit output after ``->``; the part after ``|`` lists the convolution
letters (commas and spaces are ignored there). See DESIGN.md §7.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Tuple


@dataclass(frozen=True)
class Equation:
    """A parsed conv_einsum string.

    Attributes:
        inputs: Subscripts of every operand.
        output: Subscripts of the result.
        conv: The convolution letters, in the order written after ``|``.
    """

    inputs: Tuple[str, ...]
    output: str
    conv: Tuple[str, ...]

    @property
    def letters(self) -> Tuple[str, ...]:
        """Every letter of the inputs, in order of first appearance."""
        return tuple(dict.fromkeys("".join(self.inputs)))

    def holders(self, letter: str) -> Tuple[int, ...]:
        """Positions of the operands that hold ``letter``."""
        return tuple(i for i, subs in enumerate(self.inputs) if letter in subs)


def _check_letters(text: str, where: str) -> None:
    for char in text:
        if not char.isalpha() or not char.isascii():
            raise ValueError(
                f"conv_einsum: {where} has character {char!r}; subscripts are "
                f"single ASCII letters (no ellipsis)"
            )


@lru_cache(maxsize=1024)
def parse(equation: str) -> Equation:
    """Parse and check a conv_einsum string (grammar only, no shapes).

    Raises:
        ValueError: Naming the offending letter or operand: no ``->``, a
            letter repeated within one operand or the output, an output letter
            no input has, a convolution letter that no input has or that is
            missing from the output.
    """
    if not isinstance(equation, str):
        raise ValueError(f"conv_einsum: equation must be a string, got {equation!r}")
    text = equation.replace(" ", "")
    body, bar, conv_text = text.partition("|")
    if "|" in conv_text:
        raise ValueError(f"conv_einsum: more than one '|' in {equation!r}")
    if "->" not in body:
        raise ValueError(
            f"conv_einsum: {equation!r} has no '->'; write the output explicitly"
        )
    lhs, output = body.split("->", 1)
    inputs = tuple(lhs.split(","))
    for position, subs in enumerate(inputs):
        _check_letters(subs, f"operand {position} ({subs!r})")
        repeated = sorted({c for c in subs if subs.count(c) > 1})
        if repeated:
            raise ValueError(
                f"conv_einsum: letter {repeated[0]!r} repeated in operand {position} "
                f"({subs!r}); diagonals are not supported"
            )
    _check_letters(output, f"the output ({output!r})")
    conv_letters = conv_text.replace(",", "")
    _check_letters(conv_letters, f"the convolution letters ({conv_text!r})")
    for subs, where in (
        (output, "the output"),
        (conv_letters, "the convolution letters"),
    ):
        repeated = sorted({c for c in subs if subs.count(c) > 1})
        if repeated:
            raise ValueError(
                f"conv_einsum: letter {repeated[0]!r} repeated in {where} of "
                f"{equation!r}"
            )
    held = set("".join(inputs))
    for letter in output:
        if letter not in held:
            raise ValueError(
                f"conv_einsum: output letter {letter!r} appears in no input of "
                f"{equation!r}"
            )
    for letter in conv_letters:
        if letter not in held:
            raise ValueError(
                f"conv_einsum: convolution letter {letter!r} appears in no input of "
                f"{equation!r}"
            )
        if letter not in output:
            raise ValueError(
                f"conv_einsum: convolution letter {letter!r} is missing from the "
                f"output {output!r}; a convolution letter indexes output positions"
            )
    return Equation(inputs=inputs, output=output, conv=tuple(conv_letters))
