"""pytest's side of a template process (``_zygote`` runs there), which forks workers.

Spawning a worker costs a fresh interpreter and ``import pytest``; forking a
template that has both already costs a few milliseconds. The template is a
spawned process of its own (pytest never forks), and since the workers are
its children, it reports their exit codes, and it alone signals them: pytest
asks it to. A spawned worker is the only worker of a template of its own.
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
import tempfile
import time
from typing import IO, Any, Optional

from pytest_subproc import _coverage, _zygote
from pytest_subproc._exceptions import WorkerStartError

_monotonic = time.monotonic

START_TIMEOUT = 60.0
CLOSE_GRACE = 2.0
# The most of the template's own output a report shows.
OUTPUT_TAIL = 1 << 14

# Every pytest-side end of a template's socket or a worker's lifeline, closed in
# a process forked from pytest: one that held them would keep the template and
# its workers alive after pytest itself died.
HELD: set[int] = set()


def _close_held() -> None:
    for fd in HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held)


def fork_supported() -> bool:
    """Whether workers can be forked from a template here (POSIX, fd passing)."""
    return all(hasattr(os, name) for name in ("fork", "setpgid", "waitid")) and hasattr(
        socket, "send_fds"
    )


class Template:
    """A template process, started on first use and restarted if it dies."""

    def __init__(
        self,
        env: dict[str, str],
        cwd: str,
        warm: tuple[str, ...] = (),
        *,
        configure: Any = None,
    ) -> None:
        self._env, self._cwd = env, cwd
        self._warm = warm  # modules to import before the first fork (subprocess_preload)
        # How to configure pytest there, before any worker is forked (a ConfigSpec).
        self._configure = configure
        # Once the template has configured pytest: why forking it is unsafe ('' if it is not).
        self.configured: Optional[str] = None
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._pidfd = -1
        self._sock: Optional[socket.socket] = None
        self._output: Optional[IO[bytes]] = None  # the template's own stdout and stderr
        # Which template process this is (one more at each start): a worker
        # forked by an earlier one is lost with it.
        self.generation = 0
        self._codes: dict[int, int] = {}  # exit codes reported, not yet collected
        self.preloaded: set[str] = set()
        # Test modules that start a thread when imported: never imported here again.
        self.unsafe: set[str] = set()
        self._forgotten: set[int] = set()  # workers whose exit code nobody will ask for
        self._pending: collections.deque[ForkedProcess] = collections.deque()  # forks unanswered
        self.exitcode: Optional[int] = None  # of the last template process, once it ended

    @property
    def running(self) -> bool:
        """Whether a template process was started and has not been seen to end."""
        return self._sock is not None

    def launch(self) -> None:
        """Start the template process unless it runs; nothing waits for it here.

        Started while pytest still collects, it imports pytest meanwhile.
        """
        if not self.running or (self._proc is not None and self._proc.poll() is not None):
            self._start()

    def _start(self) -> None:
        self.close()
        self.generation += 1
        self.preloaded.clear()
        self._codes.clear()
        self._forgotten.clear()
        self.exitcode = None
        kind = getattr(socket, "SOCK_SEQPACKET", socket.SOCK_DGRAM)
        ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
        self._output = tempfile.TemporaryFile(prefix="pytest_subproc-")  # noqa: SIM115 - kept open
        cmd = [sys.executable, "-u", "-m", "pytest_subproc._zygote", str(theirs.fileno())]
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._output,
                stderr=self._output,
                pass_fds=(theirs.fileno(),),
                env=_coverage.template_env(self._env),
                cwd=self._cwd,
            )
        except OSError as exc:
            ours.close()
            self._output.close()
            raise WorkerStartError(f"the worker template could not be started: {exc}") from exc
        finally:
            theirs.close()
        self._pidfd = _pidfd(self._proc.pid)
        self._sock = ours  # its "ready" is read with the first answer
        HELD.add(ours.fileno())
        self._send_setup()

    def prepare(self, warm: tuple[str, ...], configure: Any) -> None:
        """Give a template started early its warm modules and its pytest configuration."""
        self._warm, self._configure = warm, configure
        if self.running:
            self._send_setup()

    def _send_setup(self) -> None:
        if self._warm:
            self._send_warm()
        self.configured = None
        if self._configure is not None:
            assert self._sock is not None
            with contextlib.suppress(OSError):  # gone already: its workers' starts say so
                _zygote.send(self._sock, {"op": "configure", "spec": self._configure})

    def _send_warm(self) -> None:
        """Have the template import the warm modules, before any fork it is asked for.

        With pytest's sys.path, where a project's own modules are found. If
        the template cannot import one, it refuses every fork, saying why.
        """
        assert self._sock is not None
        message = {"op": "warm", "modules": list(self._warm), "path": list(sys.path)}
        with contextlib.suppress(OSError):  # the template is gone: the next fork says so
            _zygote.send(self._sock, message)

    def wait_configured(self) -> str:
        """Wait until the template has configured pytest; return why it cannot fork, if so."""
        self.launch()
        deadline = _monotonic() + START_TIMEOUT
        while self._configure is not None and self.configured is None and self.running:
            if not self._next(deadline):
                break
        return self.configured or ""

    def fork(self, fds: list[int], env: dict[str, str], cwd: str) -> ForkedProcess:
        """Have a worker forked that takes ``fds``; its pid is read when first needed."""
        self.launch()
        assert self._sock is not None
        message = {"op": "fork", "env": env, "cwd": cwd, "path": list(sys.path)}
        try:
            _zygote.send(self._sock, message, tuple(fds))
        except _zygote.TooLarge as exc:
            raise WorkerStartError(
                f"the environment is too large to hand to the worker template ({exc})"
            ) from exc
        except OSError:
            # The template is gone; the worker's wait for its READY says so.
            return ForkedProcess(self, refused="the worker template exited")
        proc = ForkedProcess(self)
        self._pending.append(proc)  # the template answers in order
        return proc

    def preload(self, path: str) -> None:
        """Have the template collect a test file once, for all workers forked after.

        Nothing waits: the template collects it before it forks the next worker.
        """
        if path in self.preloaded or path in self.unsafe or self._configure is None:
            return
        self.launch()
        assert self._sock is not None
        with contextlib.suppress(OSError):  # the template is gone: its workers collect it
            _zygote.send(self._sock, {"op": "import", "path": path, "spec": self._configure})
            self.preloaded.add(path)

    def kill(self, pid: int) -> None:
        """Have the template kill a worker it forked, with its process group."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                _zygote.send(self._sock, {"op": "kill", "pid": pid})

    def dump(self, pid: int) -> None:
        """Have the template signal a worker it forked to dump its stacks.

        It only sends: safe from another thread while pytest waits on the socket.
        """
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                _zygote.send(sock, {"op": "dump", "pid": pid})

    def resolve(self, proc: ForkedProcess) -> None:
        """Read answers until the template has said what became of ``proc``'s fork."""
        deadline = _monotonic() + START_TIMEOUT
        while proc.waiting:
            if not self._next(deadline):
                proc.refused = "the worker template did not answer in time"
                self._stop()

    def exit_code(self, pid: int, wait: float) -> Optional[int]:
        """Return a worker's exit code once the template has reported it (None: not yet)."""
        deadline = _monotonic() + wait
        while pid not in self._codes and self.running:
            if not self._next(deadline):
                return None
        return self._codes.pop(pid, None)

    def fileno(self) -> int:
        """The socket to wait on beside a worker's pipe (-1 once the template ended)."""
        return -1 if self._sock is None else self._sock.fileno()

    def drain(self) -> None:
        """Take in whatever the template has said, without waiting."""
        while self.running and self._next(_monotonic()):
            pass

    def _next(self, deadline: float) -> bool:
        """Read one message, filing what it says; False if none came by ``deadline``."""
        assert self._sock is not None
        poller = select.poll()  # select() rejects fds >= 1024
        poller.register(self._sock, select.POLLIN)
        if not poller.poll(max(deadline - _monotonic(), 0.0) * 1000):
            return False
        try:
            message, fds = _zygote.recv(self._sock)
        except OSError:
            message, fds = None, []
        for fd in fds:
            os.close(fd)
        if message is None:
            self._ended()
        else:
            self._file(message)
        return True

    def _file(self, message: tuple[Any, ...]) -> None:
        what = message[0]
        if what == "forked":
            self._pending.popleft().pid_or_none = message[1]
        elif what == "refused":
            self._pending.popleft().refused = message[1]
        elif what == "exit":
            if message[1] in self._forgotten:
                self._forgotten.discard(message[1])
            else:
                self._codes[message[1]] = message[2]
        elif what == "configured":
            self.configured = message[2] or ""
        elif what == "imported" and message[3]:
            # The template has a thread now, so it cannot fork safely any more:
            # the next fork starts a new one, which never imports that module.
            self.unsafe.add(message[1])

    @property
    def tainted(self) -> bool:
        """Whether the running template imported a module that started a thread."""
        return bool(self.unsafe & self.preloaded)

    def forget(self, pid: int) -> None:
        """Nobody will ask for this worker's exit code: drop it when it comes."""
        if self._codes.pop(pid, None) is None:
            self._forgotten.add(pid)

    def _ended(self) -> None:
        """The template has gone: so have its workers (they die with it)."""
        self._stop()

    def output(self) -> str:
        """The tail of what the template itself printed (an import error, say)."""
        if self._output is None:
            return ""
        size = os.fstat(self._output.fileno()).st_size
        start = max(size - OUTPUT_TAIL, 0)
        return os.pread(self._output.fileno(), size - start, start).decode("utf-8", "replace")

    def _stop(self) -> None:
        """Close our end, wait for the template's exit (it kills its workers), reap it."""
        if self._sock is not None:
            HELD.discard(self._sock.fileno())
            self._sock.close()  # the template ends its workers and exits when it sees this
            self._sock = None
        for pending in self._pending:
            pending.refused = pending.refused or "the worker template exited"
        self._pending.clear()
        proc, self._proc = self._proc, None
        if proc is not None:
            if self._pidfd >= 0:  # woken by the exit itself, not by polling
                poller = select.poll()
                poller.register(self._pidfd, select.POLLIN)
                poller.poll(CLOSE_GRACE * 1000)
            try:
                proc.wait(CLOSE_GRACE)
            except subprocess.TimeoutExpired:
                self._kill_template(proc)
                proc.wait()
            self.exitcode = proc.returncode
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def _kill_template(self, proc: subprocess.Popen[bytes]) -> None:
        # Only we reap it, so until wait() returns its pid is ours; through a
        # pidfd the signal cannot reach another process even if someone else
        # reaped it meanwhile.
        if self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        else:
            proc.kill()

    def abort(self) -> None:
        """Kill a template that does not answer, then close it."""
        if self._proc is not None and self._proc.poll() is None:
            self._kill_template(self._proc)
        self.close()

    def close(self) -> None:
        """Stop the template and every worker it still holds."""
        self._stop()
        if self._output is not None:
            self._output.close()
            self._output = None


def _pidfd(pid: int) -> int:
    """A pidfd for our new child (Linux 5.3+), or -1."""
    if not (hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")):
        return -1
    try:
        fd: int = os.pidfd_open(pid)
    except OSError:
        return -1
    os.set_inheritable(fd, False)
    return fd


class ForkedProcess:
    """What a Worker holds of its process, forked by the template."""

    def __init__(self, template: Template, refused: Optional[str] = None) -> None:
        self.pid_or_none: Optional[int] = None  # until the template says
        self.refused = refused  # why the template did not fork it
        self.returncode: Optional[int] = None
        self._template = template
        self._generation = template.generation
        self._code: Optional[int] = None
        self.lost = False  # its template ended: its exit code is unknowable

    @property
    def waiting(self) -> bool:
        """Whether the template has yet to answer for this fork."""
        return self.pid_or_none is None and self.refused is None

    @property
    def _current(self) -> bool:
        return self._template.generation == self._generation and self._template.running

    @property
    def pid(self) -> Optional[int]:
        """The worker's pid, waiting for the template to tell it if need be; None if refused."""
        if self.waiting and self._current:
            self._template.resolve(self)
        return self.pid_or_none

    def exited(self, wait: float) -> bool:
        """Whether the worker has exited, waiting up to ``wait`` seconds to learn it."""
        if self._code is not None or self.lost:
            return True
        pid = self.pid
        if pid is None:
            return True  # never forked
        if self._current:
            self._code = self._template.exit_code(pid, wait)
        if self._code is None and not self._current:
            self.lost = True
        return self._code is not None or self.lost

    def kill(self) -> None:
        """Have the template kill the worker, unless it has ended."""
        pid = self.pid
        if pid is not None and not self.exited(0) and self._current:
            self._template.kill(pid)

    def forget(self) -> None:
        """Give up on the exit code (the worker was killed on purpose)."""
        if self._code is None and self.pid_or_none is not None and self._current:
            self._template.forget(self.pid_or_none)
        self.returncode = self._code if self._code is not None else -signal.SIGKILL

    def wait(self, timeout: float) -> Optional[int]:
        """Return the exit code once known; None if it cannot be known (the template ended)."""
        if not self.exited(timeout):
            raise subprocess.TimeoutExpired(str(self.pid), timeout)
        self.returncode = self._code
        return self._code
