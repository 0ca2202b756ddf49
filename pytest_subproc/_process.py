"""One worker's life, seen from pytest: start, request and reply, deadlines, death, kill.

Its peer in the worker is ``_child``; the worker is forked by a template
process (``_template``), which alone signals it. pytest holds no copy of the
pipe end the worker writes replies to, so the worker's death shows up at once
as end-of-file on the reply fd; where a process the worker forked still holds
that pipe, the template's report of the worker's exit tells it instead. There
is no polling thread. A deadline is enforced in two steps: the worker arms
faulthandler to dump its stacks, and a little later pytest has the template
kill the worker with its process group; the processes that left the group
become the template's orphans when the worker dies, and it kills them too.
"""

from __future__ import annotations

import mmap
import os
import select
import signal
import struct
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Union

import pytest_subproc
from pytest_subproc import _child, _codec, _errors, _template, _wire
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
# How long a crashed worker's exit code may take to come from its template.
REAP_WAIT = 1.0
TAIL = 1 << 16
# How long an interrupted wait gives the worker to write its stacks, and how
# often it looks whether the dump has stopped growing.
DUMP_WAIT = 1.0
DUMP_POLL = 0.01
# The attribute of an exception that interrupted a wait: (pid, the worker's stacks or "").
_STACK_ATTR = "pytest_subproc_worker_stack"


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
    if exitcode is None:
        return "an exit status nobody could learn (its template process ended)"
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
    # pytest's and pluggy's own frames between the worker's loop and the test.
    f"{os.sep}_pytest{os.sep}",
    f"{os.sep}pluggy{os.sep}",
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

    dirty = False  # whether a read found anything to clear
    offset = 0  # where the next read starts: a reply in parts reads it in steps

    def clear(self) -> None:
        if self.dirty:  # ftruncate costs more than the whole rest of a small request
            os.ftruncate(self.fd, 0)
            self.dirty = False
        self.offset = 0

    def read(self, end: Optional[int] = None) -> str:
        """What was written since the last part, up to ``end``, which ends that part.

        Without ``end``: up to the end of the file, and it can be read again.
        """
        size = os.fstat(self.fd).st_size if end is None else end
        self.dirty = self.dirty or size > 0
        chunks, offset = [], self.offset
        while offset < size:
            chunk = os.pread(self.fd, size - offset, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        if end is not None:
            self.offset = max(offset, self.offset)
        return b"".join(chunks).decode("utf-8", "replace")

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def settled(self, start: int, wait: float) -> str:
        """What is written past ``start`` once it has grown and stopped growing (or ``wait`` s)."""
        deadline, size = _monotonic() + wait, start
        while _monotonic() < deadline:
            _sleep(DUMP_POLL)
            now = self.size()
            if start < now == size:
                break
            size = now
        self.dirty = True
        return os.pread(self.fd, max(self.size() - start, 0), start).decode("utf-8", "replace")

    def close(self) -> None:
        os.close(self.fd)


class Receipts:
    """How many requests the worker has read, in a page both sides map.

    The worker counts each request as soon as it has read it whole, with no
    system call; after a death, a count short of what was sent proves the
    last request never reached it.
    """

    _COUNT = struct.Struct("<Q")

    def __init__(self) -> None:
        with tempfile.TemporaryFile(prefix="pytest_subproc-") as f:
            f.truncate(mmap.PAGESIZE)
            self.fd = os.dup(f.fileno())
        self._map = mmap.mmap(self.fd, mmap.PAGESIZE)

    def count(self) -> int:
        return int(self._COUNT.unpack_from(self._map)[0])

    def close(self) -> None:
        self._map.close()
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


# A request submitted and its reply not yet taken: its kind, its encoding, its
# timeout, and what waits for its reply (None: the worker died before reading).
_Due = tuple[Kind, Callable[[], list[_wire.Buffer]], Optional[float], Callable[[], Optional[Reply]]]


class Pauser(Protocol):
    """What pytest's side does when a debugger starts in the worker, and after the request."""

    def pause(self, worker: Worker) -> Any:
        """Get ready for the debugger; return the answer the worker gets (the terminal)."""

    def resume(self) -> None:
        """Take back what pause() lent, once the request is over, however it ended."""


def worker_stack(exc: BaseException) -> Optional[tuple[int, str]]:
    """The worker's pid and stacks, if ``exc`` interrupted the wait for its reply."""
    found: Optional[tuple[int, str]] = getattr(exc, _STACK_ATTR, None)
    return found


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONINSPECT", None)  # would turn the worker into an interactive prompt
    env[_child.CWD_ENV] = os.getcwd()
    return env


# The template starts in the folder this package was imported from, so that
# ``python -m`` finds this very package (not one that happens to sit in the
# parent's cwd); it then moves to the parent's cwd.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(pytest_subproc.__file__)))


class Worker:
    """A worker process, started on first use and replaced after it dies.

    Without a shared template, each worker process gets a template of its
    own, so it starts as fresh as a spawned interpreter. Not thread-safe: one
    request at a time.
    """

    def __init__(
        self,
        *,
        capture: bool = True,
        start_timeout: float = START_TIMEOUT,
        template: Optional[Template] = None,
        warm: tuple[str, ...] = (),
    ) -> None:
        self.capture = capture
        self.warm = warm  # modules a template of our own imports first
        self.start_timeout = start_timeout
        self.template = template
        self._own_template = template is None
        self.starts = 0  # processes that said READY: one, plus one per replacement
        # Deaths noticed between requests ("signal SIGKILL (pid 12)"), for the summary.
        self.idle_deaths: list[str] = []
        # ("started", pid, None) and ("ended", pid, exit code) of each serving process,
        # in order, until pytest's side takes them to call the plugin's hooks.
        self.events: list[tuple[str, int, Optional[int]]] = []
        self._serving: Optional[int] = None  # the pid of a process said started, not ended
        self._ready = False  # whether the running process has said READY
        # Test files the template had collected when it forked this worker.
        self.preloaded: frozenset[str] = frozenset()
        self._proc: Optional[ForkedProcess] = None
        self._files: dict[str, CaptureFile] = {}
        self._receipts: Optional[Receipts] = None  # made for each process, with its pipes
        self._sent = 0  # requests sent to the running process
        # Whether the last reply was a part, more to follow, and its request's timeout.
        self._more = False
        self._timeout: Optional[float] = None
        # The request submitted last, until its reply is taken: what it needs
        # to be sent again, and what waits for its reply.
        self._due: Optional[_Due] = None
        self._req = self._rep = self._life = -1
        # Told when a debugger starts in the worker; None: the worker gets no terminal.
        self.pauser: Optional[Pauser] = None

    @property
    def pid(self) -> Optional[int]:
        """The worker's pid, or None before it starts."""
        return None if self._proc is None else self._proc.pid

    @property
    def alive(self) -> bool:
        """Whether a worker process is up and serving."""
        if self._proc is None or self._proc.returncode is not None:
            return False
        return not self._proc.exited(0)

    @property
    def serving(self) -> bool:
        """Whether the process last started said READY and has not been seen to end.

        Unlike ``alive`` it asks nobody, so it costs nothing on a test's path.
        """
        return self._ready and self._proc is not None and self._proc.returncode is None

    def launch(self) -> None:
        """Start the worker process unless it runs; start() or a request waits for it."""
        if self.alive:
            return
        if self._proc is not None and self._proc.returncode is None and self._ready:
            self.idle_deaths.append(self._death())  # died while idle
        self._release()  # what is left of a worker that died
        self._files = {
            name: CaptureFile()
            for name in (("stdout", "stderr") if self.capture else ()) + ("fault",)
        }
        self._ready = False
        self._fork()

    def _fork(self) -> None:
        template = self._template()
        req_r, self._req = _wire.make_pipe()
        self._rep, rep_w = _wire.make_pipe()
        life_r, self._life = os.pipe()
        _template.HELD.add(self._life)
        std = [self._files[n].fd for n in ("stdout", "stderr")] if self.capture else [1, 2]
        self._receipts, self._sent = Receipts(), 0
        try:
            receipts = self._receipts.fd
            fds = [req_r, rep_w, life_r, self._files["fault"].fd, receipts, *std]
            self._proc = template.fork(fds, child_env(), os.getcwd())
        finally:
            for fd in (req_r, rep_w, life_r):
                os.close(fd)  # the worker's ends: holding them would hide its death
        self.preloaded = frozenset(template.preloaded)
        os.set_blocking(self._req, False)
        os.set_blocking(self._rep, False)

    def _template(self) -> Template:
        """The template to fork from: ours afresh for each process, if we have our own."""
        if self._own_template:
            if self.template is not None:
                self.template.close()
            self.template = Template(child_env(), PACKAGE_ROOT, self.warm)
        assert self.template is not None
        if self.template.tainted:
            self.template.close()  # it has a thread: a new one, which will not import that
        return self.template

    def start(self) -> None:
        """Start the worker unless it runs, and wait for it to say it is ready."""
        if self.serving:
            # Asking the template whether it lives costs more than a small
            # test: a request finds a death out anyway, and the receipts tell
            # whether it died before reading, so that the request goes to a
            # fresh worker.
            return
        self.launch()
        if self._ready:
            return
        deadline = _monotonic() + self.start_timeout
        for retry in (True, False):
            try:
                kind, _ = self._receive(deadline)
                if kind != Kind.READY:
                    raise _wire.WireCorrupt(f"expected READY, got kind {kind}")
                break
            except _wire.WireError as exc:
                closed = isinstance(exc, _wire.WireClosed)
                if not (retry and closed and self._refused_for_a_thread()):
                    self._fail_start(exc)
                self._release()  # forked again, from a template without that thread
                self.launch()
        self._ready = True
        self.starts += 1  # counted once serving: a worker forked ahead may never be
        self._serving = self.pid or 0
        self.events.append(("started", self._serving, None))

    def _ended(self, code: Optional[int]) -> None:
        """Note the end of the process that was serving, once."""
        if self._serving is not None:
            self.events.append(("ended", self._serving, code))
            self._serving = None

    def _refused_for_a_thread(self) -> bool:
        proc, template = self._proc, self.template
        if proc is None or template is None or proc.pid is not None:
            return False  # reading the pid read the template's answers up to this fork
        return template.tainted

    def _fail_start(self, cause: BaseException) -> None:
        proc, template = self._proc, self.template
        assert proc is not None
        assert template is not None
        output = self._read("stderr") + self._read("fault")
        timed_out = isinstance(cause, _wire.WireTimeout)
        if proc.waiting and not timed_out:
            template.resolve(proc)  # its pipe closed: the template's answer is on its way
        if proc.waiting or proc.refused:
            # No worker to speak of: the template is stuck, gone, or refused to fork.
            output += template.output()
            if proc.waiting:
                template.abort()
            code = template.exitcode if proc.refused or not timed_out else None
            what = "the worker template"
        else:
            code = self._end(kill=timed_out)
            what = "the worker process"
        why = "did not answer in time" if timed_out else "exited"
        msg = f"{what} {why} while starting"
        if not timed_out:
            msg += f" ({describe_exit(code)})"
        if proc.refused and template.running:
            msg = f"the worker could not be started: {proc.refused}"
        self._release()
        if output:
            msg += f"; it printed:\n{_tail(output)}"
        raise WorkerStartError(msg, exitcode=code, output=output) from cause

    def _receive(self, deadline: Optional[float]) -> tuple[int, list[_wire.Received]]:
        """Wait for the worker's next message, or learn from its template that it died."""
        rep, proc = self._rep, self._proc
        assert proc is not None
        assert self.template is not None
        poller = select.poll()  # select() rejects fds >= 1024
        poller.register(rep, select.POLLIN)
        while True:
            sock = self.template.fileno()
            if sock >= 0:
                poller.register(sock, select.POLLIN)
            left = None if deadline is None else max(deadline - _monotonic(), 0.0) * 1000
            ready = {fd for fd, _ in poller.poll(left)}
            if rep in ready:
                return _wire.recv_parts(rep, deadline)
            if not ready:
                raise _wire.WireTimeout("deadline passed")
            self.template.drain()
            if proc.exited(0):  # dead, though something it forked holds its pipe
                if poller.poll(0):
                    return _wire.recv_parts(rep, deadline)  # what it sent before dying
                raise _wire.WireClosed("the worker exited")
            if sock >= 0 and self.template.fileno() != sock:
                poller.unregister(sock)

    def request(
        self,
        kind: Kind,
        args: tuple[Any, ...],
        *,
        timeout: Optional[float] = None,
        context: Union[Callable[[], Optional[dict[str, Any]]], dict[str, Any], None] = None,
    ) -> Reply:
        """Send one request and return its Reply; a dead worker is replaced first.

        A worker found to have died before it read the request (killed since
        the last one, say) is replaced, and the request goes to the new one:
        nothing of it ran. ``context()`` makes what the worker is told of
        pytest's process state; it is made again for a new worker, which has
        been told nothing yet.
        """
        self.submit(kind, args, timeout=timeout, context=context)
        return self.reply()

    def submit(
        self,
        kind: Kind,
        args: tuple[Any, ...],
        *,
        timeout: Optional[float] = None,
        context: Union[Callable[[], Optional[dict[str, Any]]], dict[str, Any], None] = None,
    ) -> None:
        """Send one request as ``request`` does, and leave its reply due: ``reply()`` takes it.

        pytest's process goes on with its own work while the worker runs the
        request; the timeout counts from when ``reply()`` starts to wait.
        """

        def parts() -> list[_wire.Buffer]:
            return _codec.dumps((timeout, context() if callable(context) else context, args))

        self.drain()  # what the last request still had to say would answer this one
        self._due = (kind, parts, timeout, self._send(kind, parts, timeout))

    def reply(self) -> Reply:
        """Wait for the reply to the request submitted last (see ``request``)."""
        if self._due is None:
            raise RuntimeError("no request of this worker awaits its reply")
        kind, parts, timeout, answer = self._due
        self._due = None
        reply = answer()
        if reply is None:
            self.idle_deaths.append(self._death())
            reply = self._send(kind, parts, timeout)()
        if reply is None:
            reply = self._reply(error=self._died(timeout, 0.0))
        return reply

    @property
    def more(self) -> bool:
        """Whether the last reply was a part of its request's result, with more to come."""
        return self._more

    def follow(self) -> Reply:
        """Wait for the next part of a reply that came in parts (see ``more``)."""
        if not self._more:
            raise RuntimeError("no reply of the worker is still due")
        self._more = False
        reply = self._answer(self._timeout, sent=False)
        assert reply is not None
        return reply

    def drain(self) -> None:
        """Take whatever is still due of the last request's reply, leaving it unread.

        A worker that died before it read that request is not given it again.
        """
        if self._due is not None:
            answer, self._due = self._due[3], None
            answer()
        while self.more:
            self.follow()

    def _send(
        self, kind: Kind, parts: Callable[[], list[_wire.Buffer]], timeout: Optional[float]
    ) -> Callable[[], Optional[Reply]]:
        """Send the request once; return what waits for its reply.

        That returns None if the worker was dead before it read the request.
        """
        self.start()
        for f in self._files.values():
            f.clear()
        data = parts()
        deadline = None if timeout is None else _monotonic() + timeout + BACKSTOP
        self._sent += 1
        failed: Optional[Reply]
        try:
            _wire.send_parts(self._req, kind, data, deadline)
        except _wire.WireTimeout:
            failed = self._reply(error=self._timed_out(timeout, killed=True))
        except _wire.WireClosed:
            failed = self._closed(timeout, _monotonic(), sent=True)
        except BaseException:
            self._kill()  # interrupted halfway through a request: out of step for good
            raise
        else:
            return lambda: self._answer(timeout, sent=True)
        return lambda: failed

    def _answer(self, timeout: Optional[float], *, sent: bool) -> Optional[Reply]:
        """Wait for the reply (or its next part); None if a request just ``sent`` went unread."""
        started = _monotonic()
        deadline = None if timeout is None else started + timeout + BACKSTOP
        paused = False
        try:
            _wire.await_readable(self._rep, _wire.AWAKE)
            rkind, answer = self._receive(deadline)
            while rkind == Kind.PAUSE:  # a debugger starts there: wait as long as it takes
                paused, deadline = True, None
                self._answer_pause()
                rkind, answer = self._receive(deadline)
        except _wire.WireTimeout:
            return self._reply(error=self._timed_out(timeout, killed=True))
        except _wire.WireClosed:
            return self._closed(timeout, started, sent=sent)
        except _wire.WireCorrupt as exc:
            return self._reply(error=self._garbled(exc))
        except BaseException as exc:
            # Interrupted (Ctrl-C, pytest-timeout) or out of step: the reply
            # still due would answer the next request, so this worker cannot
            # serve again. Where it was goes with the exception.
            try:
                self._note_stack(exc)
            finally:
                self._kill()
            raise
        finally:
            if paused:
                self._resume()
        if rkind == Kind.ERROR:
            return self._reply(error=_errors.load_exception(bytes(answer[0])))
        try:
            value = _codec.loads(answer)
        except Exception as exc:  # e.g. a class the parent cannot import
            return self._reply(error=exc)
        if rkind != Kind.PART:
            return self._reply(value=value)
        (out, err), value = value
        self._more, self._timeout = True, timeout
        return Reply(value, None, self._read("stdout", out), self._read("stderr", err))

    def _closed(self, timeout: Optional[float], started: float, *, sent: bool) -> Optional[Reply]:
        """The worker's pipe closed: None if it died before reading a request just ``sent``."""
        unread = self._receipts is not None and self._receipts.count() < self._sent
        if sent and unread:
            return None  # nothing of the request ran
        return self._reply(error=self._died(timeout, _monotonic() - started))

    def _answer_pause(self) -> None:
        answer = None
        try:
            if self.pauser is not None:
                answer = self.pauser.pause(self)
        finally:  # the worker waits for an answer, whatever happened here
            _wire.send_parts(self._req, Kind.OK, _codec.dumps(answer))

    def _resume(self) -> None:
        if self.pauser is not None:
            self.pauser.resume()

    def _note_stack(self, exc: BaseException) -> None:
        proc = self._proc
        if proc is not None and proc.pid_or_none is not None:  # a worker was interrupted
            setattr(exc, _STACK_ATTR, (proc.pid_or_none, self.dump_stacks()))

    def dump_stacks(self, wait: float = DUMP_WAIT) -> str:
        """Have the worker write every thread's stack (its template signals it); return them.

        Safe from another thread than the one waiting for a reply: it only
        sends to the template and reads the fault file.
        """
        proc, template, fault = self._proc, self.template, self._files.get("fault")
        pid = None if proc is None else proc.pid_or_none
        if pid is None or proc is None or proc.returncode is not None:
            return ""
        if template is None or fault is None or _child.DUMP_SIGNAL is None:
            return ""
        start = fault.size()
        template.dump(pid)
        return clean_stack(fault.settled(start, wait))

    def _death(self) -> str:
        """Describe how the worker died while nothing was asked of it."""
        pid = self.pid
        return f"worker died between tests: {describe_exit(self._end())} (pid {pid})"

    def _reply(self, value: Any = None, error: Optional[BaseException] = None) -> Reply:
        return Reply(value, error, self._read("stdout"), self._read("stderr"))

    def _read(self, name: str, end: Optional[int] = None) -> str:
        f = self._files.get(name)
        return f.read(end) if f is not None else ""

    def _timed_out(self, timeout: Optional[float], *, killed: bool) -> WorkerTimeout:
        pid = self.pid or 0
        if killed:
            if not self._read("fault"):
                # The worker's watchdog could not run (a body holding the
                # GIL): faulthandler dumps on a signal, GIL or not.
                self.dump_stacks()
            self._end(kill=True)
        stack = clean_stack(self._read("fault"))
        msg = f"worker timed out after {timeout or 0:g} s (pid {pid})"
        if stack:
            msg += f"\n{stack.rstrip()}"
        return WorkerTimeout(msg, pid=pid, timeout=timeout or 0.0, stack=stack)

    def _died(self, timeout: Optional[float], elapsed: float) -> BaseException:
        raw = self._read("fault")
        # faulthandler's own exit on timeout looks like a death; its dump says which.
        if timeout is not None and raw.startswith("Timeout (") and elapsed >= timeout * 0.9:
            self._end()
            return self._timed_out(timeout, killed=False)
        pid = self.pid or 0
        code = self._end()
        stack = clean_stack(raw)
        output = self._read("stderr")
        msg = f"worker crashed: {describe_exit(code)} (pid {pid})"
        if stack:
            msg += f"\n{stack.rstrip()}"
        return WorkerCrashed(
            msg, pid=pid, exitcode=code, signal=signal_name(code), stack=stack, output=_tail(output)
        )

    def _garbled(self, exc: _wire.WireCorrupt) -> WorkerCrashed:
        pid = self.pid or 0
        self._end(kill=True)
        msg = (
            f"the worker's reply could not be read ({exc}), so the worker was killed "
            f"(pid {pid}); the next request gets a fresh worker"
        )
        return WorkerCrashed(msg, pid=pid, exitcode=None, output=_tail(self._read("stderr")))

    def _end(self, *, kill: bool = False) -> Optional[int]:
        """Wait for a dying worker's exit code (killing it first if asked), free its pipes.

        None when it cannot be known: the template that forked the worker ended.
        """
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return None if proc is None else proc.returncode
        if kill:
            proc.kill()
        code = proc.wait(REAP_WAIT) if proc.exited(REAP_WAIT) else None
        self._ended(code)
        if code is None:
            self._kill()  # not gone after all, or gone with its template
        self._close_pipes()
        return code

    def _kill(self) -> None:
        """Have the template kill the worker and its group, without waiting."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.kill()
            proc.forget()
            self._ended(proc.returncode)
        self._close_pipes()

    def _close_pipes(self) -> None:
        self._more, self._due = False, None  # nothing more can come
        for name in ("_req", "_rep", "_life"):
            fd = getattr(self, name)
            if fd >= 0:
                _template.HELD.discard(fd)
                os.close(fd)
                setattr(self, name, -1)

    def _release(self) -> None:
        self._kill()
        if self._receipts is not None:
            self._receipts.close()
            self._receipts = None
        for f in self._files.values():
            f.close()
        self._files = {}

    def close(self) -> None:
        """End the worker (its template kills what remains of its tree), free every fd."""
        self._release()
        if self._own_template and self.template is not None:
            self.template.close()
            self.template = None

    def restart(self) -> None:
        """Replace the worker with a fresh one."""
        self.close()
        self.start()
