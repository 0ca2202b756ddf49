"""Run pytest tests in warm, scoped subprocess workers.

PYTEST_DONT_REWRITE: the worker template imports this package before it
configures pytest, which would otherwise warn that it cannot rewrite it
(an error under ``filterwarnings = error``).
"""

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
