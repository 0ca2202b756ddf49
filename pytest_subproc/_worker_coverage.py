"""Coverage in the worker (runs there, and in its template): measure as the pytest process does.

Its peer in the pytest process is ``_coverage``, which puts in the
template's environment how that process measures: coverage.py's
configuration, the directory it started in, and the name the workers' data
files start with. The template starts measuring before it imports or
collects anything. A worker forked from it goes on measuring, with what the
template measured so far, and coverage.py gives it a data file of its own
(named with the worker's pid) the first time it writes, since it sees the
pid change.

A worker writes what it measured after each request, before it replies:
pytest kills a worker at the end of its scope, after a crash and after a
timeout, and a kill then finds everything written but the request that was
running. It writes nothing on its way out: by the time it sees its request
pipe close, pytest has asked for the kill, and a write cut short by it would
spoil the whole file.

coverage.py is imported only when pytest measures: this module costs nothing
otherwise.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import warnings
from contextlib import AbstractContextManager
from typing import Any, Optional

# The environment variable by which pytest hands the template its measuring.
ENV = "PYTEST_SUBPROC_COVERAGE"
# What pytest-cov's --cov-context=test calls each phase.
_PHASES = {"setup": "setup", "call": "run", "teardown": "teardown"}
_NOTHING = contextlib.nullcontext()

# The coverage.Coverage this process measures with, once started.
COVERAGE: Optional[Any] = None


def start(text: str) -> None:
    """Measure from now on as pytest does; ``text`` is what ``_coverage`` put in ENV."""
    global COVERAGE
    spec = json.loads(text)
    coverage = importlib.import_module("coverage")  # not a dependency: no types to check
    cov = coverage.Coverage(data_suffix=True, config_file=False)
    # The configuration pytest's process measures with, as coverage.py itself
    # hands it to a subprocess (CoverageConfig.deserialize).
    cov.config.__dict__.update(spec["config"])
    here = os.getcwd()
    # Relative source directories and include and omit patterns are read
    # against the directory pytest's measuring started in.
    os.chdir(spec["cwd"])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pytest's process has given them
            cov.start()
    finally:
        os.chdir(here)
    COVERAGE = cov


def phase(item: Any, when: str) -> AbstractContextManager[None]:
    """Measure one phase of a test as pytest-cov would in pytest's process."""
    # Contexts by test and no_cover are pytest-cov's: its --cov was given to
    # pytest's process if it is in this worker's options.
    if COVERAGE is None or not getattr(item.config.option, "cov_source", None):
        return _NOTHING
    return _phase(COVERAGE, item, when)


@contextlib.contextmanager
def _phase(cov: Any, item: Any, when: str) -> Any:
    if getattr(item.config.option, "cov_context", None) == "test":
        cov.switch_context(f"{item.nodeid}|{_PHASES[when]}")
    # pytest-cov's no_cover marker and fixture leave the call unmeasured.
    paused = when == "call" and bool(
        item.get_closest_marker("no_cover") or "no_cover" in getattr(item, "fixturenames", ())
    )
    if paused:
        cov.stop()
    try:
        yield
    finally:
        if paused:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cov.start()


def flush() -> None:
    """Write what was measured since the last call to this worker's data file."""
    if COVERAGE is None:
        return
    try:
        # Just the new lines: save() would also list every unexecuted source
        # file each time, which pytest's process does once for the run.
        collector = getattr(COVERAGE, "_collector", None)
        if collector is not None and hasattr(collector, "flush_data"):
            collector.flush_data()
        else:  # a coverage.py without them: slower, but it works
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                COVERAGE.save()
    except Exception as exc:  # seen with the test's output, not as its failure
        print(
            f"pytest_subproc: the worker could not write its coverage data: "
            f"{type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
