"""The ``subworker`` handle: the worker's RPC surface for a test to drive by hand."""

from __future__ import annotations

import functools
import hashlib
import linecache
import sys
import textwrap
from typing import Any, Callable, Optional

from pytest_subproc._child import check_name
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
        try:
            self._worker.start()
        finally:
            self._done(None)  # a worker that just started, before the request
        reply = None
        try:
            reply = self._worker.request(kind, args, timeout=timeout)
        finally:
            self._done(None if reply is None else reply.error)
        relay_output(reply)
        return reply.unwrap()

    def _done(self, error: object) -> None:
        __tracebackhide__ = True
        if self._after is not None:
            self._after(self._worker, error)

    def __repr__(self) -> str:
        state = "alive" if self.alive else "not running"
        return f"<Subworker pid={self.pid} {state}>"
