"""The template process (runs there): imported once, forked into workers on request.

Its peer in the pytest process is ``_template``. Started as ``python -m
pytest_subproc._zygote CTRL`` where CTRL is one end of a socket pair to
pytest. It imports what a worker needs (pytest included) before it moves to
the user's folder, so nothing there can shadow those modules; then it waits.
Asked to fork, it receives the new worker's fds over the socket, forks, and
tells pytest the new pid; when a worker exits it reaps it and sends the exit
code, which pytest cannot get itself (the worker is not its child).

Only this process signals its workers, and only before it has reaped them:
until then a worker's pid and process group id cannot belong to anyone else,
even once it has exited (a zombie holds both). On Linux it is a child
subreaper, as is every worker, so a process that a test started and that
left its worker's process group or session is still found: it stays in its
worker's subtree while the worker lives, and becomes this process's child
when the worker dies, to be killed here. It forks only while it has a single
thread, and it ends every process it holds when pytest goes away.

pytest itself never forks: it only spawns this process.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any, Callable, NoReturn, Optional

from pytest_subproc import _child, _worker_coverage

# The fds of one worker, in the order they travel: requests, replies,
# lifeline, faulthandler file, receipts, stdout, stderr.
MAX_FDS = 7
# A message is one datagram of a socket pair, which Linux caps near 200 KiB.
MAX_MESSAGE = 180 * 1024
# Imported once here rather than in every worker.
_WARM = (
    "pytest",
    "_pytest.assertion.rewrite",
    "_pytest.assertion.util",
    "_pytest.capture",
    "_pytest.logging",
    "pytest_subproc._worker_items",
)
# How long the template keeps killing what it holds once pytest has gone.
SHUTDOWN = 5.0
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_monotonic = time.monotonic


class TooLarge(ValueError):
    """A message would not fit in one datagram."""


def send(sock: socket.socket, message: Any, fds: tuple[int, ...] = ()) -> None:
    """Send one message (and fds) over the control socket."""
    data = pickle.dumps(message)
    if len(data) > MAX_MESSAGE:
        raise TooLarge(f"a {len(data)}-byte message is over the {MAX_MESSAGE}-byte limit")
    socket.send_fds(sock, [data], list(fds))


def recv(sock: socket.socket) -> tuple[Any, list[int]]:
    """Receive one message and its fds; (None, []) once the other end is closed."""
    data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    return (pickle.loads(data) if data else None), fds


def _prctl() -> Optional[Callable[..., int]]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()


def become_subreaper() -> None:
    """Adopt the orphans among our descendants (Linux), so they can still be found."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def children() -> list[int]:
    """The pids of our children, exited ones included until we reap them."""
    pid = os.getpid()
    try:
        pids: list[int] = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids.extend(int(p) for p in f.read().split())
        return pids
    except OSError:
        import psutil  # no /proc: slower, but these are our children all the same

        return [p.pid for p in psutil.Process(pid).children()]


def thread_count() -> int:
    """Every thread of this process, native ones included where the system tells."""
    try:
        return len(os.listdir(f"/proc/{os.getpid()}/task"))
    except OSError:
        return threading.active_count()


def _prepare() -> None:
    """Import what every worker needs, so each fork starts with it."""
    for name in _WARM:
        importlib.import_module(name)


def _preload(message: dict[str, Any]) -> str:
    """Collect a test file here, so every worker forked for it starts with it.

    A failure is no business of the template's: the worker collects the
    file itself and reports the error where the test can show it.
    """
    from pytest_subproc import _worker_items

    try:
        _worker_items.preload(message["spec"], message["path"])
    except BaseException as exc:  # reported by the worker instead
        return f"{type(exc).__name__}: {exc}"
    return ""


def _import_warm(name: str, path: list[str]) -> str:
    """Import a module with pytest's sys.path; say why it failed, if it did."""
    ours = list(sys.path)
    sys.path[:] = path
    try:
        importlib.import_module(name)
    except BaseException as exc:  # any failure: reported with each refused fork
        return (
            f"the worker template could not import {name!r} (subprocess_preload): "
            f"{type(exc).__name__}: {exc}"
        )
    finally:
        sys.path[:] = ours
    return ""


def _configure(message: dict[str, Any]) -> str:
    """Configure pytest here as the parent did, so every worker forked after starts with it."""
    from pytest_subproc import _worker_items

    try:
        return _worker_items.configure(message["spec"])
    except BaseException as exc:  # each worker reports it to its tests
        return f"{type(exc).__name__}: {exc}"


def _exit_code(status: int) -> int:
    return os.waitstatus_to_exitcode(status)


def _exited_child() -> Optional[int]:
    """The pid of a child that has exited, left unreaped; None if none has."""
    try:
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    return None if info is None else info.si_pid


class Keeper:
    """The template's state: its control socket and the workers it has not reaped."""

    def __init__(self, ctrl: socket.socket) -> None:
        self.ctrl = ctrl
        self.workers: set[int] = set()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        # Why forking is no longer safe here (a thread was started), if it is not.
        self.unsafe = ""
        # Why no worker can be forked from here at all: a warm module failed to
        # import, or started a thread.
        self.broken = ""
        self.handlers: dict[str, Callable[[dict[str, Any], list[int]], None]] = {
            "fork": self.on_fork,
            "import": self.on_import,
            "warm": self.on_warm,
            "configure": self.on_configure,
            "kill": self.on_kill,
            "dump": self.on_dump,
        }

    def answer(self, message: Any) -> None:
        with contextlib.suppress(OSError):  # pytest is gone: the loop sees it next
            send(self.ctrl, message)

    def serve(self) -> None:
        """Serve pytest until it goes away, then end everything we hold."""
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the poll below
        self.answer(("ready", os.getpid()))
        poller = select.poll()  # select() rejects fds >= 1024
        poller.register(self.ctrl.fileno(), select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self.wake_r in ready:
                os.read(self.wake_r, 4096)
            self.reap()
            if self.ctrl.fileno() in ready and not self.receive():
                break
        self.shutdown()

    def receive(self) -> bool:
        """Handle one message from pytest; False once it has gone."""
        try:
            message, fds = recv(self.ctrl)
        except OSError:
            return False
        if message is None:
            return False
        self.handlers[message["op"]](message, fds)
        return True

    def on_import(self, message: dict[str, Any], fds: list[int]) -> None:
        if self.broken:  # no fork will follow: no test module to import for one
            self.answer(("imported", message["path"], "", ""))
            return
        error = _preload(message)
        if thread_count() > 1:
            self.unsafe = f"importing {message['path']} started a thread"
        self.answer(("imported", message["path"], error, self.unsafe))

    def on_warm(self, message: dict[str, Any], fds: list[int]) -> None:
        """Import the run's warm modules (subprocess_preload), so every worker starts with them."""
        for name in message["modules"]:
            self.broken = _import_warm(name, message["path"])
            if self.broken:
                return
            if thread_count() > 1:
                self.broken = (
                    f"importing {name!r} (subprocess_preload) started a thread, and a "
                    "process with threads cannot be forked safely"
                )
                return

    def on_configure(self, message: dict[str, Any], fds: list[int]) -> None:
        error = _configure(message)
        if thread_count() > 1:
            self.unsafe = "configuring pytest in the worker template started a thread"
        self.answer(("configured", error, self.unsafe))

    def on_fork(self, message: dict[str, Any], fds: list[int]) -> None:
        try:
            if self.broken:
                self.answer(("refused", self.broken))
                return
            if thread_count() > 1:
                # A fork copies one thread; a lock another held stays locked forever.
                self.answer(("refused", self.unsafe or "the template has started a thread"))
                return
            try:
                pid = os.fork()
            except OSError as exc:
                self.answer(("refused", f"the worker could not be forked: {exc}"))
                return
            if pid == 0:
                _become_worker(self, message, fds)
            self.workers.add(pid)
            self.answer(("forked", pid))
        finally:
            for fd in fds:
                os.close(fd)  # the worker's now; holding them would hide its death

    def on_kill(self, message: dict[str, Any], fds: list[int]) -> None:
        pid = message["pid"]
        if pid in self.workers:  # not reaped yet: that pid and its group are still ours
            _kill(pid)

    def on_dump(self, message: dict[str, Any], fds: list[int]) -> None:
        """Have a worker write its threads' stacks (pytest's wait for it was interrupted)."""
        pid = message["pid"]
        if pid in self.workers and _child.DUMP_SIGNAL is not None:  # unreaped: still ours
            with contextlib.suppress(OSError):
                os.kill(pid, _child.DUMP_SIGNAL)

    def reap(self) -> None:
        """Reap every child that has exited, report workers' exits, kill orphans."""
        while True:
            pid = _exited_child()
            if pid is None:
                break
            if pid in self.workers:
                # Exited but not reaped, so its group id is still ours: end the
                # group's stragglers before the id can be anyone else's.
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            if pid in self.workers:
                self.workers.discard(pid)
                self.answer(("exit", pid, _exit_code(status)))
        self.kill_orphans()

    def kill_orphans(self) -> None:
        """Kill every child that is not a worker: left behind by a worker that died."""
        for pid in children():
            if pid not in self.workers:
                # Our child, not reaped (only this thread reaps): the pid is ours.
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    def shutdown(self) -> None:
        """End every worker and orphan we hold, and wait until none is left."""
        deadline = _monotonic() + SHUTDOWN
        for pid in self.workers:
            _kill(pid)
        poller = select.poll()
        poller.register(self.wake_r, select.POLLIN)
        while True:
            self.reap()
            if not children() or _monotonic() > deadline:
                return
            if poller.poll(50):
                os.read(self.wake_r, 4096)


def _kill(pid: int) -> None:
    """Kill a worker and its process group (the caller holds it unreaped)."""
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(OSError):
            kill(pid, signal.SIGKILL)


def _die_with_parent(parent: int) -> None:
    """Be killed when the template dies (Linux), and be a subreaper for our own orphans."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # it died before we asked
            os._exit(70)
    become_subreaper()


def _become_worker(keeper: Keeper, message: dict[str, Any], fds: list[int]) -> None:
    """In the forked child: take the fds and serve as a worker until done, then exit."""
    code = 70  # set first: a failure to print the traceback must not read as success
    try:
        _die_with_parent(os.getppid())
        keeper.ctrl.close()
        for fd in (keeper.wake_r, keeper.wake_w):
            os.close(fd)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        *own, out, err = fds
        for target, fd in ((1, out), (2, err)):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(message["env"])
        with contextlib.suppress(OSError):
            os.chdir(message["cwd"])
        # The parent's sys.path only now: the worker's own imports are done.
        sys.path[:] = message["path"]
        _child.serve_worker(*own)
        code = 0
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()  # into the worker's stderr, which the parent reads
    finally:
        _flush_and_exit(code)  # never back into the template's loop


def main(argv: list[str]) -> None:
    """Start-up: import, move to the parent's cwd, serve."""
    # Taken now, used after the imports: nothing in the user's folder (a
    # random.py, say) may shadow what pytest and this package import.
    cwd = os.environ.pop(_child.CWD_ENV, None)
    coverage = os.environ.pop(_worker_coverage.ENV, None)
    with socket.socket(fileno=int(argv[1])) as ctrl:  # closed at exit, not left to warn
        os.set_inheritable(ctrl.fileno(), False)
        _child.own_group()
        become_subreaper()
        _prepare()
        if cwd is not None:
            with contextlib.suppress(OSError):
                os.chdir(cwd)
        if coverage is not None:  # before any warm import, conftest or test file
            _worker_coverage.start(coverage)
        Keeper(ctrl).serve()
    if _worker_coverage.COVERAGE is None:
        # Nothing is left to do, and pytest waits for this exit: tearing down
        # an interpreter that configured pytest takes tens of milliseconds,
        # and running atexit handlers that plugins registered here would run
        # them twice in the run (pytest's process runs its own). Coverage,
        # when measuring, saves its data at exit: that path stays.
        _flush_and_exit(0)


def _flush_and_exit(code: int) -> NoReturn:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    from pytest_subproc import _zygote

    _zygote.main(sys.argv)
