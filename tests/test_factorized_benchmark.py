"""Smoke test of ``python -m tnbackpack.benchmark --factorized --quick``."""

import csv

import pytest

from tnbackpack.benchmark.__main__ import main
from tnbackpack.benchmark.factorized import QUICK_CASES, ROWS

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")


def test_quick_run_writes_outputs(tmp_path):
    main(
        ["--factorized", "--quick", "--batch=2", "--repeats=1", f"--output={tmp_path}"]
    )
    with open(tmp_path / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["case"], r["extension"]) for r in rows] == [
        (case.name, row) for case in QUICK_CASES for row in ROWS
    ]
    for row in rows:
        assert float(row["tnbackpack_ms"]) > 0 and float(row["tnbackpack_mb"]) >= 0
        if row["case"].startswith("tr"):  # no plain stage sequence for a ring
            assert "backpack_stages" in row["errors"]
        elif row["extension"] == "KFAC(reduce)" and row["case"].startswith("cp"):
            assert "NotImplementedError" in row["errors"]  # BackPACK: groups
        else:
            assert float(row["backpack_stages_ms"]) > 0
    table = (tmp_path / "table.md").read_text()
    assert "| cp4_8@8 | BatchGrad |" in table and "refused" in table
