"""``python -m tnbackpack.benchmark``: tnbackpack vs BackPACK, time and peak memory.

Every tnbackpack extension is timed against BackPACK's on reference layers and
networks (:mod:`.cases`), interleaved with a plain backward in one process
(:mod:`.timing`); peak extra memory is measured per case in a fresh process
(:mod:`.memory`); BackPACK's result is checked against tnbackpack's in float64
(:mod:`.check`). Outputs: CSV, markdown table and speedup plot (:mod:`.report`).
"""

from .cases import CASES, QUICK_CASES, Case
from .extensions import ALL_EXTENSIONS, QUICK_EXTENSIONS, ExtensionPair, extension_pairs
from .report import Row
from .run import Settings, run

__all__ = [
    "ALL_EXTENSIONS",
    "CASES",
    "QUICK_CASES",
    "QUICK_EXTENSIONS",
    "Case",
    "ExtensionPair",
    "Row",
    "Settings",
    "extension_pairs",
    "run",
]
