"""Benchmark rows and their outputs: CSV, markdown table, speedup plot, summary."""

from __future__ import annotations

import csv
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

#: Single layers on which the memory target "<= 1/3 of BackPACK's" applies.
THREE_BY_THREE_CASES = ("resnet18_3x3",)
#: Extensions with that memory target.
LOW_MEMORY_EXTENSIONS = ("KFAC(reduce)", "BatchL2Grad", "DiagGGNExact")


@dataclass
class Row:
    """One (case, extension) result. Times in ms, memory in MB; ``None``: absent.

    ``*_first_*``: tnbackpack's first backward (warm-up), which also builds the
    engine's caches; the other figures are the steady state. ``floor_ms``:
    the step without the conv parameters' quantities (:mod:`.floor`).

    ``status`` describes BackPACK's result (``ok``, ``wrong (...)``,
    ``fails: ...``) or why the row was not measured (``skipped: ...``).
    """

    case: str
    kind: str
    extension: str
    status: str
    plain_ms: Optional[float] = None
    tnbackpack_ms: Optional[float] = None
    backpack_ms: Optional[float] = None
    tnbackpack_first_ms: Optional[float] = None
    plain_mb: Union[float, str, None] = None
    tnbackpack_mb: Union[float, str, None] = None
    backpack_mb: Union[float, str, None] = None
    tnbackpack_first_mb: Union[float, str, None] = None
    backpack_rel_err: Optional[float] = None
    repeats: int = 0
    floor_ms: Optional[float] = None

    @property
    def speedup(self) -> Optional[float]:
        """BackPACK time / tnbackpack time."""
        return _ratio(self.backpack_ms, self.tnbackpack_ms)

    @property
    def speedup_bound(self) -> Optional[float]:
        """BackPACK time / max(plain, floor): the speedup with free conv quantities."""
        if not isinstance(self.floor_ms, float) or not isinstance(self.plain_ms, float):
            return None
        return _ratio(self.backpack_ms, max(self.plain_ms, self.floor_ms))

    @property
    def ratio_to_plain(self) -> Optional[float]:
        """Time of tnbackpack / time of the plain backward."""
        return _ratio(self.tnbackpack_ms, self.plain_ms)

    @property
    def memory_ratio(self) -> Optional[float]:
        """Peak memory of tnbackpack / peak memory of BackPACK."""
        return _ratio(self.tnbackpack_mb, self.backpack_mb)

    @property
    def extension_memory_ratio(self) -> Optional[float]:
        """Like :attr:`memory_ratio`, each peak minus the plain backward's."""
        peaks = (self.plain_mb, self.tnbackpack_mb, self.backpack_mb)
        if not all(isinstance(peak, float) for peak in peaks):
            return None
        plain, tnbackpack, backpack = peaks
        return _ratio(tnbackpack - plain, backpack - plain)

    @property
    def backpack_works(self) -> bool:
        """BackPACK ran, was right, and both were timed."""
        return self.status.startswith("ok") and self.speedup is not None


def _ratio(numerator, denominator) -> Optional[float]:
    if not isinstance(numerator, float) or not isinstance(denominator, float):
        return None
    if denominator <= 0.0:
        return None
    return numerator / denominator


def geometric_mean(values: Sequence[float]) -> float:
    """Geometric mean of positive numbers (``nan`` for none)."""
    if not values:
        return float("nan")
    return math.exp(sum(math.log(v) for v in values) / len(values))


# ------------------------------------------------------------------------ CSV
_DERIVED = (
    "speedup",
    "speedup_bound",
    "ratio_to_plain",
    "memory_ratio",
    "extension_memory_ratio",
)


def read_csv(path: Path) -> List[Row]:
    """Rows back from :func:`write_csv`'s file (to redo the table or plot)."""
    fields = {f.name: f for f in dataclasses.fields(Row)}
    rows = []
    with open(path, newline="") as handle:
        for record in csv.DictReader(handle):
            values = {}
            for name in fields:
                text = record.get(name, "")  # files from before a column existed
                if name in ("case", "kind", "extension", "status"):
                    values[name] = text
                elif name == "repeats":
                    values[name] = int(text)
                elif text == "":
                    values[name] = None
                else:
                    try:
                        values[name] = float(text)
                    except ValueError:  # an error text of the memory subprocess
                        values[name] = text
            rows.append(Row(**values))
    return rows


def write_csv(rows: Iterable[Row], path: Path) -> None:
    """All fields of every row, plus the derived ratios."""
    names = [f.name for f in dataclasses.fields(Row)] + list(_DERIVED)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        for row in rows:
            record = dataclasses.asdict(row)
            record.update({name: getattr(row, name) for name in _DERIVED})
            writer.writerow(record)


# ------------------------------------------------------------------- markdown
def _number(value, digits: int = 1, suffix: str = "") -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    if isinstance(value, str):  # an error text from the memory subprocess
        return value.split(":")[0]
    return "—"


def markdown_table(rows: Iterable[Row]) -> str:
    """The results table: one line per (case, extension)."""
    header = (
        "| case | extension | plain ms | tnbackpack ms | BackPACK ms | floor ms "
        "| speedup vs BackPACK | bound | tnbackpack / plain | plain peak MB "
        "| tnbackpack peak MB | BackPACK peak MB | BackPACK status |"
    )
    lines = [header, "|" + "---|" * 13]
    for row in rows:
        cells = [
            row.case,
            row.extension,
            _number(row.plain_ms),
            _number(row.tnbackpack_ms),
            _number(row.backpack_ms),
            _number(row.floor_ms),
            _number(row.speedup, 2, "×"),
            _number(row.speedup_bound, 2, "×"),
            _number(row.ratio_to_plain, 2, "×"),
            _number(row.plain_mb),
            _number(row.tnbackpack_mb),
            _number(row.backpack_mb),
            row.status.replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(rows: List[Row], path: Path, preamble: str) -> None:
    """Preamble (settings), summary and table."""
    summary = "\n".join(f"- {line}" for line in summary_lines(rows))
    table = markdown_table(rows)
    path.write_text(f"{preamble}\n\n## Summary\n\n{summary}\n\n## Results\n\n{table}\n")


# ---------------------------------------------------------------------- plot
def plot_speedups(rows: List[Row], path: Path) -> None:
    """Speedup vs BackPACK per case (x) and extension (marker), log scale.

    Rows where BackPACK is wrong are drawn hollow; failed ones are absent.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(row.case for row in rows))
    extensions = list(dict.fromkeys(row.extension for row in rows))
    markers = "osD^v<>phX*P8d"
    colors = plt.get_cmap("tab20").colors
    figure, axes = plt.subplots(figsize=(max(8.0, 1.0 * len(cases) + 3), 5.5))
    for index, extension in enumerate(extensions):
        offset = (index - (len(extensions) - 1) / 2) * 0.6 / max(len(extensions), 1)
        for filled in (True, False):
            points = [
                (cases.index(r.case) + offset, r.speedup)
                for r in rows
                if r.extension == extension
                and r.speedup is not None
                and r.status.startswith("ok") == filled
            ]
            if not points:
                continue
            color = colors[index % len(colors)]
            axes.scatter(
                *zip(*points),
                marker=markers[index % len(markers)],
                color=color if filled else "none",
                edgecolors=color,
                label=extension if filled else None,
                s=36,
            )
    bounds = [
        (cases.index(r.case), r.speedup_bound)
        for r in rows
        if r.speedup_bound is not None and r.speedup is not None
    ]
    if bounds:
        axes.scatter(
            *zip(*bounds),
            marker="_",
            color="gray",
            s=120,
            linewidths=0.8,
            label="bound (conv parameters' quantities free)",
        )
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_yscale("log")
    axes.set_xticks(range(len(cases)))
    axes.set_xticklabels(cases, rotation=30, ha="right")
    axes.set_ylabel("speedup vs BackPACK (BackPACK time / tnbackpack time)")
    axes.set_title("tnbackpack vs BackPACK 1.7.1 (hollow: BackPACK's result is wrong)")
    axes.grid(axis="y", which="both", alpha=0.3)
    axes.legend(fontsize=7, ncol=1, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ------------------------------------------------------------------- summary
def _where(row: Row) -> str:
    return f"{row.case} / {row.extension}"


def _listing(items: Iterable[str]) -> str:
    items = list(items)
    return ": " + ", ".join(items) if items else ""


def summary_lines(rows: List[Row]) -> List[str]:
    """Speedup, overhead and memory figures over the rows."""
    lines = []
    works = [r for r in rows if r.backpack_works]
    if works:
        slowest = min(works, key=lambda r: r.speedup)
        below = [r for r in works if r.speedup < 1.0]
        lines.append(
            f"speedup vs BackPACK, geometric mean over {len(works)} (case, extension) "
            f"rows where BackPACK works: "
            f"{geometric_mean([r.speedup for r in works]):.2f}×; "
            f"minimum {slowest.speedup:.2f}× ({_where(slowest)}); "
            f"{len(below)} below 1.0×"
            + _listing(f"{_where(r)} {r.speedup:.2f}×" for r in below)
        )
    bounded = [r for r in works if r.speedup_bound is not None]
    if bounded:
        lines.append(_bound_line(bounded))
    wrong = [r for r in rows if r.status.startswith("wrong") and r.speedup is not None]
    if wrong:
        lines.append(
            f"rows where BackPACK runs but is wrong: {len(wrong)}, geometric-mean "
            f"speedup {geometric_mean([r.speedup for r in wrong]):.2f}×"
        )
    fails = [r for r in rows if r.status.startswith("fails")]
    if fails:
        lines.append(f"rows where BackPACK fails: {len(fails)}")
    skipped = [r for r in rows if r.status.startswith(("skipped", "tnbackpack fails"))]
    if skipped:
        lines.append(f"rows not measured: {len(skipped)} (see status)")
    overhead = [r for r in rows if r.ratio_to_plain is not None]
    if overhead:
        worst = max(overhead, key=lambda r: r.ratio_to_plain)
        lines.append(
            f"tnbackpack time / plain backward: geometric mean "
            f"{geometric_mean([r.ratio_to_plain for r in overhead]):.2f}×, "
            f"maximum {worst.ratio_to_plain:.2f}× ({_where(worst)})"
        )
    lines += _memory_lines(rows)
    return lines


def _bound_line(rows: List[Row]) -> str:
    """How far the design allows the speedup to go, and how much of it is reached."""
    bound = geometric_mean([r.speedup_bound for r in rows])
    speedup = geometric_mean([r.speedup for r in rows])
    at_floor = [r for r in rows if r.speedup >= 0.9 * r.speedup_bound]
    return (
        f"speedup bound (BackPACK / max(plain, floor): conv parameters' quantities "
        f"free, the rest as designed) over the same {len(rows)} rows: geometric mean "
        f"{bound:.2f}×; tnbackpack reaches {speedup / bound:.0%} of it; "
        f"{len(at_floor)} rows within 10% of their bound"
    )


def _memory_lines(rows: List[Row]) -> List[str]:
    measured = [r for r in rows if r.memory_ratio is not None]
    if not measured:
        return []
    worst = max(measured, key=lambda r: r.memory_ratio)
    over = [r for r in measured if r.memory_ratio > 1.0]
    lines = [
        f"peak extra memory tnbackpack / BackPACK over {len(measured)} rows: geometric "
        f"mean {geometric_mean([max(r.memory_ratio, 1e-6) for r in measured]):.2f}, "
        f"maximum {worst.memory_ratio:.2f} ({_where(worst)}); "
        f"{len(over)} rows above 1"
        + _listing(f"{_where(r)} {r.memory_ratio:.2f}" for r in over)
    ]
    targets = [
        r
        for r in measured
        if r.case in THREE_BY_THREE_CASES and r.extension in LOW_MEMORY_EXTENSIONS
    ]
    if targets:
        lines.append(
            "memory ratio on 3×3 layers (target ≤ 0.33), total extra peak / beyond "
            "the plain backward's: "
            + ", ".join(
                f"{_where(r)} {r.memory_ratio:.2f} / "
                f"{_number(r.extension_memory_ratio, 2)}"
                for r in targets
            )
        )
    return lines
