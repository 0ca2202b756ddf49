"""The exceptions a user of pytest_subproc can see and catch."""

from __future__ import annotations

from typing import Optional


class ChildTraceException(Exception):
    """The worker's formatted traceback, chained as ``__cause__`` of a revived exception."""


class UnserializableException(Exception):
    """Stands in for a worker exception whose type could not be revived in the parent.

    ``type_name`` is the dotted name of the original type, ``args_repr`` the repr of
    its args and ``message`` its ``str()``.
    """

    def __init__(self, type_name: str, args_repr: str, message: str) -> None:
        super().__init__(type_name, args_repr, message)
        self.type_name = type_name
        self.args_repr = args_repr
        self.message = message

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}" if self.message else self.type_name


class WorkerStartError(RuntimeError):
    """The worker process could not start; ``output`` holds what it printed."""

    def __init__(self, message: str, *, exitcode: Optional[int] = None, output: str = "") -> None:
        super().__init__(message)
        self.exitcode = exitcode
        self.output = output


class WorkerCrashed(RuntimeError):
    """The worker process died while it was serving a request.

    ``exitcode`` is the raw status (negative for a signal), ``signal`` the signal's
    name or ``None``, ``stack`` the worker's faulthandler dump and ``output`` the
    tail of what it wrote to stderr.
    """

    def __init__(
        self,
        message: str,
        *,
        pid: int,
        exitcode: Optional[int],
        signal: Optional[str] = None,
        stack: str = "",
        output: str = "",
    ) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.signal = signal
        self.stack = stack
        self.output = output


class WorkerTimeout(TimeoutError):
    """A request ran past its timeout; ``stack`` is every worker thread's stack at that moment."""

    def __init__(self, message: str, *, pid: int, timeout: float, stack: str = "") -> None:
        super().__init__(message)
        self.pid = pid
        self.timeout = timeout
        self.stack = stack


# Printed and pickled by the name users import them by, not by this private module.
for _public in (
    ChildTraceException,
    UnserializableException,
    WorkerStartError,
    WorkerCrashed,
    WorkerTimeout,
):
    _public.__module__ = "pytest_subproc"
del _public
