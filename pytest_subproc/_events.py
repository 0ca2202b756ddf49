"""Call the plugin's own hooks (``hookspecs``) for what became of the workers."""

from __future__ import annotations

import weakref
from typing import Callable, Optional, Union

import pytest

from pytest_subproc._dispatch import SETTINGS, Runtime, worker_fixture
from pytest_subproc._exceptions import WorkerCrashed, WorkerTimeout
from pytest_subproc._process import Worker
from pytest_subproc.hookspecs import WorkerInfo

Casualty = tuple[pytest.Item, Union[WorkerCrashed, WorkerTimeout]]

# The scope each worker serves, as its owner asked for it.
_SCOPES: weakref.WeakKeyDictionary[Worker, str] = weakref.WeakKeyDictionary()


def serves(worker: Worker, scope: str) -> None:
    """Record the scope a worker serves, for the hooks to tell."""
    _SCOPES[worker] = scope


def announce_for(item: pytest.Item, runtime: Runtime) -> None:
    """Call the hooks for what became of a marked test's worker, and for its crash."""
    worker = getattr(item, "funcargs", {}).get(worker_fixture(item.stash[SETTINGS].scope))
    if isinstance(worker, Worker):
        announce(item.config, worker, runtime.crashed)


def after_request(item: pytest.Item, runtime: Runtime, worker: Worker, error: object) -> None:
    """List a crash or timeout of a ``subworker`` request, and call the hooks."""
    crashed: list[Casualty] = []
    if isinstance(error, (WorkerCrashed, WorkerTimeout)):
        what = str(error).partition("\n")[0]
        runtime.casualties.append((item.nodeid, f"{what}, in a subworker request"))
        crashed.append((item, error))
    announce(item.config, worker, crashed)


def announce(
    config: pytest.Config, worker: Worker, casualties: Optional[list[Casualty]] = None
) -> None:
    """Call the hooks for the worker's starts and ends since the last call, and for ``casualties``.

    A crash is announced before the end of the process it killed. Every hook
    is called even if one raises; the first error is raised at the end.
    """
    events, worker.events[:] = list(worker.events), []
    pending = list(casualties or ())
    if casualties:
        casualties.clear()
    hook, failed = config.hook, _Failures()
    scope = _SCOPES.get(worker, "")
    for what, pid, code in events:
        if what == "started":
            failed.call(hook.pytest_subprocess_worker_started, worker=WorkerInfo(pid, scope))
            continue
        for item, error in [c for c in pending if c[1].pid == pid]:
            pending.remove((item, error))
            failed.call(hook.pytest_subprocess_worker_crashed, item=item, error=error)
        failed.call(hook.pytest_subprocess_worker_closed, worker=WorkerInfo(pid, scope, code))
    for item, error in pending:
        failed.call(hook.pytest_subprocess_worker_crashed, item=item, error=error)
    failed.reraise()


class _Failures:
    """Call each hook even after one raised; then raise the first error."""

    def __init__(self) -> None:
        self.first: Optional[Exception] = None

    def call(self, hook: Callable[..., object], **kwargs: object) -> None:
        try:
            hook(**kwargs)
        except Exception as exc:
            self.first = self.first or exc

    def reraise(self) -> None:
        if self.first is not None:
            raise self.first
