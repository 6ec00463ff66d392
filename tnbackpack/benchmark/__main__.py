"""Command line of the benchmark: ``python -m tnbackpack.benchmark [options]``."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from .cases import CASES, QUICK_CASES
from .extensions import ALL_EXTENSIONS, QUICK_EXTENSIONS
from .run import Settings, run


def _names(text: Optional[str], known, default: Tuple[str, ...], what: str):
    if text is None:
        return default
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; choose from: {', '.join(known)}")
    return names


def parse(argv: Optional[List[str]] = None) -> Settings:
    """Settings from the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m tnbackpack.benchmark",
        description="Time and peak memory of tnbackpack's extensions vs BackPACK's.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"cases {','.join(QUICK_CASES)}, extensions {','.join(QUICK_EXTENSIONS)}, "
        "3 repeats, output docs/benchmarks/quick (other options still apply)",
    )
    parser.add_argument(
        "--clients",
        action="store_true",
        help="time laplace-torch, cockpit and vivit workflows, stock BackPACK vs "
        "tnbackpack.enable() (--batch, --threads, --repeats, --output apply; "
        "writes docs/benchmarks/clients.md)",
    )
    parser.add_argument(
        "--factorized",
        action="store_true",
        help="benchmark factorized convolutions instead (tnbackpack.benchmark."
        "factorized; its own options, see --factorized --help)",
    )
    parser.add_argument(
        "--randomized",
        action="store_true",
        help="instead: TN dropout (sampled conv backward) vs exact and masked; "
        "see python -m tnbackpack.benchmark --randomized -h",
    )
    parser.add_argument("--cases", help=f"comma list of: {','.join(CASES)}")
    parser.add_argument(
        "--extensions", help=f"comma list of: {','.join(ALL_EXTENSIONS)}"
    )
    parser.add_argument("--batch", type=int, default=32, help="batch size (32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--repeats", type=int, help="measured rounds (5, quick: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds (1)")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=6.0,
        help="stop a pair's rounds after this many seconds, at least 3 rounds (6)",
    )
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=2.0,
        help="measure more rounds (up to 5x --repeats) until they took this long (2)",
    )
    parser.add_argument(
        "--output", type=Path, help="output directory (docs/benchmarks)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip peak memory")
    parser.add_argument(
        "--no-floor",
        action="store_true",
        help="skip the floor variant (step without the conv parameters' work)",
    )
    parser.add_argument(
        "--include-slow",
        action="store_true",
        help="also run the pairs a case marks slow (All-CNN-C exact GGN family)",
    )
    parser.add_argument(
        "--check-batch",
        type=int,
        default=2,
        help="batch size of the float64 correctness check of BackPACK (2)",
    )
    parser.add_argument(
        "--max-result-gb",
        type=float,
        default=2.0,
        help="skip SqrtGGNExact where its result exceeds this size (2.0)",
    )
    parser.add_argument(
        "--conv-einsum",
        action="store_true",
        help="run the conv_einsum benchmark instead (CP/Tucker-2/TT 3x3 layers vs "
        "rebuilt kernel, stage sequence, tensorly-torch; see "
        "tnbackpack.benchmark.conv_einsum; accepts --quick, --batch, --threads, "
        "--repeats, --max-seconds, --output)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    if args.clients:
        from .clients import run_clients

        run_clients(
            args.output or Path("docs/benchmarks/clients.md"),
            size=args.batch,
            threads=args.threads,
            repeats=args.repeats or 5,
        )
        raise SystemExit(0)
    return Settings(
        cases=_names(
            args.cases, list(CASES), QUICK_CASES if quick else tuple(CASES), "cases"
        ),
        extensions=_names(
            args.extensions,
            ALL_EXTENSIONS,
            QUICK_EXTENSIONS if quick else ALL_EXTENSIONS,
            "extensions",
        ),
        batch=args.batch,
        threads=args.threads,
        repeats=args.repeats or (3 if quick else 5),
        warmup=args.warmup,
        max_seconds=args.max_seconds,
        min_seconds=args.min_seconds,
        memory=not args.no_memory,
        floor=not args.no_floor,
        include_slow=args.include_slow,
        check_batch=args.check_batch,
        max_result_gb=args.max_result_gb,
        output=args.output
        or Path("docs/benchmarks/quick" if quick else "docs/benchmarks"),
    )


def main(argv: Optional[List[str]] = None) -> None:
    """Run the benchmark, or one of the others named by a flag.

    ``--factorized``, ``--conv-einsum`` and ``--randomized`` hand the remaining
    arguments to those benchmarks.
    """
    arguments = sys.argv[1:] if argv is None else list(argv)
    for flag, module in (
        ("--factorized", "factorized"),
        ("--conv-einsum", "conv_einsum"),
        ("--randomized", "randomized"),
    ):
        if flag in arguments:
            other = importlib.import_module(f"{__package__}.{module}")
            other.main([a for a in arguments if a != flag])
            return
    run(parse(argv))


if __name__ == "__main__":
    main()
