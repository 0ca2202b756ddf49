"""Benchmarks of pytest_subproc, run on demand (never part of the test suite).

    python bench/run.py            # the full run (several minutes)
    python bench/run.py --quick    # fewer calls, a smaller payload, 200 tests
    python bench/run.py --only worker

``worker`` times the worker layer against raw pipes and spawns; ``suite``
times a suite of trivial tests, and one whose tests use fixtures of each
scope, in-process, under the marker's scopes and under pytest-forked.
Targets are printed next to the figures; a missed target or a failing
configuration is reported, and the exit code stays 0.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

PARTS = ("worker", "suite")


def _parts() -> dict[str, Callable[[bool], str]]:
    # Run as a script, so the repository root goes on the path for ``bench.*``.
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench import suite, worker

    return {"worker": worker.run, "suite": suite.run}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast check with smaller counts")
    parser.add_argument("--only", choices=PARTS, action="append", help="run only this part")
    args = parser.parse_args(argv)
    print(
        f"pytest_subproc benchmarks{' (quick)' if args.quick else ''}: "
        f"Python {platform.python_version()}, {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs"
    )
    parts = _parts()
    for name in args.only or PARTS:
        print(flush=True)
        start = time.perf_counter()
        try:
            report = parts[name](args.quick)
        except Exception as exc:  # a benchmark that breaks is reported, not fatal
            lines = traceback.format_exception_only(type(exc), exc)
            report = f"{name}: failed: {''.join(lines).strip()}"
            traceback.print_exc(file=sys.stderr)
        print(report)
        print(f"({name} took {time.perf_counter() - start:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
