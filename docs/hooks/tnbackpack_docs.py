"""MkDocs hooks of tnbackpack's documentation (registered in ``mkdocs.yml``).

- In ``benchmarks.md`` the marker ``<!-- benchmark-results -->`` becomes the
  latest results of ``python -m tnbackpack.benchmark`` (``docs/benchmarks/``:
  ``table.md``, ``speedup.png``, ``results.csv``), or a note when there are none
  yet, so ``mkdocs build --strict`` passes either way.
- In ``clients.md`` the marker ``<!-- client-benchmark -->`` becomes
  ``docs/benchmarks/clients.md`` (``python -m tnbackpack.benchmark --clients``),
  or a note when it is missing.
- Sphinx roles in docstrings (``:class:`~a.b.C```), which mkdocstrings leaves
  as text, are shown as plain code.
"""

from __future__ import annotations

import re
from pathlib import Path

MARKER = "<!-- benchmark-results -->"
ROLE = re.compile(
    r":(?:class|mod|func|meth|attr|data|obj|exc):<code>(~?)([\w.]+)</code>"
)

NO_RESULTS = """## Results

!!! note "No results in this build"
    The benchmark writes its results to `docs/benchmarks/`; run `make bench`
    (or `python -m tnbackpack.benchmark`) and rebuild the documentation.
"""


def _demoted(markdown: str) -> str:
    """Move every heading one level down (the page has its own title).

    The table's title becomes the page's "results" section.
    """
    return re.sub(r"^(#+) ", r"#\1 ", markdown, flags=re.MULTILINE)


CLIENT_MARKER = "<!-- client-benchmark -->"

NO_CLIENT_RESULTS = """!!! note "No client results in this build"
    Run `python -m tnbackpack.benchmark --clients` and rebuild the documentation.
"""


def on_page_markdown(markdown, page, config, files):
    """Replace the benchmark markers by the results, if any."""
    if CLIENT_MARKER in markdown:
        table = Path(config["docs_dir"]) / "benchmarks" / "clients.md"
        found = table.is_file()
        text = table.read_text(encoding="utf-8") if found else NO_CLIENT_RESULTS
        markdown = markdown.replace(CLIENT_MARKER, text)
    if MARKER not in markdown:
        return markdown
    results = Path(config["docs_dir"]) / "benchmarks"
    table = results / "table.md"
    if not table.is_file():
        return markdown.replace(MARKER, NO_RESULTS)
    parts = [_demoted(table.read_text(encoding="utf-8"))]
    if (results / "speedup.png").is_file():
        parts.append("![Speedup of tnbackpack over BackPACK](benchmarks/speedup.png)")
    if (results / "results.csv").is_file():
        parts.append("All numbers: [results.csv](benchmarks/results.csv).")
    return markdown.replace(MARKER, "\n\n".join(parts))


def on_page_content(html, page, config, files):
    """Show ``:class:`~a.b.C``` as ``C`` and ``:mod:`a.b``` as ``a.b``."""
    return ROLE.sub(
        lambda m: f"<code>{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}</code>", html
    )
