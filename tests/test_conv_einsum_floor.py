"""Smoke test of ``python -m tnbackpack.benchmark.conv_einsum_floor --quick``."""

import csv

from tnbackpack.benchmark.conv_einsum import FACTORIZATIONS
from tnbackpack.benchmark.conv_einsum_floor import main


def test_quick_run_writes_floor_table(tmp_path):
    main(["--quick", "--repeats=1", "--max-seconds=0", f"--output={tmp_path}"])
    with open(tmp_path / "floor.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["factorization"] for r in rows} == set(FACTORIZATIONS)
    assert len(rows) == sum(len(spec[2]) for spec in FACTORIZATIONS.values())
    for row in rows:
        assert row["layer"] == "16@14²"
        columns = ("conv_einsum", "channels_last", "sequence", "floor")
        assert all(float(row[c]) > 0 for c in columns)
    assert "| 16@14² | tt |" in (tmp_path / "floor.md").read_text()
