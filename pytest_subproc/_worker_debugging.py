"""Runs in the worker: a debugger started here gets pytest's terminal, and post-mortems run here.

Its peer in the pytest process is ``_debugging``. Every debugger pytest
starts goes through ``pytestPDB._init_pdb`` (``breakpoint()``,
``pdb.set_trace()``, ``--trace``, ``--pdb``'s post-mortem); here it first
tells pytest, which stops counting the request's deadline and answers with
the terminal it may lend. The worker makes that terminal its standard
input and output, and its process group the terminal's foreground (as a
shell does for a job), until the request is over; between the debugger's
``continue`` and its next stop, output goes back to the capture, as pytest
does for a debugger of its own. ``--pdb`` keeps the last failure, so that
pytest can ask for a post-mortem on its real frames. pytest-timeout's
timers are off here: pytest's own process times the test, and when it
fires it has this process dump its stacks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any, Optional

import pytest

from pytest_subproc import _child, _compat

# The failure of the last phase that failed, while --pdb is on: ((nodeid, when), excinfo).
_KEPT: Optional[tuple[tuple[str, str], Any]] = None
# Whether pytest's process captures output, while a debugger runs here.
_PARENT_CAPTURING: Any = False
_installed = False


class _WorkerHooks:
    """A worker-side plugin: pytest-timeout times the test in pytest's process, not here."""

    @pytest.hookimpl(tryfirst=True, optionalhook=True)
    def pytest_timeout_set_timer(self, item: pytest.Item, settings: Any) -> bool:
        # Two timers would race: this one could end the test before pytest
        # asked for the stacks, or (thread method) exit the worker first.
        return True


def install(config: pytest.Config) -> None:
    """Have each debugger ask pytest for the terminal first; turn pytest-timeout off here."""
    config.pluginmanager.register(_WorkerHooks(), "pytest_subproc-worker-debugging")
    global _installed
    if not _installed:
        _installed = True
        _compat.watch_debuggers(_borrow_terminal, _step_aside, _step_back, _capturing)


def keep(config: pytest.Config, nodeid: str, when: str, excinfo: Any) -> None:
    """Keep a phase's failure for a post-mortem, if pytest runs with --pdb."""
    global _KEPT
    if config.getoption("usepdb", False):
        _KEPT = ((nodeid, when), excinfo)


def post_mortem(nodeid: str, when: str) -> bool:
    """Debug the kept failure of ``nodeid``'s phase on its own frames; False if none is kept."""
    global _KEPT
    kept, _KEPT = _KEPT, None
    if kept is None or kept[0] != (nodeid, when):
        return False
    _compat.post_mortem(kept[1])
    return True


def _capturing() -> Any:
    return _PARENT_CAPTURING


def _borrow_terminal() -> None:
    """Tell pytest a debugger starts; take its terminal for this request, if it lends one."""
    global _PARENT_CAPTURING
    if _Loan.current is not None:  # a second debugger in the same request
        _Loan.current.step_in()
    answer = _child.pause()
    if not answer or _Loan.current is not None:
        return
    _PARENT_CAPTURING = answer.get("capturing", False)
    terminal = answer.get("terminal")
    loan = _Loan.take(*terminal) if terminal else None
    _child.before_reply(lambda: _give_back(loan))


def _step_aside() -> None:
    if _Loan.current is not None and _PARENT_CAPTURING:
        _Loan.current.step_aside()


def _step_back() -> None:
    if _Loan.current is not None:
        _Loan.current.step_in()


def _give_back(loan: Optional[_Loan]) -> None:
    global _PARENT_CAPTURING
    _PARENT_CAPTURING = False
    if loan is not None:
        loan.give_back()


class _Loan:
    """pytest's terminal, as this worker's stdin, stdout and stderr while a debugger runs."""

    current: Optional[_Loan] = None

    def __init__(self, fd: int, pgrp: Optional[int]) -> None:
        self.fd = fd
        self.pgrp = pgrp  # whose foreground to give back: pytest's group (None: no job control)
        self.saved = [os.dup(std) for std in (0, 1, 2)]
        self.inside = False
        self.tstp = _ignore(getattr(signal, "SIGTSTP", None))
        self.step_in()

    @classmethod
    def take(cls, path: str, parent_pgrp: int) -> Optional[_Loan]:
        """Open the terminal and become its foreground; None if pytest is not in the foreground."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        except OSError:
            return None
        try:
            foreground: Optional[int] = os.tcgetpgrp(fd)
        except OSError:  # not our controlling terminal: no job control stops us reading it
            foreground = None
        if foreground is not None and foreground != parent_pgrp:
            os.close(fd)  # pytest runs in the background: it has no terminal to lend
            return None
        if foreground is not None:
            # A background group that reads its terminal is stopped; so is
            # one that sets the foreground, unless SIGTTOU is blocked.
            with blocked(signal.SIGTTOU):
                os.tcsetpgrp(fd, os.getpgrp())
        cls.current = cls(fd, foreground)
        return cls.current

    def step_in(self) -> None:
        """Point stdin, stdout and stderr at the terminal."""
        if not self.inside:
            self.inside = True
            self._point(self.fd, self.fd, self.fd)

    def step_aside(self) -> None:
        """Point them back at what they were (the capture), keeping the foreground.

        Ctrl-C then reaches the debugger, which breaks in, as it does in pytest.
        """
        if self.inside:
            self.inside = False
            self._point(*self.saved)

    def _point(self, *fds: int) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()  # what was written so far goes where it was meant to
        for std, fd in zip((0, 1, 2), fds):
            os.dup2(fd, std)

    def give_back(self) -> None:
        """Point stdin, stdout and stderr back where they were; give pytest its foreground."""
        _Loan.current = None
        self.step_aside()
        for saved in self.saved:
            os.close(saved)
        if self.pgrp is not None:
            with contextlib.suppress(OSError), blocked(signal.SIGTTOU):
                os.tcsetpgrp(self.fd, self.pgrp)
        os.close(self.fd)
        _restore(getattr(signal, "SIGTSTP", None), self.tstp)


@contextlib.contextmanager
def blocked(signum: int) -> Iterator[None]:
    """Block ``signum`` for a while: a background group setting the terminal gets SIGTTOU."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signum})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _ignore(signum: Optional[int]) -> Any:
    """Ignore ``signum`` (Ctrl-Z at the prompt would stop only the worker, for good)."""
    if signum is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signum, signal.SIG_IGN)


def _restore(signum: Optional[int], handler: Any) -> None:
    if signum is not None and handler is not None:
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signum, handler)
