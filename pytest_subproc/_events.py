"""Call the plugin's own hooks (``hookspecs``) for what became of the workers."""

from __future__ import annotations

from typing import Callable, Optional, Union

import pytest

from pytest_subproc._dispatch import Runtime
from pytest_subproc._exceptions import WorkerCrashed, WorkerTimeout
from pytest_subproc._process import Worker
from pytest_subproc.hookspecs import WorkerInfo

Casualty = tuple[pytest.Item, Union[WorkerCrashed, WorkerTimeout]]


def announce_all(config: pytest.Config, runtime: Runtime) -> None:
    """Call the hooks for what became of every worker since the last call, and for crashes."""
    workers = [*runtime.live, *runtime.retired]
    runtime.retired.clear()
    announce(config, workers, runtime.crashed, runtime.scopes)


def after_request(item: pytest.Item, runtime: Runtime, worker: Worker, error: object) -> None:
    """List a crash or timeout of a ``subworker`` request, and call the hooks."""
    crashed: list[Casualty] = []
    if isinstance(error, (WorkerCrashed, WorkerTimeout)):
        what = str(error).partition("\n")[0]
        runtime.casualties.append((item.nodeid, f"{what}, in a subworker request"))
        crashed.append((item, error))
    announce(item.config, [worker], crashed, runtime.scopes)


def announce(
    config: pytest.Config,
    workers: list[Worker],
    casualties: list[Casualty],
    scopes: dict[Worker, str],
) -> None:
    """Call the hooks for the workers' starts and ends since the last call, and for ``casualties``.

    A crash is announced before the end of the process it killed. Every hook
    is called even if one raises; the first error is raised at the end.
    """
    pending = list(casualties)
    casualties.clear()
    hook, failed = config.hook, _Failures()
    for worker in workers:
        events, worker.events[:] = list(worker.events), []
        scope = scopes.get(worker, "")
        for what, pid, code in events:
            if what == "started":
                info = WorkerInfo(pid, scope)
                failed.call(hook.pytest_subprocess_worker_started, worker=info)
                continue
            for item, error in [c for c in pending if c[1].pid == pid]:
                pending.remove((item, error))
                failed.call(hook.pytest_subprocess_worker_crashed, item=item, error=error)
            info = WorkerInfo(pid, scope, code)
            failed.call(hook.pytest_subprocess_worker_closed, worker=info)
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
