"""The client benchmark's plumbing (the clients themselves may be absent)."""

from tnbackpack.benchmark.clients import ClientRow, Workflow, markdown, measure


def test_missing_client_is_reported_not_dropped():
    def never(size):
        raise AssertionError("a missing client's workflow must not be prepared")

    row = measure(Workflow("no_such_client_pkg", "fit", never), 4, 1, 1.0)
    assert (row.stock_ms, row.tn_ms, row.note) == (None, None, "not installed")
    assert row.speedup is None


def test_table_has_one_row_per_workflow_and_the_ratio():
    rows = [
        ClientRow("laplace", "fit", 30.0, 20.0),
        ClientRow("vivit", "eigvalsh", None, None, "not installed"),
    ]
    table = markdown(rows, size=32, threads=1)
    assert "| laplace | fit | 30.0 | 20.0 | 1.50× |  |" in table
    assert "| vivit | eigvalsh | – | – | – | not installed |" in table
    assert "python -m tnbackpack.benchmark --clients" in table
