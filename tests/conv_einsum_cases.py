"""Independent references for conv_einsum tests (no tnbackpack code used).

``pattern_reference`` evaluates a conv_einsum string the slow, obvious way:
one explicit 0/1 index pattern ``Π[k_1, .., k_m, o, i]`` per convolution
letter, built by loops from the definition in DESIGN.md §7, and a single
``torch.einsum`` over operands and patterns. Autograd through it gives the
reference gradients.
"""

import itertools
import string

import torch


def split(equation):
    """Operand subscripts, output, convolution letters (test's own parser)."""
    body, _, conv = equation.replace(" ", "").partition("|")
    lhs, output = body.split("->")
    return lhs.split(","), output, conv.replace(",", "")


def per_letter(value, conv, default):
    if isinstance(value, dict):
        return {c: value.get(c, default) for c in conv}
    if isinstance(value, (tuple, list)):
        return dict(zip(conv, value))
    return {c: value for c in conv}


def read_position(v, size, mode):
    """Real position a virtual (padded) position reads, None for zeros."""
    if 0 <= v < size:
        return v
    if mode == "zeros":
        return None
    if mode == "replicate":
        return min(max(v, 0), size - 1)
    if mode == "circular":
        return v % size
    if mode == "reflect":
        return -v if v < 0 else 2 * (size - 1) - v
    raise AssertionError(mode)


def pattern_reference(
    equation, *operands, stride=1, padding=0, dilation=1, padding_mode="zeros"
):
    inputs, output, conv = split(equation)
    strides = per_letter(stride, conv, 1)
    dilations = per_letter(dilation, conv, 1)
    paddings = (
        {c: padding for c in conv}
        if isinstance(padding, str)
        else per_letter(padding, conv, 0)
    )
    used = set("".join(inputs))
    fresh = iter(c for c in string.ascii_letters if c not in used)
    subs = [list(s) for s in inputs]
    patterns, pattern_subs = [], []
    for h in conv:
        holders = [j for j, s in enumerate(inputs) if h in s]
        signal, kernels = holders[0], holders[1:]
        size_in = operands[signal].shape[inputs[signal].index(h)]
        ks = [operands[j].shape[inputs[j].index(h)] for j in kernels]
        s, d = strides[h], dilations[h]
        span = d * sum(k - 1 for k in ks)
        p = paddings[h]
        if p == "valid":
            left = right = 0
        elif p == "same":
            left, right = span // 2, span - span // 2
        elif isinstance(p, (tuple, list)):
            left, right = p
        else:
            left = right = p
        size_out = (size_in + left + right - span - 1) // s + 1
        pi = torch.zeros(*ks, size_out, size_in, dtype=operands[0].dtype)
        for taps in itertools.product(*(range(k) for k in ks)):
            for o in range(size_out):
                real = read_position(
                    s * o + d * sum(taps) - left, size_in, padding_mode
                )
                if real is not None:
                    pi[taps + (o, real)] += 1
        i_letter = next(fresh)
        subs[signal][inputs[signal].index(h)] = i_letter
        k_letters = []
        for j in kernels:
            k_letters.append(next(fresh))
            subs[j][inputs[j].index(h)] = k_letters[-1]
        patterns.append(pi)
        pattern_subs.append("".join(k_letters) + h + i_letter)
    eq = ",".join(["".join(s) for s in subs] + pattern_subs) + "->" + output
    return torch.einsum(eq, *operands, *patterns)


def grads(function, operands, grad_output):
    """Gradients of ``<function(*operands), grad_output>`` w.r.t. every operand."""
    leaves = [op.detach().clone().requires_grad_(True) for op in operands]
    out = function(*leaves)
    return out, torch.autograd.grad(out, leaves, grad_output)


def assert_matches(ours, reference, operands, dtype=torch.float64, tol=1e-10):
    """``ours`` (run in ``dtype``) and ``reference`` (float64) agree on the
    value and on the gradient of every operand, for one random output gradient.
    """
    operands = [op.double() for op in operands]
    expected = reference(*operands)
    grad_output = torch.randn_like(expected)
    _, expected_grads = grads(reference, operands, grad_output)
    out, got_grads = grads(
        ours, [op.to(dtype) for op in operands], grad_output.to(dtype)
    )
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    for position, (got, want) in enumerate(zip(got_grads, expected_grads)):
        torch.testing.assert_close(
            got.double(), want, rtol=tol, atol=tol,
            msg=lambda m, p=position: f"gradient of operand {p}: {m}",
        )  # fmt: skip
