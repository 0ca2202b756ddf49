"""The run's account of its workers: short report lines, and one summary even under xdist."""

from __future__ import annotations

from typing import Any, Optional

import pytest

from pytest_subproc._dispatch import Runtime
from pytest_subproc._exceptions import WorkerCrashed, WorkerStartError, WorkerTimeout

# The key of this plugin's part of an xdist worker's ``workeroutput``.
OUTPUT_KEY = "pytest_subproc"


def what_happened(error: BaseException) -> str:
    """Say in a few words what became of the worker: ``signal SIGSEGV (pid 123)``."""
    first = str(error).partition("\n")[0]
    for prefix in ("worker crashed: ", "worker "):
        if first.startswith(prefix):
            return first[len(prefix) :]
    return first


def shorten_report(report: pytest.TestReport, error: Optional[BaseException]) -> None:
    """Have the short summary line name the exception and what happened, not the module."""
    if not isinstance(error, (WorkerCrashed, WorkerTimeout, WorkerStartError)):
        return
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None and hasattr(crash, "message"):
        crash.message = f"{type(error).__name__}: {what_happened(error)}"


def send(config: pytest.Config, runtime: Runtime) -> None:
    """On an xdist worker, hand this process's account to the controller."""
    output: Optional[dict[str, Any]] = getattr(config, "workeroutput", None)
    if output is not None:
        output[OUTPUT_KEY] = {
            "casualties": [list(c) for c in runtime.casualties],
            "workers": runtime.workers,
            "restarts": runtime.restarts,
        }


def receive(runtime: Runtime, node: Any) -> None:
    """On the xdist controller, add an xdist worker's account to the run's."""
    account = getattr(node, "workeroutput", {}).get(OUTPUT_KEY)
    if not account:
        return
    runtime.casualties.extend((str(n), str(w)) for n, w in account["casualties"])
    runtime.workers += int(account["workers"])
    runtime.restarts += int(account["restarts"])


def write(terminalreporter: pytest.TerminalReporter, runtime: Runtime) -> None:
    """Write the "subprocess workers" section: every casualty, then the counts."""
    if hasattr(terminalreporter.config, "workeroutput"):
        return  # an xdist worker: the controller writes the section for the run
    if not (runtime.workers or runtime.casualties):
        return
    terminalreporter.write_sep("-", "subprocess workers")
    for nodeid, what in runtime.casualties:
        terminalreporter.write_line(f"{nodeid}: {what}")
    terminalreporter.write_line(
        f"workers started: {runtime.workers}, "
        f"restarted after a crash or timeout: {runtime.restarts}"
    )
