"""The hooks pytest_subproc calls, for a conftest.py or a plugin to implement.

Each is called in the pytest process (never in a worker, never from a signal
handler), once the plugin is back in control: before a marked test's body
or a ``subworker`` request is sent to a worker that has just started, after
the request that crashed or timed out, and after a worker has ended. An exception in an
implementation is reported like any hook error; the worker is still closed
at the end of its scope.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

if TYPE_CHECKING:
    import pytest

    from pytest_subproc import WorkerCrashed, WorkerTimeout


@dataclass(frozen=True)
class WorkerInfo:
    """A worker process as the hooks see it: read-only facts, taken when the hook is called.

    ``exitcode`` is how a closed worker ended, as ``subprocess`` reports it
    (minus the signal number for a signal); ``None`` while it runs, or if
    its end could not be learned.
    """

    pid: int
    scope: str
    exitcode: Optional[int] = None


WorkerInfo.__module__ = "pytest_subproc"


def pytest_subprocess_worker_started(worker: WorkerInfo) -> None:
    """Called when a worker process has started and is ready to serve.

    ``worker.pid`` is its process id and ``worker.scope`` the scope it
    serves (``"session"``, ``"module"`` or ``"function"``). A worker that
    replaces one that crashed or timed out is a new start.
    """


def pytest_subprocess_worker_crashed(
    item: pytest.Item, error: Union[WorkerCrashed, WorkerTimeout]
) -> None:
    """Called when a worker died, or was killed after a timeout, while it served ``item``.

    ``error`` is the ``WorkerCrashed`` or ``WorkerTimeout`` that the test
    fails with: its ``pid`` and ``stack``, and ``exitcode`` and ``signal``
    for a crash, ``timeout`` for a timeout. ``item`` is the marked test whose
    body, or whose fixture values at setup, the worker was running; for a
    request made through the ``subworker`` fixture, the test that made it.
    The next request gets a fresh worker.
    """


def pytest_subprocess_worker_closed(worker: WorkerInfo) -> None:
    """Called when a worker process has ended, whatever the cause.

    ``worker.exitcode`` is how it ended, as ``subprocess`` reports it: an
    exit code, or minus a signal number (``-9`` for a worker the plugin
    killed at the end of its scope or after a timeout); ``None`` if it could
    not be learned. Every started worker is closed once.
    """
