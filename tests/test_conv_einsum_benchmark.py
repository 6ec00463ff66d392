"""Smoke test of ``python -m tnbackpack.benchmark --conv-einsum --quick``."""

import csv

import torch
import torch.nn.functional as F

from tnbackpack.benchmark.__main__ import main
from tnbackpack.benchmark.conv_einsum import FACTORIZATIONS, factor_shapes, sequence


def test_quick_run_writes_table_and_csv(tmp_path):
    main(
        ["--conv-einsum", "--quick", "--batch=2", "--repeats=1", f"--output={tmp_path}"]
    )
    with open(tmp_path / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["factorization"], r["layer"]) for r in rows][0] == ("cp", "16@14²")
    assert {r["factorization"] for r in rows} == set(FACTORIZATIONS)
    for row in rows:
        assert row["check"] == "ok"  # every variant computes the same layer
        assert float(row["conv_einsum_ms"]) > 0 and float(row["speedup"]) > 0
        assert float(row["est_gflop"]) > 0
    table = (tmp_path / "table.md").read_text()
    assert "Geometric mean speedup" in table and "| 16@14² | tt |" in table


def test_stage_sequence_baseline_is_the_layer():
    """The hand-written baseline computes the rebuilt-kernel convolution."""
    torch.manual_seed(0)
    for name, (_, rebuild, _) in FACTORIZATIONS.items():
        factors = [
            torch.randn(s, dtype=torch.float64) for s in factor_shapes(name, 6, 3)
        ]
        x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
        expected = F.conv2d(x, torch.einsum(rebuild, *factors), padding=1)
        torch.testing.assert_close(sequence(name, x, factors), expected)
