"""Smoke tests: every example runs end to end in its ``--quick`` mode."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")


def load(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (examples are not a package)."""
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", EXAMPLES / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo(tmp_path, capsys):
    plot = tmp_path / "loss.png"
    threads = str(torch.get_num_threads())  # leave the process setting alone
    accuracies = load("demo").main(
        ["--quick", "--plot", str(plot), "--threads", threads]
    )
    out = capsys.readouterr().out
    assert set(accuracies) == {"SGD", "Adam", "KFAC"}
    for name in accuracies:
        assert re.search(rf"^{name} +test accuracy: \d+\.\d%$", out, re.MULTILINE)
    # one epoch is enough to beat chance by far (about 93% for K-FAC)
    assert accuracies["KFAC"] > 0.8
    assert "max relative difference" in out and "NotImplementedError" in out
    assert plot.stat().st_size > 0


def test_quickstart(capsys):
    lines = load("quickstart").main(["--quick"])
    out = capsys.readouterr().out
    headers = [line for line in lines if "-> param." in line]
    assert len(headers) == 15
    assert 'KFAC(kfac_approx="reduce") -> param.kfac' in out
    # grouped conv: two stacked pairs of factors
    assert "[[2, 4, 4], [2, 18, 18]]" in out


def test_dp_sgd(capsys):
    accuracy = load("dp_sgd").main(["--quick"])
    out = capsys.readouterr().out
    tn_line = next(line for line in out.splitlines() if "tnbackpack batch_l2" in line)
    assert float(tn_line.rsplit(" ", 1)[1]) < 1e-5
    assert accuracy > 0.2


def test_laplace(capsys):
    results = load("laplace").main(["--quick"])
    out = capsys.readouterr().out
    assert "noise: mean entropy" in out and len(results) == 2


def test_compress(tmp_path, capsys):
    pytest.importorskip("tensorly")
    plot = tmp_path / "accuracy.png"
    threads = str(torch.get_num_threads())
    rows = load("compress").main(["--quick", "--plot", str(plot), "--threads", threads])
    out = capsys.readouterr().out
    assert [r["variant"] for r in rows] == [
        "dense", "cp 50%", "cp 20%", "tucker 50%", "tucker 20%",
    ]  # fmt: skip
    dense = rows[0]["conv_parameters"]
    for row in rows[1:]:
        assert row["conv_parameters"] < dense and row["accuracy"] > 0.5
        assert row["variant"] in out
    assert plot.stat().st_size > 0
