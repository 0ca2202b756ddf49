"""Small helpers shared by the benchmark modules: statistics, formatting, tables."""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


def percentile(samples: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100)."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def fmt_seconds(seconds: float) -> str:
    """A duration in the unit that reads best: µs, ms or s."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None or math.isnan(ratio):
        return "n/a"
    if math.isinf(ratio):
        return "inf (no overhead)"
    return f"{ratio:.2f}x" if ratio < 100 else f"{ratio:.0f}x"


def progress(message: str) -> None:
    """A progress line on stderr, so the tables on stdout stay clean."""
    print(f"  ... {message}", file=sys.stderr, flush=True)


def last_lines(text: str, count: int = 5) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-count:]) if lines else "(no output)"


@dataclass
class Row:
    """One line of a result table; ``met`` is None where no target applies."""

    cells: tuple[str, ...]
    met: bool | None = None


def table(headers: Sequence[str], rows: Sequence[Row]) -> str:
    """A plain-text table with a trailing verdict column when any row has a target.

    A row with fewer cells than there are headers (such as a failure message)
    keeps its first cell in the first column and lets the rest run on unaligned.
    """
    with_verdict = any(row.met is not None for row in rows)
    head = tuple(headers) + (("met",) if with_verdict else ())
    full = [row.cells + ((_verdict(row.met),) if with_verdict else ()) for row in rows]
    aligned = [line for line, row in zip(full, rows) if len(row.cells) >= len(headers)]
    widths = [max(len(line[i]) for line in [head, *aligned]) for i in range(len(head))]
    widths[0] = max([widths[0], *(len(row.cells[0]) for row in rows)])

    def fmt(line: Sequence[str], row: Row | None = None) -> str:
        if row is not None and len(row.cells) < len(headers):
            return "  ".join([row.cells[0].ljust(widths[0]), *row.cells[1:]]).rstrip()
        return "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([fmt(head), rule, *(fmt(line, row) for line, row in zip(full, rows))])


def _verdict(met: bool | None) -> str:
    return "" if met is None else ("yes" if met else "NO")
