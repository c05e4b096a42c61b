"""What a long command says while it works: one-line notes and progress bars, on stderr so that stdout holds
only results (a table, JSON, CSV)."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm import tqdm


def note(message: str) -> None:
    """A line about what is happening now; printed above any progress bar."""
    tqdm.write(message, file=sys.stderr)


def bar(iterable: Iterable, desc: str, total: int | None = None, unit: str = "batch") -> tqdm:
    """A transient bar with its total and an ETA, shown only where stderr is a terminal."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, disable=None, file=sys.stderr,
                dynamic_ncols=True)
