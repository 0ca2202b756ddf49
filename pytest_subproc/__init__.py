"""Run pytest test bodies in warm, scoped subprocess workers."""

from pytest_subproc._exceptions import (
    ChildTraceException,
    UnserializableException,
    WorkerCrashed,
    WorkerStartError,
    WorkerTimeout,
)
from pytest_subproc.hookspecs import WorkerInfo

__version__ = "0.1.0"

__all__ = [
    "ChildTraceException",
    "UnserializableException",
    "WorkerCrashed",
    "WorkerInfo",
    "WorkerStartError",
    "WorkerTimeout",
    "__version__",
]
