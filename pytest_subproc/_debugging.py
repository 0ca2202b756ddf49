"""pytest's side of a debugger in a worker (runs in pytest): lend the terminal, route ``--pdb``.

Its peer in the worker is ``_worker_debugging``. When a debugger starts
there, the worker pauses its request: pytest calls ``pytest_enter_pdb`` (so
pytest-timeout and ``faulthandler_timeout`` stand down, as they would for a
debugger of its own), turns its output capture off and, if its standard
input is a terminal it holds the foreground of, names it to the worker. Once
the request is over it takes back the foreground and the terminal's modes,
whatever became of the worker. With ``--pdb``, the post-mortem of a marked
test's failure runs in its worker, on the frames that failed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest

from pytest_subproc import _compat, _worker_debugging
from pytest_subproc._process import Worker
from pytest_subproc._subworker import relay_output
from pytest_subproc._wire import Kind

try:
    import termios
except ImportError:  # pragma: no cover - Windows
    termios = None  # type: ignore[assignment]


class WorkerDebugger:
    """Stands, in pytest's ``pytest_enter_pdb``/``pytest_leave_pdb`` hooks, for a worker's debugger.

    The debugger itself runs in the worker, where the same hooks get it.
    """

    def __init__(self, pid: Optional[int]) -> None:
        self.pid = pid

    def __repr__(self) -> str:
        return f"<debugger in the subprocess worker (pid {self.pid})>"


class TerminalLender:
    """Answers a worker's pause: capture off, the terminal lent, taken back after the request."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.debugger: Optional[WorkerDebugger] = None  # while a request is paused
        self._undo = contextlib.ExitStack()
        self._answer: dict[str, Any] = {}

    def pause(self, worker: Worker) -> dict[str, Any]:
        """Get ready for a debugger in ``worker``; return what it may use of ours."""
        debugger = WorkerDebugger(worker.pid)
        self.config.hook.pytest_enter_pdb(config=self.config, pdb=debugger)
        if self.debugger is None:  # the first debugger of this request
            self.debugger = debugger
            self._answer = self._lend()
        return self._answer

    def _lend(self) -> dict[str, Any]:
        capman = self.config.pluginmanager.getplugin("capturemanager")
        capturing = capman.is_capturing() if capman is not None else False
        if capman is not None:
            self._undo.enter_context(capman.global_and_fixture_disabled())
            # stdin too, as for pytest's own debugger: fd capture points it elsewhere.
            capman.suspend_global_capture(in_=True)
        self._undo.callback(_flush, self.config)
        _flush(self.config)  # what pytest wrote comes before what the debugger writes
        terminal = _lendable_terminal()
        if terminal is not None:
            self._undo.enter_context(_taken_back(terminal[1]))
        return {"terminal": terminal, "capturing": capturing}

    def resume(self) -> None:
        """Take back the terminal and resume capturing, once the request is over."""
        debugger, self.debugger = self.debugger, None
        try:
            self._undo.close()
        finally:
            if debugger is not None:
                self.config.hook.pytest_leave_pdb(config=self.config, pdb=debugger)


def _flush(config: pytest.Config) -> None:
    with contextlib.suppress(Exception):
        config.get_terminal_writer().flush()
    with contextlib.suppress(Exception):
        sys.stdout.flush()


def _lendable_terminal() -> Optional[tuple[str, int]]:
    """pytest's stdin terminal and process group, if a debugger may read it; else None.

    As for pytest's own debugger: without a terminal on stdin (CI, a pipe),
    none is lent, and the worker's debugger reads end-of-file. pytest run
    in the background cannot lend the terminal it does not hold.
    """
    if termios is None or not os.isatty(0):
        return None
    try:
        path = os.ttyname(0)
    except OSError:
        return None
    group = os.getpgrp()
    with contextlib.suppress(OSError):  # not our controlling terminal: nobody's foreground
        if os.tcgetpgrp(0) != group:
            return None
    return path, group


@contextlib.contextmanager
def _taken_back(group: int) -> Iterator[None]:
    """Give our process group the terminal's foreground and modes back on leaving."""
    modes = termios.tcgetattr(0)
    try:
        yield
    finally:
        # The worker gives them back itself; this is for one that died first.
        with contextlib.suppress(OSError, termios.error), _worker_debugging.blocked(signal.SIGTTOU):
            with contextlib.suppress(OSError):
                if os.tcgetpgrp(0) != group:
                    os.tcsetpgrp(0, group)
            if termios.tcgetattr(0) != modes:
                termios.tcsetattr(0, termios.TCSADRAIN, modes)


class PostMortem:
    """Stands in for pytest's ``--pdb`` plugin: a marked test's post-mortem runs in its worker.

    Registered under the name of pytest's own (``pdbinvoke``), which it
    calls for every other test, and for a marked one whose worker is gone
    (a crash, a timeout): that one is debugged here, on the rebuilt frames.
    """

    def __init__(self, original: Any, worker_of: Callable[[pytest.Item], Optional[Worker]]) -> None:
        self.original = original
        self.worker_of = worker_of

    def pytest_exception_interact(
        self, node: pytest.Item, call: pytest.CallInfo[Any], report: pytest.TestReport
    ) -> None:
        worker = self.worker_of(node) if isinstance(node, pytest.Item) else None
        if worker is None:
            self.original.pytest_exception_interact(node=node, call=call, report=report)
            return
        _compat.show_failure_for_pdb(node, report)
        ask: tuple[Any, ...] = (_worker_debugging.post_mortem, (node.nodeid, report.when), {})
        reply = worker.request(Kind.CALL, ask)
        relay_output(reply)
        if not reply.unwrap():  # the worker holds no such failure: one of this process's
            assert call.excinfo is not None
            _compat.post_mortem(call.excinfo)

    def pytest_internalerror(self, excinfo: pytest.ExceptionInfo[BaseException]) -> None:
        self.original.pytest_internalerror(excinfo=excinfo)


def register(config: pytest.Config, worker_of: Callable[[pytest.Item], Optional[Worker]]) -> None:
    """Route ``--pdb`` post-mortems of marked tests to their workers."""
    original = config.pluginmanager.get_plugin("pdbinvoke")
    if original is not None:
        config.pluginmanager.unregister(original)
        config.pluginmanager.register(PostMortem(original, worker_of), "pdbinvoke")
