"""examples/separation_ranks.py runs in its --quick mode and reproduces hand values."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "separation_ranks.py"


def test_separation_ranks_example(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("example_separation_ranks", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    convacs, relus = module.main(["--quick", "--out", str(tmp_path)])
    page = (tmp_path / "separation_ranks.md").read_text(encoding="utf-8")
    assert (tmp_path / "log_ranks.png").stat().st_size > 0

    def cells(kind, pooling, shared, width):
        row = next(
            r
            for r in convacs
            if (r["kind"], r["pooling"], r["shared"], r["width"])
            == (kind, pooling, shared, width)
        )
        return [
            row["cells"][p]["rank"] for p in ("left/right", "odd/even", "outer/inner")
        ]

    # N = 8, M = 2 (DESIGN §9 and the closed forms of tests/test_analysis_rank.py)
    assert cells("deep", "contiguous", False, 2) == [2, 16, 4]
    assert cells("deep", "mirror", False, 3) == [16, 16, 3]
    assert cells("shallow", "global", False, 3) == [3, 3, 3]
    assert cells("deep", "contiguous", True, 4)[2] == 9  # symmetric pairs: 3·3
    for row in convacs:
        for cell in row["cells"].values():
            assert cell["rank"] <= cell["cut"]
            if not row["shared"]:
                assert cell["rank"] == cell["cut"]
    # average pooling then a linear head: left/right is a sum of one function per side
    assert all(
        r["cells"]["left/right"]["rank"] <= 2 for r in relus if r["pooling"] == "avg"
    )
    assert "| deep | contiguous | unshared | 2 | 2 | 2 / 2 | 16 / 16 | 4 / 4 |" in page
    assert "**9 / 16**" in page
