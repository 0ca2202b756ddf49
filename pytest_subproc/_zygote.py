"""The template process: imported once, forked into a fresh worker on request.

Started as ``python -m pytest_subproc._zygote CTRL`` where CTRL is one end of
a socket pair to the parent. It imports what a worker needs (pytest
included), then waits. Asked to fork, it receives the new worker's fds over
the socket, forks, and tells the parent the new pid; when a worker exits it
reaps it and sends the exit code, which the parent cannot get itself (the
worker is not its child). It stays single-threaded, so forking it is safe,
and it exits when the parent's end of the socket closes.

The parent itself never forks: it only spawns this process.
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
import traceback
from typing import Any

from pytest_subproc import _child

# The fds of one worker, in the order they travel: requests, replies,
# lifeline, faulthandler file, then stdout and stderr when captured.
MAX_FDS = 6
# A message is one datagram of a socket pair, which Linux caps near 200 KiB.
MAX_MESSAGE = 180 * 1024
# Imported once here rather than in every worker.
_WARM = (
    "pytest",
    "_pytest.assertion.rewrite",
    "_pytest.assertion.util",
    "_pytest.capture",
    "_pytest.logging",
    "pytest_subproc._runbody",
)


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


def _prepare() -> None:
    """Import what every worker needs, so each fork starts with it."""
    for name in _WARM:
        importlib.import_module(name)


def _preload(message: dict[str, Any]) -> str:
    """Import a test module here, so every worker forked for it starts with it.

    A failure is no business of the template's: the worker imports the
    module itself and reports the error where the test can show it.
    """
    from pytest_subproc import _runbody

    try:
        with _child.applied(message["context"]):
            _runbody.import_test_module(message["name"], message["path"], message["code"])
    except BaseException as exc:  # reported by the worker instead
        return f"{type(exc).__name__}: {exc}"
    return ""


def _become_worker(
    ctrl: socket.socket, wake: tuple[int, int], message: dict[str, Any], fds: list[int]
) -> None:
    """In the forked child: take the fds and serve as a worker until done, then exit."""
    code = 0
    try:
        ctrl.close()
        for fd in wake:
            os.close(fd)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        req, rep, life, fault, *std = fds
        for target, fd in zip((1, 2), std):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(message["env"])
        with contextlib.suppress(OSError):
            os.chdir(message["cwd"])
        sys.path[0] = message["cwd"]
        _child.serve_worker(req, rep, life, fault)
    except BaseException:
        traceback.print_exc()  # into the worker's stderr, which the parent reads
        code = 70
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)  # never back into the template's loop


def _reap(ctrl: socket.socket) -> None:
    """Report the exit code of every worker that has exited."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        send(ctrl, ("exit", pid, os.waitstatus_to_exitcode(status)))


def _fork(
    ctrl: socket.socket, wake: tuple[int, int], message: dict[str, Any], fds: list[int]
) -> None:
    pid = os.fork()
    if pid == 0:
        _become_worker(ctrl, wake, message, fds)
    for fd in fds:
        os.close(fd)  # the worker's now; holding them would hide its death
    send(ctrl, ("forked", pid))


def serve(ctrl: socket.socket) -> None:
    """Fork workers on request until the parent goes away."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the select below
    send(ctrl, ("ready", os.getpid()))
    while True:
        ready, _, _ = select.select([ctrl.fileno(), wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
            try:
                _reap(ctrl)
            except ConnectionError:
                return  # the parent is gone
        if ctrl.fileno() in ready:
            try:
                message, fds = recv(ctrl)
            except ConnectionError:
                message, fds = None, []  # closed with our reports unread
            if message is None:
                return  # the parent is gone; its workers watch it themselves
            if message["op"] == "import":
                send(ctrl, ("imported", _preload(message)))
            else:
                _fork(ctrl, (wake_r, wake_w), message, fds)


def main(argv: list[str]) -> None:
    """Start-up: move to the parent's cwd, import, serve."""
    with socket.socket(fileno=int(argv[1])) as ctrl:  # closed at exit, not left to warn
        os.set_inheritable(ctrl.fileno(), False)
        _child.own_group()
        _child.move_to_parent_cwd()
        _prepare()
        serve(ctrl)


if __name__ == "__main__":
    from pytest_subproc import _zygote

    _zygote.main(sys.argv)
