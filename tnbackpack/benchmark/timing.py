"""Interleaved wall-clock timing of several variants of the same work.

Timing variants one after another lets a change in machine load (other
processes, thermal state) fall on one of them only. Here every round runs each
variant once, round-robin, with the order rotated from round to round, and the
median over rounds is reported: a burst of load then hits all variants about
equally and an outlier round does not move the median.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional


@dataclass
class Timings:
    """Measured seconds per variant, and the error of variants that raised.

    ``first_seconds`` holds each variant's first (warm-up) run: it includes
    one-time costs such as planning contractions and building cached tensors.
    """

    seconds: Dict[str, List[float]] = field(default_factory=dict)
    errors: Dict[str, str] = field(default_factory=dict)
    first_seconds: Dict[str, float] = field(default_factory=dict)

    def median_ms(self, name: str) -> Optional[float]:
        """Median in milliseconds, ``None`` if the variant failed or never ran."""
        values = self.seconds.get(name, [])
        return 1e3 * statistics.median(values) if values else None


def describe_error(error: BaseException, limit: int = 80) -> str:
    """``"TypeName: first line of the message"``, shortened to ``limit`` characters."""
    message = str(error).strip().splitlines()
    text = type(error).__name__ + (f": {message[0]}" if message else "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def time_interleaved(
    variants: Dict[str, Callable[[], None]],
    cleanup: Callable[[], None],
    repeats: int,
    warmup: int = 1,
    max_seconds: float = float("inf"),
    min_repeats: int = 3,
    min_seconds: float = 0.0,
    max_repeats: Optional[int] = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Timings:
    """Median-ready timings of ``variants``, run round-robin.

    Args:
        variants: Name -> callable doing the work once (forward + backward).
        cleanup: Called after every run, outside the timed region (frees the
            previous run's results so they do not pile up).
        repeats: Measured rounds.
        warmup: Unmeasured rounds first (plan caches, allocator, first-call
            costs). A variant that raises in a warm-up round is dropped and its
            error recorded; so is one that raises later.
        max_seconds: Stop after the round that exceeds this wall time (counted
            from the first measured round), once ``min_repeats`` rounds are done.
        min_repeats: Rounds always measured despite ``max_seconds``.
        min_seconds: Go on past ``repeats`` rounds until the measured rounds
            took this long: fast variants get more rounds, and so a median
            that a page-fault burst in one round does not move (steps of a few
            ms vary by +-30% from round to round on a busy machine).
        max_repeats: Upper limit of rounds under ``min_seconds``
            (default ``5 * repeats``).
        clock: What one run is timed with: wall time (default), or e.g.
            ``time.process_time``, the process's CPU time, which other
            processes on a loaded machine do not inflate (one thread).

    Returns:
        Per-variant lists of seconds and the errors of failed variants.
    """
    timings = Timings(seconds={name: [] for name in variants})
    active = list(variants)

    def run(name: str, measure: bool) -> None:
        try:
            start = clock()
            variants[name]()
            elapsed = clock() - start
        except Exception as error:  # noqa: BLE001 - report, keep measuring the others
            timings.errors[name] = describe_error(error)
            active.remove(name)
        else:
            if measure:
                timings.seconds[name].append(elapsed)
            else:
                timings.first_seconds.setdefault(name, elapsed)
        finally:
            cleanup()

    for _ in range(warmup):
        for name in list(active):
            run(name, measure=False)
    start = time.perf_counter()
    limit = max(repeats, max_repeats if max_repeats is not None else 5 * repeats)
    for round_index in range(limit):
        shift = round_index % max(len(active), 1)
        for name in active[shift:] + active[:shift]:
            if name in active:
                run(name, measure=True)
        done, elapsed = round_index + 1, time.perf_counter() - start
        if done >= min_repeats and elapsed > max_seconds:
            break
        if done >= repeats and elapsed >= min_seconds:
            break
    return timings
