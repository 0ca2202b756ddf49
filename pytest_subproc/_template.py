"""The parent's side of the template process that forks workers.

Spawning a worker costs a fresh interpreter and ``import pytest``; forking a
template that has both already costs a few milliseconds. The template is a
spawned process of its own (the parent never forks), and since the workers
are its children, it reports their exit codes.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Optional

from pytest_subproc import _zygote
from pytest_subproc._exceptions import WorkerStartError

_monotonic = time.monotonic

START_TIMEOUT = 60.0
CLOSE_GRACE = 2.0


def fork_supported() -> bool:
    """Whether workers can be forked from a template here (POSIX, fd passing)."""
    return hasattr(os, "fork") and hasattr(socket, "send_fds") and hasattr(os, "setpgid")


class Template:
    """A template process, started on first use and restarted if it dies."""

    def __init__(self, env: dict[str, str], cwd: str) -> None:
        self._env, self._cwd = env, cwd
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._sock: Optional[socket.socket] = None
        self._codes: dict[int, int] = {}  # exit codes reported, not yet collected
        self.preloaded: set[str] = set()
        self._forgotten: set[int] = set()  # workers whose exit code nobody will ask for
        self._pending: collections.deque[ForkedProcess] = collections.deque()  # forks unanswered

    def launch(self) -> None:
        """Start the template process unless it runs; nothing waits for it here.

        Started while pytest still collects, it imports pytest meanwhile.
        """
        if self._proc is None or self._proc.poll() is not None:
            self._start()

    def _start(self) -> None:
        self.close()
        self.preloaded.clear()
        self._codes.clear()
        self._forgotten.clear()
        self._pending.clear()
        kind = getattr(socket, "SOCK_SEQPACKET", socket.SOCK_DGRAM)
        ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-u", "-m", "pytest_subproc._zygote", str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                env=self._env,
                cwd=self._cwd,
            )
        finally:
            theirs.close()
        self._sock = ours  # its "ready" is read with the first answer

    def fork(self, fds: list[int], env: dict[str, str], cwd: str) -> ForkedProcess:
        """Have a worker forked that takes ``fds``; its pid is read when first needed."""
        self.launch()
        assert self._sock is not None
        try:
            _zygote.send(self._sock, {"op": "fork", "env": env, "cwd": cwd}, tuple(fds))
        except _zygote.TooLarge as exc:
            raise WorkerStartError(
                f"the environment is too large to hand to the worker template ({exc}); "
                "use --subprocess-start=spawn"
            ) from exc
        proc = ForkedProcess(self)
        self._pending.append(proc)  # the template answers in order
        return proc

    def preload(self, name: str, path: str, code: Optional[bytes], context: dict[str, Any]) -> None:
        """Have the template import a test module once, for all workers forked after.

        Nothing waits: the template imports it before it forks the next worker.
        """
        if path in self.preloaded:
            return
        self.launch()
        assert self._sock is not None
        message = {"op": "import", "name": name, "path": path, "code": code, "context": context}
        try:
            _zygote.send(self._sock, message)
        except _zygote.TooLarge:
            try:  # too much code for one message: the template rewrites the module itself
                _zygote.send(self._sock, {**message, "code": None})
            except _zygote.TooLarge:
                return  # each worker imports the module itself instead
        self.preloaded.add(path)

    def resolve(self, proc: ForkedProcess) -> None:
        """Read answers until the template has said which pid ``proc`` got."""
        deadline = _monotonic() + START_TIMEOUT
        while proc.pid_or_none is None:
            self._next(deadline)

    def exit_code(self, pid: int, wait: float) -> Optional[int]:
        """Return a worker's exit code once the template has reported it (None: not yet)."""
        deadline = _monotonic() + wait
        try:
            while pid not in self._codes:
                if self._sock is None or self._next(deadline, block=False) is None:
                    return None
        except WorkerStartError:
            return None  # the template is gone, and what it knew with it
        return self._codes.pop(pid)

    def _next(self, deadline: float, *, block: bool = True) -> object:
        """Read one message; exit codes are filed as they come. None on timeout."""
        assert self._sock is not None
        left = max(deadline - _monotonic(), 0.0)
        if not select.select([self._sock], [], [], left)[0]:
            if block:
                self.close()
                raise WorkerStartError("the worker template did not answer in time")
            return None
        message, fds = _zygote.recv(self._sock)
        for fd in fds:
            os.close(fd)
        if message is None:
            self.close()
            raise WorkerStartError("the worker template exited")
        if message[0] == "forked":
            self._pending.popleft().pid_or_none = message[1]
        elif message[0] == "exit":
            if message[1] in self._forgotten:
                self._forgotten.discard(message[1])
            else:
                self._codes[message[1]] = message[2]
        return message

    def forget(self, pid: int) -> None:
        """Nobody will ask for this worker's exit code: drop it when it comes."""
        if self._codes.pop(pid, None) is None:
            self._forgotten.add(pid)

    def close(self) -> None:
        """Stop the template; the workers it forked live on until their own end."""
        if self._sock is not None:
            self._sock.close()  # the template exits when it sees this
            self._sock = None
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.wait(CLOSE_GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.kill()  # in case it never got as far as leading its group
                proc.wait()


class ForkedProcess:
    """What Worker needs of a Popen, for a worker forked by the template."""

    def __init__(self, template: Template) -> None:
        self.pid_or_none: Optional[int] = None  # until the template says
        self.returncode: Optional[int] = None
        self._template = template
        self._code: Optional[int] = None

    @property
    def pid(self) -> int:
        """The worker's pid, waiting for the template to tell it if need be."""
        if self.pid_or_none is None:
            self._template.resolve(self)
        assert self.pid_or_none is not None
        return self.pid_or_none

    def exited(self, wait: float) -> bool:
        """Whether the worker has exited, waiting up to ``wait`` seconds to learn it."""
        if self._code is None:
            self._code = self._template.exit_code(self.pid, wait)
        return self._code is not None

    def forget(self) -> None:
        """Give up on the exit code (the worker was killed on purpose)."""
        if self._code is None:
            self._template.forget(self.pid)
        self.returncode = self._code if self._code is not None else -signal.SIGKILL

    def kill(self) -> None:
        if self._code is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: Optional[float] = None) -> int:
        """Return the exit code; -SIGKILL's code if the template could not tell it."""
        if not self.exited(START_TIMEOUT if timeout is None else timeout):
            if timeout is not None:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            self.kill()
            if not self.exited(CLOSE_GRACE):
                self._code = -signal.SIGKILL  # what we just sent; the template is gone
        self.returncode = code = self._code
        assert code is not None
        return code
