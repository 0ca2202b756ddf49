"""When pytest's wait for a worker is interrupted (runs in pytest): show where the worker was.

Ctrl-C, pytest-timeout's signal method or any exception raised while pytest
waits for a marked test's reply would point at the plugin's wait loop. The
wait has the worker dump its stacks before it is killed (``_process``); here
the exception's traceback is rebuilt from the dumped stack of the thread
that ran the test, so the report (or the KeyboardInterrupt summary) shows
the test's own frames. pytest-timeout's thread method ends the whole run
with ``os._exit``; before it does, the worker's stacks are written too.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any, Callable, Optional

import pytest

from pytest_subproc._process import Worker, worker_stack
from pytest_subproc._report import stack_traceback, where


def point_at_worker(item: pytest.Item, exc: BaseException) -> Optional[str]:
    """Point ``exc`` at where the worker was, if it interrupted a wait; say so for the summary."""
    found = worker_stack(exc)
    if found is None:
        return None
    pid, stack = found
    exc.__traceback__ = stack_traceback(stack, *where(item))
    what = f"interrupted by {type(exc).__name__}: worker killed (pid {pid})"
    if stack and isinstance(exc, KeyboardInterrupt):  # the run ends: no report shows it
        what += f"; where it was:\n{stack.rstrip()}"
    return what


class ThreadTimeout:
    """Plugin: pytest-timeout's thread method, writing a marked test's worker stacks first."""

    def __init__(
        self,
        isolated: Callable[[pytest.Item], bool],
        worker_of: Callable[[pytest.Item], Optional[Worker]],
    ) -> None:
        self.isolated = isolated
        self.worker_of = worker_of  # asked when the timer fires: the worker starts in setup

    @pytest.hookimpl(tryfirst=True, optionalhook=True)
    def pytest_timeout_set_timer(self, item: pytest.Item, settings: Any) -> Optional[bool]:
        """Set pytest-timeout's thread timer for a marked test, as pytest-timeout does."""
        if settings.method != "thread" or not self.isolated(item):
            return None  # pytest-timeout's own
        timer = threading.Timer(settings.timeout, self.fire, (item, settings))
        timer.name = f"pytest_timeout {item.nodeid}"

        def cancel() -> None:
            timer.cancel()
            timer.join()

        item.cancel_timeout = cancel  # type: ignore[attr-defined] # where pytest-timeout looks
        timer.start()
        return True

    def fire(self, item: pytest.Item, settings: Any) -> None:
        """Write the worker's stacks, then let pytest-timeout dump ours and end the run."""
        pytest_timeout: Any = importlib.import_module("pytest_timeout")  # present: it called us
        if settings.disable_debugger_detection or not pytest_timeout.is_debugging():
            worker = self.worker_of(item)
            stack = worker.dump_stacks() if worker is not None else ""
            if stack:
                _write_stack(item, worker, stack)
        pytest_timeout.timeout_timer(item, settings)


def _write_stack(item: pytest.Item, worker: Any, stack: str) -> None:
    capman = item.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        capman.suspend_global_capture(in_=True)  # to the terminal, not into the capture
    terminal = item.config.get_terminal_writer()
    terminal.sep("+", title=f"Timeout: stacks of the subprocess worker (pid {worker.pid})")
    terminal.write(stack)
    terminal.flush()
