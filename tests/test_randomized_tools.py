"""Smoke tests of the TN dropout benchmark and study script (quick modes)."""

import csv
import importlib.util
from pathlib import Path

import torch

from tnbackpack.benchmark.__main__ import main as benchmark_main
from tnbackpack.benchmark.randomized import KEEPS

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_randomized_benchmark_quick(tmp_path, capsys):
    threads = torch.get_num_threads()
    benchmark_main(["--randomized", "--quick", f"--output={tmp_path}"])
    torch.set_num_threads(threads)
    assert "TN dropout" in capsys.readouterr().out
    with open(tmp_path / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    variants = {(r["variant"], float(r["keep"])) for r in rows}
    assert variants == {("exact", 1.0)} | {
        (v, k) for v in ("sampled", "masked") for k in KEEPS
    }
    for row in rows:
        assert float(row["backward_ms"]) > 0
        keep, stored = float(row["keep"]), float(row["stored"])
        if row["variant"] == "sampled":
            assert stored <= min(1.0, 2.5 * keep)  # the kept slices only
        else:
            assert stored == 1.0  # exact and masking store the whole input
    assert (tmp_path / "table.md").read_text().count("|") > 10


def test_study_script_quick(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "tn_dropout_study", EXAMPLES / "tn_dropout_study.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    result = module.main(["--quick", "--threads=1", f"--output={tmp_path}"])
    torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "normalized error" in out and "final test accuracy" in out
    for path in result["paths"]:
        assert path.stat().st_size > 0
    for rows in result["errors"].values():
        for row in rows:
            assert row["error"] > 0 and 0 < row["stored"] <= 1
