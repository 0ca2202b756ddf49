"""Benchmarks of pytest_subproc, run on demand (never part of the test suite).

    python bench/run.py            # every part (contention alone: 15-20 minutes)
    python bench/run.py --quick    # fewer calls, a smaller payload, 200 tests
    python bench/run.py --only worker
    python bench/run.py --only contention --load busy,xdist --rounds 3

``worker`` times the worker layer against raw pipes and spawns; ``suite``
times a suite of trivial tests, and one whose tests use fixtures of each
scope, in-process, under the marker's scopes and under pytest-forked;
``contention`` runs those suites on a quiet machine, beside one busy loop per
core and under pytest-xdist, against in-process and pytest-forked runs under
the same load. Targets are printed next to the figures; a missed target or a
failing configuration is reported, and the exit code stays 0.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, NoReturn

PARTS = ("worker", "suite", "contention")


def _parts() -> dict[str, Callable[[argparse.Namespace], str]]:
    # Run as a script, so the repository root goes on the path for ``bench.*``.
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench import contention, suite, worker

    return {
        "worker": lambda args: worker.run(args.quick),
        "suite": lambda args: suite.run(args.quick),
        "contention": lambda args: contention.run(
            args.quick, args.load, args.suite, args.rounds, args.tests
        ),
    }


def _choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        chosen = [part.strip() for part in text.split(",") if part.strip()]
        wrong = [part for part in chosen if part not in allowed]
        if wrong or not chosen:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}")
        return chosen

    return parse


def _interrupted(signum: int, frame: object) -> NoReturn:
    # As an exception, so that every process a part started is ended on the way out.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast check with smaller counts")
    parser.add_argument("--only", choices=PARTS, action="append", help="run only this part")
    loads, suites = ("quiet", "busy", "xdist"), ("trivial", "fixtures")
    parser.add_argument(
        "--load",
        type=_choices(loads),
        default=list(loads),
        help=f"contention: the loads, comma-separated (default {','.join(loads)})",
    )
    parser.add_argument(
        "--suite",
        type=_choices(suites),
        default=list(suites),
        help=f"contention: the suites, comma-separated (default {','.join(suites)})",
    )
    parser.add_argument(
        "--rounds", type=int, help="contention: rounds (default 3, or 2 with --quick)"
    )
    parser.add_argument(
        "--tests", type=int, help="contention: tests a suite (default 1000, or 200 with --quick)"
    )
    args = parser.parse_args(argv)
    for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if signum is not None:
            signal.signal(signum, _interrupted)
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
            report = parts[name](args)
        except Exception as exc:  # a benchmark that breaks is reported, not fatal
            lines = traceback.format_exception_only(type(exc), exc)
            report = f"{name}: failed: {''.join(lines).strip()}"
            traceback.print_exc(file=sys.stderr)
        print(report)
        print(f"({name} took {time.perf_counter() - start:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
