"""Random conv_einsum strings and hyper-parameters vs explicit 0/1 patterns.

Equations are drawn with 1-4 operands, 1-3 convolution letters (4 in the slow
sweep), any holders per letter (so several kernels per letter, signals in
any operand, no batch letter), plain letters summed or kept, and random
stride, padding (int, pair, 'same'), dilation and padding mode. The reference
is :func:`conv_einsum_cases.pattern_reference`; gradients by autograd through it.
"""

import pytest
import torch
from conv_einsum_cases import assert_matches, pattern_reference
from hypothesis import given, settings
from hypothesis import strategies as st

from tnbackpack import conv_einsum


@st.composite
def problems(draw, max_conv=3):
    n_ops = draw(st.integers(1, 4))
    n_conv = draw(st.integers(1, max_conv))
    conv = "hwdt"[:n_conv]
    plain = "abcef"[: draw(st.integers(0, 4))]
    subs = [[] for _ in range(n_ops)]
    for letter in conv:
        holders = draw(
            st.lists(st.integers(0, n_ops - 1), min_size=1, max_size=3, unique=True)
        )
        for j in holders:
            subs[j].append(letter)
    for letter in plain:
        holders = draw(
            st.lists(st.integers(0, n_ops - 1), min_size=1, max_size=3, unique=True)
        )
        for j in holders:
            subs[j].append(letter)
    subs = ["".join(draw(st.permutations(s))) if s else "" for s in subs]
    kept = [c for c in plain if draw(st.booleans())]
    output = "".join(draw(st.permutations(list(conv) + kept)))
    sizes = {c: draw(st.integers(1, 3)) for c in plain}
    stride = {c: draw(st.integers(1, 2)) for c in conv}
    dilation = {c: draw(st.integers(1, 2)) for c in conv}
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    shapes, padding = [[] for _ in subs], {}
    signal_sizes, kernel_sizes = {}, {c: [] for c in conv}
    for j, s in enumerate(subs):
        for c in s:
            if c in conv and c not in signal_sizes:
                signal_sizes[c] = draw(st.integers(4, 7))
                shapes[j].append(signal_sizes[c])
            elif c in conv:
                kernel_sizes[c].append(draw(st.integers(1, 3)))
                shapes[j].append(kernel_sizes[c][-1])
            else:
                shapes[j].append(sizes[c])
    same = draw(st.booleans())
    for c in conv:
        span = dilation[c] * sum(k - 1 for k in kernel_sizes[c])
        if same and all(stride[c] == 1 for c in conv):
            padding = "same"
            break
        limit = signal_sizes[c] - 1
        padding[c] = (
            draw(st.integers(0, min(2, limit))),
            draw(st.integers(0, min(2, limit))),
        )
        if signal_sizes[c] + sum(padding[c]) - span < 1:
            padding[c] = (limit, limit)
    if padding == "same" and mode == "reflect":
        for c in conv:
            span = dilation[c] * sum(k - 1 for k in kernel_sizes[c])
            if span - span // 2 > signal_sizes[c] - 1:
                mode = "zeros"
    if padding != "same":
        for c in conv:
            span = dilation[c] * sum(k - 1 for k in kernel_sizes[c])
            if signal_sizes[c] + sum(padding[c]) - span < 1:
                dilation[c] = 1
    equation = ",".join(subs) + "->" + output + "|" + "".join(conv)
    options = dict(stride=stride, padding=padding, dilation=dilation, padding_mode=mode)
    return equation, shapes, options


def check(problem, dtype=torch.float64, tol=1e-10):
    equation, shapes, options = problem
    torch.manual_seed(0)
    operands = [torch.randn(tuple(s), dtype=torch.float64) for s in shapes]
    try:
        pattern_reference(equation, *operands, **options)
    except Exception:  # the problem is invalid: kernel longer than the signal
        with pytest.raises(ValueError):
            conv_einsum(equation, *operands, **options)
        return
    assert_matches(
        lambda *o: conv_einsum(equation, *o, **options),
        lambda *o: pattern_reference(equation, *o, **options),
        operands, dtype, tol,
    )  # fmt: skip


@given(problems())
@settings(max_examples=60, derandomize=True)
def test_random_equations_float64(problem):
    check(problem)


@given(problems())
@settings(max_examples=20, derandomize=True)
def test_random_equations_float32(problem):
    check(problem, torch.float32, 1e-4)


@pytest.mark.slow
@given(problems(max_conv=4))
@settings(max_examples=400, derandomize=True)
def test_random_equations_many(problem):
    check(problem)
