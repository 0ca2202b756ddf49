"""The worker's main loop (runs in the worker): read a request, run it, reply, repeat.

Its peer in pytest is ``_process``. The template (``_zygote``) forks the
worker and hands it its fds: requests in, replies out, a lifeline whose write
end only pytest holds, a file for faulthandler's dumps, and a page where the
worker counts the requests it has read. This module never imports the
pytest-side modules, nor pytest.
"""

from __future__ import annotations

import _thread
import contextlib
import faulthandler
import io
import linecache
import mmap
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Iterator
from types import CodeType, FrameType
from typing import IO, Any, Callable, Optional

from pytest_subproc import _codec, _errors, _wire, _worker_coverage
from pytest_subproc._wire import Kind

# The count of requests read, as pytest's side (_process.Receipts) reads it.
_RECEIPT = struct.Struct("<Q")
# How many compiled run() sources to keep.
_COMPILED = 256
# pytest's cwd: the template starts elsewhere (where this package lives) and moves there.
CWD_ENV = "PYTEST_SUBPROC_CWD"
# How long after the watchdog faulthandler dumps the stacks itself, for a body
# that holds the GIL and so keeps the watchdog from running: well within the
# time the parent waits past a timeout before it kills the worker.
BACKSTOP = 0.1
# As many threads, and frames of each, as faulthandler dumps.
_MAX_THREADS = 100
_MAX_DEPTH = 100
# The signal that has faulthandler write every thread's stack to the fault
# file, sent by the template when pytest's wait for a reply is interrupted.
# Ignored by default, and seldom used: a stray one costs a dump, nothing more.
DUMP_SIGNAL: Optional[int] = getattr(signal, "SIGURG", None)
# Whether faulthandler dumps on that signal here, GIL or not: then pytest has
# the stacks of a body that holds the GIL past its timeout dumped that way,
# and no request needs faulthandler's timer (a thread started per request).
_DUMPS_ON_SIGNAL = DUMP_SIGNAL is not None and hasattr(faulthandler, "register")

# Every function the worker's own machinery calls is taken at import: a test
# body that replaces one (os.dup2, faulthandler.dump_traceback_later) and
# leaves it behind breaks only itself, not the tests after it in its worker.
_read = os.read
_write = os.write
_close = os.close
_dup2 = os.dup2
_fstat = os.fstat
_chdir = os.chdir
_os_getcwd = os.getcwd
_getpid = os.getpid
_getpgrp = getattr(os, "getpgrp", None)
_killpg = getattr(os, "killpg", None)
_exit = os._exit
_monotonic = time.monotonic
_dump_later = faulthandler.dump_traceback_later
_cancel_dump_later = faulthandler.cancel_dump_traceback_later
_current_frames = sys._current_frames
_get_ident = _thread.get_ident
_allocate_lock = _thread.allocate_lock
_start_thread = _thread.start_new_thread
_TIMEOUT_MAX = _thread.TIMEOUT_MAX
_suppress = contextlib.suppress
_FileIO = io.FileIO
_TextIOWrapper = io.TextIOWrapper


def check_name(name: object) -> str:
    """Return ``name`` if it can name a worker variable, else raise ValueError."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a worker variable name must be an identifier, not {name!r}")
    return name


def _die_with_group() -> None:
    """Kill our process group (us and anything we started), then exit."""
    if _killpg is not None and _getpgrp is not None and _getpgrp() == _getpid():
        with _suppress(OSError):
            _killpg(_getpgrp(), signal.SIGKILL)
    _exit(70)


def own_group() -> None:
    """Lead a process group of our own, inside the parent's session.

    The parent kills the group to end us with whatever we started. Staying in
    its session keeps us in its scheduling group (Linux groups by session), so
    a process that yields the CPU while it waits yields it to the other. As a
    background group, we would be stopped for writing to the terminal under
    ``stty tostop`` (output not captured): we ignore that signal instead. A
    worker forked from a template that ignores it, but whose output is
    captured, takes the default back, for the test's own subprocesses.
    """
    if not hasattr(os, "setpgid"):
        return
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)
    at_terminal = os.isatty(1) or os.isatty(2)
    signal.signal(signal.SIGTTOU, signal.SIG_IGN if at_terminal else signal.SIG_DFL)


def watch_parent(life_fd: int) -> None:
    """Die with our descendants as soon as the parent's end of the lifeline closes.

    A thread blocked in read() holds no GIL, so this fires even while the main
    thread is busy running a test.
    """

    def wait() -> None:
        with _suppress(OSError):
            while _read(life_fd, 64):
                pass
        _die_with_group()

    threading.Thread(target=wait, name="pytest_subproc-lifeline", daemon=True).start()


def set_variables(values: dict[str, Optional[str]]) -> None:
    """Set these environment variables (None: unset), touching only those that differ."""
    for key, value in values.items():
        if os.environ.get(key) == value:
            continue
        if value is None:
            del os.environ[key]
        else:
            os.environ[key] = value


def _target(env: dict[str, str]) -> dict[str, Optional[str]]:
    """What to set to make os.environ equal ``env``."""
    target: dict[str, Optional[str]] = dict.fromkeys(os.environ.keys() - env.keys())
    target.update(env)
    return target


class Mirror:
    """Makes os.environ, the cwd and sys.path the parent's for each call.

    The parent sends its cwd and sys.path when they change, and of its
    environment only the variables that changed: refilling os.environ costs
    hundreds of microseconds, more than the rest of a small test. What a body
    changes is put back at the next call, touching only what differs.
    """

    def __init__(self) -> None:
        # The parent's environment, cwd and sys.path, as it last told us.
        self.env: dict[str, str] = {}
        self.cwd: Optional[str] = None
        self.path: Optional[list[str]] = None
        self._seen: object = None  # os.environ's data when it last equalled self.env

    def enter(self, context: dict[str, Any]) -> None:
        """Take what the context tells, then make ours equal it."""
        self._apply_env(context)
        self.cwd = context.get("cwd", self.cwd)
        if self.cwd is not None and self.cwd != _getcwd():
            _chdir(self.cwd)
        self.path = context.get("path", self.path)
        if self.path is not None and sys.path != self.path:
            sys.path[:] = self.path

    def _apply_env(self, context: dict[str, Any]) -> None:
        changes: Optional[dict[str, Optional[str]]] = None
        if "env" in context:
            self.env = dict(context["env"])
        elif "env_changes" in context:
            changes = context["env_changes"]
            for key, value in changes.items():
                if value is None:
                    self.env.pop(key, None)
                else:
                    self.env[key] = value
        else:
            return
        raw = getattr(os.environ, "_data", None)
        if changes is None or raw is None or raw != self._seen:
            changes = _target(self.env)  # changed behind our back: compare it all
        set_variables(changes)
        self._seen = dict(raw) if raw is not None else None


def _getcwd() -> Optional[str]:
    try:
        return _os_getcwd()
    except OSError:  # a body left us in a directory since removed
        return None


@contextlib.contextmanager
def applied(context: dict[str, Any]) -> Iterator[None]:
    """Apply the parent's environment, cwd and sys.path for a while, then restore ours."""
    env, cwd, path = dict(os.environ), _getcwd(), list(sys.path)
    try:
        Mirror().enter(context)
        yield
    finally:
        set_variables(_target(env))
        if cwd is not None and cwd != _getcwd():
            with _suppress(OSError):
                _chdir(cwd)
        sys.path[:] = path


class Watchdog:
    """Dumps the stacks of a request that overruns its timeout, its own thread's first.

    faulthandler dumps at most 100 threads, newest first: the thread serving
    requests, the oldest, is missing from its dump of a body that started
    more. This thread of ours writes every stack in faulthandler's format
    instead. A body that holds the GIL keeps this thread from running: pytest
    then has faulthandler dump on a signal, or, where it cannot, faulthandler's
    own timer, set a little later, stays as the backstop. One thread serves
    every request: arming a request wakes it only when the request's
    deadline comes before the time it sleeps until.
    """

    def __init__(self, fault: IO[str]) -> None:
        self.fault = fault
        self.fd = fault.fileno()
        self.serving = _get_ident()
        self.lock = _allocate_lock()  # over the fields below, and a dump
        self.timeout = 0.0
        self.deadline: Optional[float] = None
        self.sleeps_until: Optional[float] = None  # None: until woken
        self.wake = _allocate_lock()
        self.wake.acquire()  # released to wake the watchdog up
        # Not a threading.Thread: bodies that list or count threads do not see it.
        # Waited for, so that a body holding the GIL finds it asleep, not starting.
        started = _allocate_lock()
        started.acquire()
        self.ident = _start_thread(self.watch, (started,))
        started.acquire()

    def arm(self, timeout: float, start: float) -> None:
        """Dump the stacks ``timeout`` seconds after ``start``, unless disarmed before."""
        deadline = start + timeout
        with self.lock:
            if not _DUMPS_ON_SIGNAL:
                later = max(deadline + BACKSTOP - _monotonic(), 1e-3)  # faulthandler wants > 0
                _dump_later(later, exit=False, file=self.fault)
            self.timeout, self.deadline = timeout, deadline
            # Unlocked: it is awake already, and looks again before it sleeps.
            sooner = self.sleeps_until is None or self.sleeps_until > deadline
            if sooner and self.wake.locked():
                self.wake.release()

    def disarm(self) -> None:
        """Dump nothing for the request just done."""
        with self.lock:
            self.deadline = None
            if not _DUMPS_ON_SIGNAL:
                _cancel_dump_later()

    def watch(self, started: Any) -> None:
        """Sleep until the deadline, dump if the request still runs, and again."""
        started.release()
        while True:
            with self.lock:
                now, deadline = _monotonic(), self.deadline
                if deadline is not None and now >= deadline:
                    self.deadline = deadline = None
                    with _suppress(Exception):  # the backstop still dumps
                        self.dump()
                if deadline is None and self.timeout:
                    # Idle, it sleeps half as long as the last request could
                    # run: the next one's deadline comes later, even counted
                    # from a little before now, so arming it need not wake
                    # us (waking costs more than a small test takes).
                    deadline = now + self.timeout / 2
                self.sleeps_until = deadline
            self.wake.acquire(timeout=_wait_until(deadline))

    def dump(self) -> None:
        """Write every thread's stack to the fault file, the serving thread's first."""
        text = _timeout_line(self.timeout) + _stacks(_current_frames(), self.serving, self.ident)
        # If faulthandler is dumping already, this waits for it to finish, so
        # the two dumps never interleave.
        _cancel_dump_later()
        data = memoryview(text.encode("utf-8", "backslashreplace"))
        while data:
            data = data[_write(self.fd, data) :]


def _wait_until(deadline: Optional[float]) -> float:
    """The timeout for a lock's acquire() to wait until ``deadline`` (None: for ever)."""
    if deadline is None:
        return -1.0
    return min(max(deadline - _monotonic(), 0.0), _TIMEOUT_MAX)


def _timeout_line(timeout: float) -> str:
    """The line faulthandler starts its dump with, ``Timeout (0:00:01.500000)!``."""
    seconds, micro = divmod(round(timeout * 1e6), 1_000_000)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    fraction = f".{micro:06d}" if micro else ""
    return f"Timeout ({hours}:{minutes:02d}:{seconds:02d}{fraction})!\n"


def _stacks(frames: dict[int, FrameType], first: int, skip: int) -> str:
    """Each thread's stack as faulthandler writes it, thread ``first`` first, without ``skip``."""
    order = [first, *(ident for ident in frames if ident not in (first, skip))]
    blocks = [_stack(ident, frames.get(ident), ident == first) for ident in order[:_MAX_THREADS]]
    if len(order) > _MAX_THREADS:
        blocks.append("...\n")
    return "\n".join(blocks)


def _stack(ident: int, frame: Optional[FrameType], current: bool) -> str:
    """One thread's stack as faulthandler writes it, most recent call first."""
    title = "Current thread" if current else "Thread"
    lines = [f"{title} 0x{ident:016x} (most recent call first):"]
    while frame is not None:
        if len(lines) > _MAX_DEPTH:
            lines.append("  ...")
            break
        code, line = frame.f_code, frame.f_lineno
        where = "???" if line is None else line
        lines.append(f'  File "{code.co_filename}", line {where} in {code.co_name}')
        frame = frame.f_back
    return "\n".join(lines) + "\n"


class Server:
    """Serves requests from one parent until it says shutdown or goes away."""

    def __init__(self, req_fd: int, rep_fd: int, fault: IO[str], receipts: mmap.mmap) -> None:
        self.req_fd = req_fd
        self.rep_fd = rep_fd
        self.fault = fault
        # Where we count the requests read, for pytest to tell, if we die,
        # whether the last one reached us.
        self.receipts = receipts
        self.received = 0
        self.namespace: dict[str, Any] = {"__name__": "__subworker__"}
        self.mirror = Mirror()
        # Copies of the capture fds, and streams of our own on fds 1 and 2, so
        # a body that closes or replaces either cannot take output away from
        # the requests after it.
        self.stdio = (os.dup(1), os.dup(2))
        self.streams = [_own_stream(sys.__stdout__, 1), _own_stream(sys.__stderr__, 2)]
        self.watchdog: Optional[Watchdog] = None
        self.timeout: Optional[float] = None  # the running request's
        self.handlers: dict[int, Callable[..., Any]] = {
            Kind.RUN: self.on_run,
            Kind.STORE: self.on_store,
            Kind.LOAD: self.on_load,
            Kind.CALL: self.on_call,
        }
        self.compiled: dict[tuple[str, str], CodeType] = {}
        # Whether a request is being served; a pause() in another thread, and
        # the lock it holds while it talks to the parent (see reply()).
        self.busy = False
        self.pausing = False
        self.pause_lock = _allocate_lock()
        # Called once before the reply goes, then dropped: what a debugger
        # took for the request (the terminal) is given back.
        self.before_reply: list[Callable[[], None]] = []
        # Called once after the reply has gone, then dropped: work for the
        # next request done while pytest's process reports this one.
        self.after_reply: list[Callable[[], None]] = []

    def serve(self) -> None:
        """Loop until the parent asks us to stop or closes the request pipe."""
        while True:
            _wire.await_readable(self.req_fd, _wire.AWAKE)
            try:
                kind, parts = _wire.recv_parts(self.req_fd)
            except _wire.WireClosed:
                return
            self.received += 1
            _RECEIPT.pack_into(self.receipts, 0, self.received)
            if kind == Kind.SHUTDOWN:
                return
            self.busy = True
            answer = self.handle(kind, parts)
            if _worker_coverage.COVERAGE is not None:
                _worker_coverage.flush()  # now: pytest may kill us once it has the reply
            self.reply(*answer)
            while self.after_reply:
                with _suppress(Exception):
                    self.after_reply.pop()()

    def handle(self, kind: int, parts: list[_wire.Received]) -> tuple[int, list[_wire.Buffer]]:
        """Run one request and return the reply (kind, parts); never raises."""
        self.reset_stdio()
        # The parent's clock runs from before it sent the request; ours starts
        # before the decoding, which may import modules (pytest, at first).
        received = _monotonic()
        try:
            timeout, context, args = _codec.loads(parts)
            handler = self.handlers.get(kind)
            if handler is None:
                raise ValueError(f"unknown request kind {kind}")
            if context:
                self.mirror.enter(context)
            self.timeout = timeout
            if timeout is None:
                return Kind.OK, _codec.dumps(handler(*args))
            watchdog = self.arm(timeout, received)
            try:
                result = handler(*args)
            finally:
                watchdog.disarm()
            return Kind.OK, _codec.dumps(result)
        except BaseException as exc:
            return Kind.ERROR, [_errors.dump_exception(exc)]

    def reply(self, kind: int, parts: list[_wire.Buffer]) -> None:
        """Flush this request's output, then send its reply."""
        _flush()  # first, so that the output belongs to this request, not the next
        self.busy = False
        if self.pausing:  # another thread is asking the parent: let it finish first
            with self.pause_lock:
                pass
        self._give_back()
        _wire.send_parts(self.rep_fd, kind, parts)

    def part(self, value: Any) -> None:
        """Send one part of the running request's result; see ``reply_part``."""
        _flush()
        self._give_back()
        # The parent reads each capture up to where it ended for this part.
        sizes = tuple(_fstat(fd).st_size for fd in self.stdio)
        with self.pause_lock:  # not amid another thread's pause()
            _wire.send_parts(self.rep_fd, Kind.PART, _codec.dumps((sizes, value)))
        if self.watchdog is not None and self.timeout is not None:
            self.watchdog.arm(self.timeout, _monotonic())

    def _give_back(self) -> None:
        """Run what must run before a reply (or a part of one) goes: see ``before_reply``."""
        while self.before_reply:
            with _suppress(Exception):
                self.before_reply.pop()()

    def pause(self) -> Any:
        """Tell the parent a debugger starts in this request, and return its answer.

        From then on the request has no deadline: the watchdog is disarmed
        here, and the parent stops counting. None outside a request, where
        no parent waits to answer.
        """
        with self.pause_lock:
            self.pausing = True
            try:
                # reply() clears busy before it looks at pausing: one of the
                # two threads sees the other's flag, so no PAUSE follows a reply.
                if not self.busy:
                    return None
                if self.watchdog is not None:
                    self.watchdog.disarm()
                _wire.send_parts(self.rep_fd, Kind.PAUSE, [])
                _, parts = _wire.recv_parts(self.req_fd)
                return _codec.loads(parts)
            finally:
                self.pausing = False

    def arm(self, timeout: float, start: float) -> Watchdog:
        """Have every thread's stack dumped if the request overruns ``timeout`` from ``start``.

        The worker does not exit: the parent kills the whole tree just after,
        while the worker still lives to name descendants that left its group.
        """
        if self.watchdog is None:  # started by the first request with a timeout
            self.watchdog = Watchdog(self.fault)
        self.watchdog.arm(timeout, start)
        return self.watchdog

    def reset_stdio(self) -> None:
        """Point fds 1 and 2, sys.stdout/stderr and their __dunder__ twins back at the captures."""
        _dup2(self.stdio[0], 1)
        _dup2(self.stdio[1], 2)
        out, err = self.streams
        if not _usable(out):
            out = self.streams[0] = _stdio_stream(1)
        if not _usable(err):
            err = self.streams[1] = _stdio_stream(2)
        sys.stdout = out
        sys.stderr = err
        setattr(sys, "__stdout__", out)  # noqa: B010 - typeshed calls it final
        setattr(sys, "__stderr__", err)  # noqa: B010

    def on_run(self, source: str, filename: str) -> None:
        # The parent names a source by its text, so a source run again is
        # compiled once; it registers the lines for tracebacks and pytest.
        key = (source, filename)
        code = self.compiled.get(key)
        if code is None:
            if len(self.compiled) >= _COMPILED:
                self.compiled.clear()
            code = self.compiled[key] = compile(source, filename, "exec")
        if filename not in linecache.cache:
            linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        exec(code, self.namespace)

    def on_store(self, name: str, value: Any) -> None:
        self.namespace[check_name(name)] = value

    def on_load(self, name: str) -> Any:
        try:
            return self.namespace[check_name(name)]
        except KeyError:
            raise NameError(f"name {name!r} is not defined in the worker") from None

    def on_call(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return fn(*args, **kwargs)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with _suppress(Exception):
            stream.flush()


def _usable(stream: IO[str]) -> bool:
    """Return whether ``stream`` is open, and still has its buffer."""
    try:
        return not stream.closed
    except ValueError:  # its buffer detached
        return False


def _stdio_stream(fd: int) -> IO[str]:
    """Return a text stream on fd 1 or 2, as ``python -u`` makes sys.stdout and sys.stderr.

    Unbuffered: output written just before a crash must not die in a buffer.
    """
    raw = _FileIO(fd, "wb", closefd=False)
    errors = None if fd == 1 else "backslashreplace"
    return _TextIOWrapper(raw, errors=errors, write_through=True)


def _own_stream(stream: Optional[IO[str]], fd: int) -> IO[str]:
    """Return ``stream`` if it is the interpreter's usable stream on ``fd``, else a new one."""
    try:
        if stream is not None and _usable(stream) and stream.fileno() == fd:
            return stream
    except (OSError, ValueError):  # not on an fd at all
        pass
    return _stdio_stream(fd)


_SERVER: Optional[Server] = None  # the worker's, once it serves


def pause() -> Any:
    """Tell the parent a debugger starts, and return its answer (None if no request runs)."""
    return None if _SERVER is None else _SERVER.pause()


def reply_part(value: Any) -> None:
    """Send ``value`` as one part of the running request's result, with more to follow.

    The output written so far belongs to this part; the request's timeout
    starts again for what follows.
    """
    if _SERVER is None:
        raise RuntimeError("no request is being served here")
    _SERVER.part(value)


def before_reply(callback: Callable[[], None]) -> None:
    """Have ``callback`` run once, before the reply of the request being served goes."""
    if _SERVER is not None:
        _SERVER.before_reply.append(callback)


def after_reply(callback: Callable[[], None]) -> None:
    """Have ``callback`` run once, after the reply of the request being served has gone."""
    if _SERVER is not None:
        _SERVER.after_reply.append(callback)


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with _suppress(OSError):
            _close(fd)


def serve_worker(req_fd: int, rep_fd: int, life_fd: int, fault_fd: int, receipts_fd: int) -> None:
    """Take the fds, arm faulthandler, watch the parent, say ready, serve."""
    own_group()
    for fd in (req_fd, rep_fd, life_fd, fault_fd, receipts_fd):
        os.set_inheritable(fd, False)  # our own subprocesses must not hold them
    if hasattr(os, "register_at_fork"):
        # A fork()ed child (multiprocessing, os.fork) inherits every fd: one
        # holding the reply pipe would hide our death from the parent.
        os.register_at_fork(after_in_child=lambda: _close_fds(req_fd, rep_fd, life_fd))
    fault = open(fault_fd, "w", closefd=False)  # noqa: SIM115 - lives as long as we do
    faulthandler.enable(file=fault, all_threads=True)
    if _DUMPS_ON_SIGNAL and DUMP_SIGNAL is not None:
        faulthandler.register(DUMP_SIGNAL, file=fault, all_threads=True)
    watch_parent(life_fd)
    receipts = mmap.mmap(receipts_fd, mmap.PAGESIZE)
    _wire.send_parts(rep_fd, Kind.READY, [])
    global _SERVER
    _SERVER = Server(req_fd, rep_fd, fault, receipts)
    _SERVER.serve()
