"""examples/train_distributed.py: in one process (default) and under torchrun (slow)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_examples import load

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")


def test_single_process_quick(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = load("train_distributed").main(["--quick"])
    assert result["multi"] is None and result["single"]["accuracy"] > 0.8
    assert re.search(
        r"1 process\(es\): test accuracy \d+\.\d%", capsys.readouterr().out
    )


@pytest.mark.slow
def test_torchrun_two_processes():
    """Same steps as one process up to rounding with the exact GGN (KFLR)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        str(ROOT / "examples/train_distributed.py"),
        "--quick",
        "--curvature",
        "kflr",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=600, check=True
    ).stdout
    assert "2 process(es): test accuracy" in out
    gap = float(re.search(r"final parameters: (\S+)", out).group(1))
    assert gap < 1e-4
