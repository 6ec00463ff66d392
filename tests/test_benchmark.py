"""Smoke test of ``python -m tnbackpack.benchmark`` and checks of its helpers.

The benchmark measures; these tests only make sure it runs end to end (timing,
BackPACK check, memory subprocess, CSV/markdown/plot) and that the pieces that
decide a row's status and ratios are right.
"""

import csv
import math
import time

import pytest
import torch
from torch import nn

from tnbackpack import extensions
from tnbackpack.benchmark import ALL_EXTENSIONS, CASES, extension_pairs
from tnbackpack.benchmark.__main__ import main, parse
from tnbackpack.benchmark.cases import Case
from tnbackpack.benchmark.check import relative_error
from tnbackpack.benchmark.floor import without_conv_parameters
from tnbackpack.benchmark.memory import backward_peak_mb
from tnbackpack.benchmark.report import Row, geometric_mean, read_csv, summary_lines
from tnbackpack.benchmark.timing import time_interleaved
from tnbackpack.benchmark.workload import Workload


def test_quick_run_writes_outputs(tmp_path):
    main(
        [
            "--quick",
            "--cases=inceptionv3_7x7",
            "--extensions=BatchL2Grad,KFAC(reduce),DiagGGNExact",
            "--batch=2",
            "--repeats=1",
            "--warmup=0",
            f"--output={tmp_path}",
        ]
    )
    with open(tmp_path / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["case"], r["extension"]) for r in rows] == [
        ("inceptionv3_7x7", ext)
        for ext in ("BatchL2Grad", "KFAC(reduce)", "DiagGGNExact")
    ]
    for row in rows:
        assert row["status"] == "ok"  # BackPACK is right on these layers
        for column in ("plain_ms", "tnbackpack_ms", "backpack_ms", "floor_ms"):
            assert float(row[column]) > 0
        for column in ("tnbackpack_mb", "backpack_mb", "tnbackpack_first_mb"):
            assert float(row[column]) >= 0  # a number, not an error text
    (first, *_) = read_csv(tmp_path / "results.csv")
    assert first.extension == "BatchL2Grad" and first.speedup > 0
    table = (tmp_path / "table.md").read_text()
    assert "| inceptionv3_7x7 | DiagGGNExact |" in table
    assert "geometric mean" in table and "speedup bound" in table
    assert (tmp_path / "speedup.png").stat().st_size > 0


def test_quick_defaults():
    settings = parse(["--quick"])
    assert settings.repeats == 3 and settings.threads == 1 and settings.batch == 32
    assert set(settings.cases) <= set(CASES)
    assert str(settings.output).endswith("quick")


def test_failing_backpack_is_reported_not_dropped(tmp_path):
    # BackPACK's KFAC refuses groups (depthwise conv): the row says so.
    main(
        [
            "--cases=mobilenetv2_dw",
            "--extensions=KFAC(backpack)",
            "--batch=2",
            "--repeats=1",
            "--no-memory",
            f"--output={tmp_path}",
        ]
    )
    with open(tmp_path / "results.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["status"].startswith("fails: NotImplementedError")
    assert row["backpack_ms"] == "" and float(row["tnbackpack_ms"]) > 0


@pytest.mark.parametrize("name", list(CASES))
def test_case_models_run(name):
    case = CASES[name]
    model = case.model()
    x, y = case.data(2)
    assert model(x).shape == (2, case.num_classes)
    if case.kind == "layer":  # the head is frozen, the layer is not
        *_, head = model
        assert not any(p.requires_grad for p in head.parameters())
        assert any(p.requires_grad for p in model.parameters())


def test_every_extension_has_a_pair():
    pairs, notes = extension_pairs(ALL_EXTENSIONS)
    assert [p.name for p in pairs] == list(ALL_EXTENSIONS) and notes == []


def test_relative_error():
    a = {"w": torch.tensor([3.0, 4.0]), "b": [torch.ones(2), torch.zeros(1)]}
    assert relative_error(a, a) == 0.0
    b = {"w": torch.tensor([3.0, 4.0]), "b": [torch.ones(2), torch.ones(1)]}
    assert relative_error(a, b) == pytest.approx(1 / math.sqrt(27))
    assert relative_error(a, {"w": a["w"]}) == math.inf
    assert relative_error(a, {**a, "w": torch.zeros(3)}) == math.inf


def test_interleaved_timing_records_failures():
    calls = []

    def failing():
        raise NotImplementedError("no rule\nfor this")

    timings = time_interleaved(
        {"a": lambda: calls.append("a"), "b": failing, "c": lambda: calls.append("c")},
        cleanup=lambda: None,
        repeats=4,
    )
    assert timings.errors == {"b": "NotImplementedError: no rule"}
    assert len(timings.seconds["a"]) == len(timings.seconds["c"]) == 4
    assert calls[2:4] == ["a", "c"] and calls[4:6] == ["c", "a"]  # rotated order
    assert timings.median_ms("b") is None and timings.median_ms("a") >= 0


def test_fast_variants_get_more_rounds():
    def sleep():
        time.sleep(0.001)

    # 10 rounds of ~1 ms stay far below min_seconds even on a loaded machine,
    # so the cap (5 x repeats by default) is what stops them.
    timings = time_interleaved({"a": sleep}, lambda: None, 2, 0, min_seconds=0.5)
    assert len(timings.seconds["a"]) == 10
    timings = time_interleaved(
        {"a": sleep}, lambda: None, 2, 0, min_seconds=1.0, max_repeats=3
    )
    assert len(timings.seconds["a"]) == 3


def test_summary_figures():
    rows = [
        Row("l", "layer", "A", "ok", 1.0, 2.0, 8.0, tnbackpack_mb=1.0, backpack_mb=4.0),
        Row("l", "layer", "B", "ok", 1.0, 4.0, 2.0, tnbackpack_mb=3.0, backpack_mb=2.0),
        Row("l", "layer", "C", "fails: X", 1.0, 2.0),
        Row("l", "layer", "D", "wrong (rel. err 0.3)", 1.0, 1.0, 3.0),
    ]
    assert geometric_mean([4.0, 0.5]) == pytest.approx(math.sqrt(2))
    text = "\n".join(summary_lines(rows))
    assert "over 2 (case, extension) rows where BackPACK works: 1.41×" in text
    assert "minimum 0.50× (l / B)" in text
    assert "1 rows above 1: l / B 1.50" in text
    assert "BackPACK fails: 1" in text


def test_speedup_bound():
    # BackPACK / max(plain, floor): the floor counts where it exceeds plain.
    assert Row("l", "net", "A", "ok", 2.0, 5.0, 12.0, floor_ms=4.0).speedup_bound == 3
    assert Row("l", "net", "A", "ok", 2.0, 5.0, 12.0, floor_ms=1.0).speedup_bound == 6
    assert Row("l", "net", "A", "ok", 2.0, 5.0, 12.0).speedup_bound is None
    row = Row("l", "net", "A", "ok", 2.0, 5.0, 12.0, floor_ms=4.0)
    text = "\n".join(summary_lines([row]))
    assert "geometric mean 3.00×; tnbackpack reaches 80% of it" in text


@pytest.mark.parametrize("name", ["BatchGrad", "KFAC(reduce)", "DiagGGNExact"])
def test_floor_skips_only_conv_parameters(name):
    # 3c3d: three convs, three linear layers, all trainable.
    (pair,), _ = extension_pairs((name,))
    workload = Workload(CASES["3c3d"], 2, torch.float64)
    full = pair.tnbackpack()
    workload.backward(workload.forward(), full, seed=0)  # KFAC samples
    expected = workload.results(full)
    workload.clear()
    floor = without_conv_parameters(pair.tnbackpack())
    workload.backward(workload.forward(), floor, seed=0)
    got = workload.results(floor)
    convs = {
        f"{name}.{p}"
        for name, m in workload.model.named_modules()
        if isinstance(m, nn.Conv2d)
        for p in ("weight", "bias")
    }
    assert set(got) == set(expected) - convs and convs <= set(expected)
    for key, value in got.items():  # linear quantities need the backpropagation
        reference = expected[key]
        if not isinstance(value, list):
            value, reference = [value], [reference]
        for a, b in zip(value, reference):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_backward_peak_counts_the_results():
    # Plain backward: the weight gradients; BatchGrad: plus N per-sample copies.
    linear = Case(
        "linear",
        "net",
        "two linear layers",
        (100,),
        10,
        lambda: nn.Sequential(nn.Linear(100, 100, bias=False), nn.Linear(100, 10)),
    )
    workload = Workload(linear, 5)
    grads_mb = (100 * 100 + 10 * 100 + 10) * 4 / 2**20
    # The results dominate; the small temporaries (gradients w.r.t. layer
    # outputs, [5, 100]) move the figures by about a percent.
    assert backward_peak_mb(workload, None) == pytest.approx(grads_mb, rel=0.05)
    batch_grad = backward_peak_mb(workload, extensions.BatchGrad())
    assert batch_grad == pytest.approx(6 * grads_mb, rel=0.05)
