"""The benchmark loop: check, time and measure every (case, extension) pair."""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import inspect
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from .cases import CASES, Case
from .check import check_backpack
from .extensions import ExtensionPair, extension_pairs
from .floor import has_convolutions, without_conv_parameters
from .memory import measure_in_subprocess, variant_key
from .report import Row, plot_speedups, summary_lines, write_csv, write_markdown
from .timing import time_interleaved
from .workload import Workload


@dataclass(frozen=True)
class Settings:
    """Everything a run depends on (see ``python -m tnbackpack.benchmark -h``)."""

    cases: Tuple[str, ...]
    extensions: Tuple[str, ...]
    batch: int = 32
    threads: int = 1
    repeats: int = 5
    warmup: int = 1
    max_seconds: float = 6.0
    min_seconds: float = 2.0
    memory: bool = True
    floor: bool = True
    include_slow: bool = False
    check_batch: int = 2
    max_result_gb: float = 2.0
    output: Path = Path("docs/benchmarks")


def skip_reason(
    case: Case, pair: ExtensionPair, workload: Workload, settings: Settings
) -> Optional[str]:
    """Why ``pair`` is not measured on ``case`` (``None``: it is)."""
    if pair.name in case.slow and not settings.include_slow:
        return case.slow[pair.name]
    if pair.name == "SqrtGGNExact":
        # [classes, N, *param] per parameter, in each implementation.
        params = sum(p.numel() for p in workload.trainable().values())
        gigabytes = case.num_classes * settings.batch * params * 4 / 2**30
        if gigabytes > settings.max_result_gb:
            return (
                f"result alone is {gigabytes:.1f} GB (classes x batch x params); "
                f"raise --max-result-gb to include"
            )
    return None


def _measure_pair(
    workload: Workload, pair: ExtensionPair, settings: Settings
) -> Tuple[Row, bool]:
    """Check BackPACK, then time plain / tnbackpack / BackPACK / floor interleaved.

    The floor is tnbackpack's step without the conv parameters' work (see
    :mod:`.floor`).

    Returns the row (without memory) and whether it was timed.
    """
    case = workload.case
    check = check_backpack(case, pair, settings.check_batch)
    row = Row(case.name, case.kind, pair.name, check.status())
    row.backpack_rel_err = check.relative_error
    if check.tnbackpack_error is not None:
        return row, False
    tn_extension = pair.tnbackpack()
    variants: Dict[str, Callable[[], None]] = {
        "plain": lambda: workload.step(None),
        "tnbackpack": lambda: workload.step(tn_extension),
    }
    if check.backpack_error is None:
        bp_extension = pair.backpack()
        variants["backpack"] = lambda: workload.step(bp_extension)
    if settings.floor and has_convolutions(workload.model):
        floor_extension = without_conv_parameters(pair.tnbackpack())
        variants["floor"] = lambda: workload.step(floor_extension)
    timings = time_interleaved(
        variants,
        cleanup=workload.clear,
        repeats=settings.repeats,
        warmup=settings.warmup,
        max_seconds=settings.max_seconds,
        min_seconds=settings.min_seconds,
    )
    row.plain_ms = timings.median_ms("plain")
    row.tnbackpack_ms = timings.median_ms("tnbackpack")
    row.backpack_ms = timings.median_ms("backpack")
    row.floor_ms = timings.median_ms("floor")
    first = timings.first_seconds.get("tnbackpack")
    row.tnbackpack_first_ms = None if first is None else 1e3 * first
    row.repeats = len(timings.seconds["tnbackpack"])
    if "tnbackpack" in timings.errors:
        row.status = f"tnbackpack fails: {timings.errors['tnbackpack']}"
    elif "backpack" in timings.errors:
        row.status = f"fails: {timings.errors['backpack']}"
    return row, True


def clear_engine_caches() -> None:
    """Empty the engine's ``lru_cache``s (index patterns, plans) between cases.

    Each case warms up before it is timed, so this changes no figure; it keeps
    the patterns of earlier cases (some are large) from piling up in memory.
    """
    from .. import tn

    for module in vars(tn).values():
        for function in vars(module).values() if inspect.ismodule(module) else ():
            if callable(getattr(function, "cache_clear", None)):
                function.cache_clear()
    gc.collect()


def _add_memory(rows: List[Row], case: Case, settings: Settings) -> None:
    """Fill the memory columns of ``rows`` (one case) from a fresh subprocess."""
    names = [row.extension for row in rows]
    memory = measure_in_subprocess(case.name, settings.batch, names, settings.threads)
    for row in rows:
        row.plain_mb = memory["plain"]
        row.tnbackpack_mb = memory[variant_key(row.extension, "tnbackpack")]
        row.tnbackpack_first_mb = memory[variant_key(row.extension, "tnbackpack|cold")]
        if not row.status.startswith("fails"):
            row.backpack_mb = memory[variant_key(row.extension, "backpack")]


def source_state() -> str:
    """Git commit and newest modification time of tnbackpack's sources.

    The engine changes often; this says which version the figures belong to.
    """
    package = Path(__file__).resolve().parents[1]
    newest = max(path.stat().st_mtime for path in package.rglob("*.py"))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=package,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    stamp = datetime.datetime.fromtimestamp(newest).strftime("%Y-%m-%d %H:%M")
    return f"tnbackpack at git {commit}, newest source file modified {stamp}"


def environment() -> str:
    """Versions and machine, for the report."""
    return (
        f"torch {torch.__version__}, "
        f"backpack-for-pytorch {importlib.metadata.version('backpack-for-pytorch')}, "
        f"Python {platform.python_version()}, "
        f"{platform.processor() or platform.machine()}"
    )


def preamble(settings: Settings, notes: List[str], started: str) -> str:
    """The markdown report's header: command, settings, cases.

    ``started`` says when the run started and which sources it imported.
    """
    lines = [
        "# tnbackpack vs BackPACK: time and peak memory",
        "",
        f"Command: `{' '.join(['python -m tnbackpack.benchmark', *sys.argv[1:]])}`",
        "",
        f"Environment: {environment()}; {started}; {settings.threads} thread(s); "
        f"batch size {settings.batch}; median over at least {settings.repeats} "
        "interleaved rounds, "
        f"more (up to {5 * settings.repeats}) until the rounds took "
        f"{settings.min_seconds:.0f} s "
        f"(plain, tnbackpack, BackPACK, floor round-robin, order rotated; "
        f"{settings.warmup} "
        f"warm-up round(s); a pair stops early, after at least 3 rounds, once its "
        f"rounds took {settings.max_seconds:.0f} s). Times are forward + backward. "
        "Peak MB: extra memory allocated during the backward (torch.profiler, fresh "
        "process per case; see `tnbackpack/benchmark/memory.py`). BackPACK status: "
        "its result compared with tnbackpack's in float64 at batch size "
        f"{settings.check_batch} (`wrong` above rel. err 1e-6; float32 and 1e-4 where "
        "BackPACK cannot run the model in float64; KFAC(expand/reduce) "
        "rows are compared through tnbackpack's KFAC(backpack), the same quantity as "
        "BackPACK's). Speedup = BackPACK ms / tnbackpack ms. Floor: the same step "
        "with the conv rules only backpropagating (no quantity for conv parameters), "
        "i.e. the part of the step tnbackpack leaves to PyTorch and BackPACK by "
        "design; bound = BackPACK ms / max(plain ms, floor ms) is the speedup the "
        "row would reach if the conv parameters' quantities cost nothing (see "
        "`tnbackpack/benchmark/floor.py`).",
        "",
        "| case | kind | model | input | classes |",
        "|---|---|---|---|---|",
    ]
    for name in settings.cases:
        case = CASES[name]
        shape = "×".join(map(str, case.input_shape))
        cells = [name, case.kind, case.description, shape, str(case.num_classes)]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", *[f"Note: {note}" for note in notes]]
    return "\n".join(lines)


def run(settings: Settings, log: Optional[Callable[[str], None]] = None) -> List[Row]:
    """Measure every pair, write CSV/markdown/plot under ``settings.output``."""
    torch.set_num_threads(settings.threads)
    started = f"started {datetime.datetime.now():%Y-%m-%d %H:%M} with {source_state()}"
    log = log or tqdm.write
    pairs, notes = extension_pairs(settings.extensions)
    for note in notes:
        log(f"note: {note}")
    settings.output.mkdir(parents=True, exist_ok=True)
    rows: List[Row] = []
    total = len(settings.cases) * len(pairs)
    progress = tqdm(total=total, unit="pair", file=sys.stderr)
    for name in settings.cases:
        case = CASES[name]
        workload = Workload(case, settings.batch)
        case_rows, timed = [], []
        for pair in pairs:
            progress.set_postfix_str(f"{name} {pair.name}")
            reason = skip_reason(case, pair, workload, settings)
            if reason is not None:
                case_rows.append(Row(name, case.kind, pair.name, f"skipped: {reason}"))
            else:
                row, was_timed = _measure_pair(workload, pair, settings)
                case_rows.append(row)
                if was_timed:
                    timed.append(row)
            progress.update()
        del workload
        clear_engine_caches()
        if settings.memory and timed:
            progress.set_postfix_str(f"{name} memory")
            _add_memory(timed, case, settings)
        rows += case_rows
        write_csv(rows, settings.output / "results.csv")  # partial results survive
    progress.close()
    write_markdown(
        rows, settings.output / "table.md", preamble(settings, notes, started)
    )
    if any(row.speedup is not None for row in rows):
        plot_speedups(rows, settings.output / "speedup.png")
    for line in summary_lines(rows):
        log(line)
    return rows
