"""One worker's life: spawn, request and reply, deadlines, death, kill.

The parent holds no copy of the pipe end the worker writes replies to, so the
worker's death shows up at once as end-of-file on the reply fd; there is no
polling thread. A deadline is enforced in two steps: the worker arms
faulthandler to dump its stacks, and the parent kills the whole process tree a
little later, while the worker is still alive to name its descendants.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import psutil

import pytest_subproc
from pytest_subproc import _child, _codec, _errors, _wire
from pytest_subproc._exceptions import WorkerCrashed, WorkerStartError, WorkerTimeout
from pytest_subproc._template import ForkedProcess, Template
from pytest_subproc._wire import Kind

# Clocks taken at import, so tests that mock ``time`` cannot disturb deadlines.
_monotonic = time.monotonic
_sleep = time.sleep

# How long past a timeout the parent waits for the worker's own faulthandler
# exit before it kills the tree itself.
BACKSTOP = 0.3
START_TIMEOUT = 60.0
SHUTDOWN_GRACE = 2.0
TAIL = 1 << 16


def signal_name(exitcode: Optional[int]) -> Optional[str]:
    """Name the signal behind a negative exit code, as subprocess reports them."""
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


def describe_exit(exitcode: Optional[int]) -> str:
    """Return ``signal SIGSEGV`` or ``exit code 3``."""
    name = signal_name(exitcode)
    return f"signal {name}" if name else f"exit code {exitcode}"


def clean_stack(dump: str) -> str:
    """Drop the worker's own machinery from a faulthandler dump, keeping the user's frames."""
    head: list[str] = []
    threads: list[list[str]] = []
    for line in dump.splitlines():
        if line.startswith(("Thread 0x", "Current thread 0x")):
            threads.append([line])
        elif threads:
            if line.strip() and not _is_machinery(line):
                threads[-1].append(line)
        elif line.strip():
            head.append(line)  # "Fatal Python error: ...", "Timeout (0:00:01)!"
    # A thread left without frames was only the worker's own (its lifeline).
    kept = ["\n".join(t) for t in threads if len(t) > 1]
    return "\n\n".join(filter(None, ["\n".join(head), *kept])) + "\n" if head or kept else ""


_MACHINERY = (
    f"{os.sep}pytest_subproc{os.sep}_",
    "<frozen runpy>",
    f"{os.sep}runpy.py",
    "threading.py",
)


def _is_machinery(line: str) -> bool:
    return line.lstrip().startswith("File ") and any(m in line for m in _MACHINERY)


def _tail(text: str, limit: int = TAIL) -> str:
    return (
        text if len(text) <= limit else f"[... {len(text) - limit} characters cut]\n{text[-limit:]}"
    )


def descendants(pid: int) -> list[psutil.Process]:
    """The descendants of process ``pid``, or [] if it is gone.

    Linux lists each thread's children in /proc: reading those for the worker
    and its offspring takes microseconds, where psutil's scan of every process
    on the machine takes milliseconds.
    """
    if not os.path.exists(f"/proc/{pid}/task/{pid}/children"):
        try:
            return psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            return []
    found: list[psutil.Process] = []
    parents = [pid]
    while parents:
        for child in _children(parents.pop()):
            with contextlib.suppress(psutil.Error):
                found.append(psutil.Process(child))
                parents.append(child)
    return found


def _children(pid: int) -> list[int]:
    pids: list[int] = []
    with contextlib.suppress(OSError):  # gone meanwhile: no children
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids.extend(int(p) for p in f.read().split())
    return pids


def _kill_all(procs: list[psutil.Process]) -> None:
    """SIGKILL each process still running (psutil checks the pid was not reused)."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()


class CaptureFile:
    """An unlinked temp file the worker appends to, read and emptied per request.

    O_APPEND makes the worker's writes land at the end even after the parent
    truncates the file between requests.
    """

    def __init__(self) -> None:
        fd, path = tempfile.mkstemp(prefix="pytest_subproc-")
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_APPEND)
        finally:
            os.close(fd)
            os.unlink(path)

    dirty = False  # whether the last read found anything to clear

    def clear(self) -> None:
        if self.dirty:  # ftruncate costs more than the whole rest of a small request
            os.ftruncate(self.fd, 0)
            self.dirty = False

    def read(self) -> str:
        size = os.fstat(self.fd).st_size
        self.dirty = size > 0
        chunks, offset = [], 0
        while offset < size:
            chunk = os.pread(self.fd, size - offset, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks).decode("utf-8", "replace")

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Reply:
    """What one request produced: a value or an error, and the output written meanwhile."""

    value: Any = None
    error: Optional[BaseException] = None
    stdout: str = ""
    stderr: str = ""

    def unwrap(self) -> Any:
        """Return the value, or raise the error."""
        __tracebackhide__ = True
        if self.error is not None:
            raise self.error
        return self.value


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONINSPECT", None)  # would turn the worker into an interactive prompt
    env[_child.CWD_ENV] = os.getcwd()
    return env


# The worker starts in the folder this package was imported from, so that
# ``python -m`` finds this very package (not one that happens to sit in the
# parent's cwd); it then moves to the parent's cwd.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(pytest_subproc.__file__)))


class Worker:
    """A worker process, started on first use and replaced after it dies.

    Not thread-safe: one request at a time.
    """

    def __init__(
        self,
        *,
        capture: bool = True,
        start_timeout: float = START_TIMEOUT,
        template: Optional[Template] = None,
    ) -> None:
        self.capture = capture
        self.start_timeout = start_timeout
        self.template = template
        self.starts = 0  # processes that said READY: one, plus one per replacement
        # Test modules this worker was sent (so their code need not travel again),
        # and fixture values it has shown it can rebuild, as (name, hash of the bytes).
        self.modules: set[str] = set()
        self.checked: set[tuple[str, int]] = set()
        # What the last call told the worker of our cwd, sys.path and os.environ
        # (its raw data), so that later calls send only what changed.
        self.sent_cwd: Optional[str] = None
        self.sent_path: Optional[list[str]] = None
        self.sent_env: dict[Any, Any] = {}
        self._ready = False  # whether the running process has said READY
        # Test modules the template had imported when it forked this worker.
        self.preloaded: frozenset[str] = frozenset()
        self._proc: Optional[Union[subprocess.Popen[bytes], ForkedProcess]] = None
        self._files: dict[str, CaptureFile] = {}
        self._req = self._rep = self._life = -1

    @property
    def pid(self) -> Optional[int]:
        """The worker's pid, or None before it starts."""
        return None if self._proc is None else self._proc.pid

    @property
    def alive(self) -> bool:
        """Whether a worker process is up and serving."""
        if self._proc is None or self._proc.returncode is not None:
            return False
        return not self._exited(0)

    def launch(self) -> None:
        """Start the worker process unless it runs; start() or a request waits for it."""
        if self.alive:
            return
        self._kill_tree()  # a worker that died while idle: reap it, clear up its group
        self.modules.clear()
        self.checked.clear()
        self.preloaded = frozenset()
        self.sent_cwd = self.sent_path = None
        self.sent_env = {}
        self._release()  # what is left of a worker that died
        self._files = {
            name: CaptureFile()
            for name in (("stdout", "stderr") if self.capture else ()) + ("fault",)
        }
        self._ready = False
        self._spawn()

    def start(self) -> None:
        """Start the worker unless it runs, and wait for it to say it is ready."""
        self.launch()
        if self._ready:
            return
        deadline = _monotonic() + self.start_timeout
        try:
            kind, _ = _wire.recv_parts(self._rep, deadline)
            if kind != Kind.READY:
                raise _wire.WireCorrupt(f"expected READY, got kind {kind}")
        except _wire.WireError as exc:
            self._fail_start(exc)
        self._ready = True
        self.starts += 1  # counted once serving: a worker forked ahead may never be
        if isinstance(self._proc, ForkedProcess) and self.template is not None:
            # Its pid is in the template's answers by now; take it while the
            # template is surely there to read from.
            self.template.resolve(self._proc)

    def _spawn(self) -> None:
        req_r, self._req = _wire.make_pipe()
        self._rep, rep_w = _wire.make_pipe()
        life_r, self._life = os.pipe()
        fault = self._files["fault"].fd
        if self.template is not None:
            self._fork(req_r, rep_w, life_r, fault)
            return
        # -u: output written just before a crash must not die in a buffer.
        cmd = [sys.executable, "-u", "-m", "pytest_subproc._child"]
        cmd += [str(fd) for fd in (req_r, rep_w, life_r, fault)]
        out, err = (self._files[n].fd if self.capture else None for n in ("stdout", "stderr"))
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                pass_fds=(req_r, rep_w, life_r, fault),
                env=child_env(),
                cwd=PACKAGE_ROOT,
            )
        finally:
            for fd in (req_r, rep_w, life_r):
                os.close(fd)  # the worker's ends: holding them would hide its death
        os.set_blocking(self._req, False)
        os.set_blocking(self._rep, False)

    def _fork(self, req_r: int, rep_w: int, life_r: int, fault: int) -> None:
        assert self.template is not None
        std = [self._files[n].fd for n in ("stdout", "stderr")] if self.capture else []
        try:
            fds = [req_r, rep_w, life_r, fault, *std]
            self._proc = self.template.fork(fds, child_env(), os.getcwd())
        finally:
            for fd in (req_r, rep_w, life_r):
                os.close(fd)  # the worker's ends: holding them would hide its death
        self.preloaded = frozenset(self.template.preloaded)
        os.set_blocking(self._req, False)
        os.set_blocking(self._rep, False)

    def _fail_start(self, cause: BaseException) -> None:
        output = self._read("stderr") + self._read("fault")
        self._kill_tree()
        code = self._proc.returncode if self._proc else None
        self._release()
        why = "did not answer in time" if isinstance(cause, _wire.WireTimeout) else "exited"
        msg = f"the worker process {why} while starting ({describe_exit(code)})"
        if output:
            msg += f"; it printed:\n{_tail(output)}"
        raise WorkerStartError(msg, exitcode=code, output=output) from cause

    def request(
        self,
        kind: Kind,
        args: tuple[Any, ...],
        *,
        timeout: Optional[float] = None,
        context: Optional[dict[str, Any]] = None,
    ) -> Reply:
        """Send one request and return its Reply; a dead worker is replaced first."""
        self.start()
        for f in self._files.values():
            f.clear()
        parts = _codec.dumps((timeout, context, args))
        started = _monotonic()
        deadline = None if timeout is None else started + timeout + BACKSTOP
        try:
            _wire.send_parts(self._req, kind, parts, deadline)
            _wire.await_readable(self._rep, _wire.AWAKE)
            rkind, data = _wire.recv_parts(self._rep, deadline)
        except _wire.WireTimeout:
            return self._reply(error=self._timed_out(timeout, killed=True))
        except _wire.WireClosed:
            return self._reply(error=self._died(timeout, _monotonic() - started))
        except BaseException:
            # Interrupted (Ctrl-C) or out of step: the reply still due would
            # answer the next request, so this worker cannot serve again.
            self._kill_tree()
            raise
        if rkind == Kind.ERROR:
            return self._reply(error=_errors.load_exception(bytes(data[0])))
        try:
            return self._reply(value=_codec.loads(data))
        except Exception as exc:  # e.g. a class the parent cannot import
            return self._reply(error=exc)

    def _reply(self, value: Any = None, error: Optional[BaseException] = None) -> Reply:
        return Reply(value, error, self._read("stdout"), self._read("stderr"))

    def _read(self, name: str) -> str:
        f = self._files.get(name)
        return f.read() if f is not None else ""

    def _timed_out(self, timeout: Optional[float], *, killed: bool) -> WorkerTimeout:
        pid = self.pid or 0
        if killed:
            self._kill_tree()
        stack = clean_stack(self._read("fault"))
        msg = f"worker timed out after {timeout} s (pid {pid})"
        if stack:
            msg += f"\n{stack.rstrip()}"
        return WorkerTimeout(msg, pid=pid, timeout=timeout or 0.0, stack=stack)

    def _died(self, timeout: Optional[float], elapsed: float) -> BaseException:
        raw = self._read("fault")
        # faulthandler's own exit on timeout looks like a death; its dump says which.
        if timeout is not None and raw.startswith("Timeout (") and elapsed >= timeout * 0.9:
            self._reap()
            return self._timed_out(timeout, killed=False)
        pid = self.pid or 0
        code = self._reap()
        stack = clean_stack(raw)
        output = self._read("stderr")
        msg = f"worker crashed: {describe_exit(code)} (pid {pid})"
        if stack:
            msg += f"\n{stack.rstrip()}"
        return WorkerCrashed(
            msg, pid=pid, exitcode=code, signal=signal_name(code), stack=stack, output=_tail(output)
        )

    def _exited(self, wait: float) -> bool:
        """Wait up to ``wait`` s for the worker to exit, without reaping it."""
        assert self._proc is not None
        if isinstance(self._proc, ForkedProcess):
            return self._proc.exited(wait)
        if not hasattr(os, "waitid"):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(wait)
            return self._proc.returncode is not None
        end = _monotonic() + wait
        while True:
            # WNOWAIT keeps the zombie, so its pid (and process group id) stays
            # ours until the group has been killed.
            flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
            try:
                if os.waitid(os.P_PID, self._proc.pid, flags) is not None:
                    return True
            except ChildProcessError:
                return True  # someone else reaped it: gone, exit status lost
            if _monotonic() >= end:
                return False
            _sleep(0.0005)

    def _reap(self, wait: float = 1.0) -> Optional[int]:
        """Let a dying worker finish exiting, clear up its group, return its exit code."""
        if self._proc is None:
            return None
        if self._proc.returncode is None:
            self._exited(wait)
        self._kill_tree()
        return self._proc.returncode

    def _kill_tree(
        self, descendants: Optional[list[psutil.Process]] = None, *, wait: bool = True
    ) -> None:
        """Kill the worker, its process group and any descendant that left the group."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        if descendants is None:
            descendants = self._descendants()
        if hasattr(os, "killpg"):
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
        _kill_all(descendants)
        with contextlib.suppress(OSError):
            proc.kill()
        if wait or not isinstance(proc, ForkedProcess):
            proc.wait()
        else:
            proc.forget()
        self._close_pipes()

    def _descendants(self) -> list[psutil.Process]:
        """The worker's descendants, found while it lives (an exited worker has none)."""
        return [] if self._proc is None else descendants(self._proc.pid)

    def _close_pipes(self) -> None:
        for name in ("_req", "_rep", "_life"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def _release(self) -> None:
        self._close_pipes()
        for f in self._files.values():
            f.close()
        self._files = {}

    def close(self) -> None:
        """Ask the worker to exit, kill what remains of its tree, free every fd."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            # Taken first: once the worker has exited, descendants that left its
            # process group can no longer be found.
            descendants = self._descendants()
            # A spawned worker may have atexit work (coverage) to finish; a
            # forked one ends with os._exit either way, so it is killed at once.
            graceful = not isinstance(proc, ForkedProcess)
            if graceful:
                with contextlib.suppress(_wire.WireError, OSError):
                    deadline = _monotonic() + SHUTDOWN_GRACE
                    _wire.send_parts(self._req, Kind.SHUTDOWN, [], deadline)
                self._exited(SHUTDOWN_GRACE)
            self._kill_tree(descendants, wait=graceful)
            _kill_all(descendants)
        self._release()

    def restart(self) -> None:
        """Replace the worker with a fresh one."""
        self.close()
        self.start()
