"""The ``subworker`` handle: the worker's RPC surface for a test to drive by hand."""

from __future__ import annotations

import functools
import hashlib
import linecache
import os
import pickle
import sys
import textwrap
import types
from typing import Any, Callable, Optional

from pytest_subproc import _codec, _errors
from pytest_subproc._child import check_name
from pytest_subproc._exceptions import WorkerCrashed, WorkerTimeout
from pytest_subproc._process import Reply, Worker
from pytest_subproc._settings import usable_timeout
from pytest_subproc._wire import Kind


@functools.lru_cache(maxsize=256)
def _named(source: str) -> tuple[str, str]:
    """Dedent ``source`` and name it by its text.

    The same text always gets the same name, so the worker compiles a source
    run again only once, and linecache holds one entry per text, not per call.
    """
    code = textwrap.dedent(source)
    digest = hashlib.blake2b(code.encode("utf-8", "surrogatepass"), digest_size=6).hexdigest()
    return code, f"<subworker-run-{digest}>"


def check_timeout(timeout: object) -> Optional[float]:
    """Return a valid per-call timeout (None beyond any wait's reach), or raise ValueError."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, not {timeout!r}")
    return usable_timeout(timeout)


# The plugin's private modules, where a frame in a worker's traceback is machinery.
_MACHINERY = f"{os.sep}pytest_subproc{os.sep}_"
_CODEC = _codec.__file__


def _pickling(tb: Optional[types.TracebackType], *, worker: bool) -> str:
    """``dumps`` or ``loads`` if the traceback failed in the codec (the worker's or ours), else ''.

    The worker's frames are those rebuilt in this process from its traceback.
    """
    step = ""
    while tb is not None:
        frame = tb.tb_frame
        rebuilt = frame.f_globals.get("__name__") == _errors.WORKER_FRAME_MODULE
        if rebuilt == worker and frame.f_code.co_filename == _CODEC:
            step = "loads" if "loads" in frame.f_code.co_name else "dumps"
        tb = tb.tb_next
    return step


def _only_machinery(exc: BaseException) -> bool:
    """Whether every frame of exc's traceback is the worker's own (the error is in the request)."""
    tb, files = exc.__traceback__, []
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    return bool(files) and all(_MACHINERY in f for f in files)


def _retold(exc: BaseException, message: str) -> BaseException:
    """An error of exc's type (or a PicklingError) saying ``message``, with exc as its context."""
    try:
        new = type(exc)(message)
    except Exception:
        new = pickle.PicklingError(message)
    new.__suppress_context__ = True
    new.__context__ = exc
    return new


def _plain(exc: BaseException) -> BaseException:
    """A request's own error (a missing name, source that does not compile), as one sentence.

    The worker's frames would show only the plugin's machinery, not the user's
    code: the report shows the user's call instead.
    """
    if isinstance(exc, SyntaxError) and str(exc.filename).startswith("<subworker-run-"):
        line = (exc.text or "").strip()
        return SyntaxError(
            f"the source given to subworker.run does not compile: {exc.msg} "
            f"(line {exc.lineno}: {line!r})"
        )
    exc.__traceback__ = exc.__cause__ = None
    exc.__suppress_context__ = True
    return exc


def _unsent(kind: Kind, args: tuple[Any, ...], exc: Exception) -> BaseException:
    """Say why a request could not be pickled: most often, ``call`` of a lambda."""
    fn = args[0] if kind == Kind.CALL else None
    try:
        pickle.dumps(fn, _codec.PROTOCOL)
    except Exception:
        return _retold(
            exc,
            f"subworker.call cannot send {getattr(fn, '__qualname__', fn)!r} to the worker: "
            "a function travels by reference, so it must be defined at the top level of "
            "a module (not a lambda, nor a function defined inside another)",
        )
    return _retold(
        exc,
        f"subworker.{kind.name.lower()} cannot send {_sent(kind)} to the worker: "
        f"pickle cannot pickle it ({type(exc).__name__}: {exc})",
    )


def _sent(kind: Kind) -> str:
    return "the value" if kind == Kind.STORE else "the function or its arguments"


def relay_output(reply: Reply) -> None:
    """Write the worker's output to ours, where pytest's capture sees it."""
    if reply.stdout:
        sys.stdout.write(reply.stdout)
    if reply.stderr:
        sys.stderr.write(reply.stderr)


class Subworker:
    """A handle on the worker of the current scope.

    Errors raised in the worker come back as their own type, with the worker's
    traceback chained as ``__cause__``; ``WorkerCrashed`` and ``WorkerTimeout``
    report its death, after which the next call gets a fresh worker.
    """

    def __init__(
        self, worker: Worker, after: Optional[Callable[[Worker, object], None]] = None
    ) -> None:
        self._worker = worker
        # Told of each request's error (None for none): it lists crashes, calls hooks.
        self._after = after

    @property
    def pid(self) -> Optional[int]:
        """The worker's pid (None until it has started)."""
        return self._worker.pid

    @property
    def alive(self) -> bool:
        """Whether the worker process is running."""
        return self._worker.alive

    def restart(self) -> None:
        """Replace the worker with a fresh process."""
        try:
            self._worker.restart()
        finally:
            self._done(None)

    def run(self, source: str, *, timeout: Optional[float] = None) -> None:
        """Execute ``source`` (dedented) in the worker's persistent namespace."""
        __tracebackhide__ = True
        if not isinstance(source, str):
            raise TypeError(f"source must be a str, not {type(source).__name__}")
        code, filename = _named(source)
        if filename not in linecache.cache:
            # The same lines the worker registers, so the parent's reports show them too.
            linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        self._request(Kind.RUN, (code, filename), timeout)

    def store(self, name: str, value: Any) -> None:
        """Bind ``value`` (moved by pickle) to ``name`` in the worker's namespace."""
        __tracebackhide__ = True
        self._request(Kind.STORE, (check_name(name), value), None)

    def load(self, name: str) -> Any:
        """Return the value bound to ``name`` in the worker's namespace (moved by pickle)."""
        __tracebackhide__ = True
        return self._request(Kind.LOAD, (check_name(name),), None)

    def call(
        self, fn: Callable[..., Any], /, *args: Any, timeout: Optional[float] = None, **kwargs: Any
    ) -> Any:
        """Call ``fn`` (pickled by reference) in the worker and return its result."""
        __tracebackhide__ = True
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        return self._request(Kind.CALL, (fn, args, kwargs), timeout)

    def _request(self, kind: Kind, args: tuple[Any, ...], timeout: Optional[float]) -> Any:
        __tracebackhide__ = True
        timeout = check_timeout(timeout)
        if self._after is not None:
            try:
                self._worker.start()
            finally:
                self._done(None)  # a worker that just started, before the request
        reply = None
        try:
            reply = self._worker.request(kind, args, timeout=timeout)
        except Exception as exc:
            if _pickling(exc.__traceback__, worker=False) != "dumps":
                raise
            raise _unsent(kind, args, exc) from None
        finally:
            self._done(None if reply is None else reply.error)
        relay_output(reply)
        if reply.error is not None:
            reply.error = self._readable(kind, reply.error)
        return reply.unwrap()

    @staticmethod
    def _readable(kind: Kind, error: BaseException) -> BaseException:
        """The request's error as the user can act on it: their call, and a sentence."""
        if isinstance(error, (WorkerCrashed, WorkerTimeout)):
            return error
        method, cause = f"subworker.{kind.name.lower()}", f"({type(error).__name__}: {error})"
        if _pickling(error.__traceback__, worker=False) == "loads":
            return _retold(error, f"{method}: the worker's answer cannot be unpickled here {cause}")
        step = _pickling(error.__traceback__, worker=True)
        if step == "loads":
            return _retold(error, f"{method}: the worker cannot unpickle {_sent(kind)} {cause}")
        if step == "dumps":
            return _retold(error, f"{method}: the worker cannot pickle its answer {cause}")
        return _plain(error) if _only_machinery(error) else error

    def _done(self, error: object) -> None:
        __tracebackhide__ = True
        if self._after is not None:
            self._after(self._worker, error)

    def __repr__(self) -> str:
        state = "alive" if self.alive else "not running"
        return f"<Subworker pid={self.pid} {state}>"
