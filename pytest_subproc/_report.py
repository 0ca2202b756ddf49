"""What the parent makes of a worker's outcome for pytest's report.

The body's warnings and log records are raised and logged again here; a
crash or timeout gets a traceback rebuilt from the worker's stack dump, so
the report points at the test's own line.
"""

from __future__ import annotations

import inspect
import logging
import re
import types
import warnings
from typing import Optional

import pytest

from pytest_subproc import _errors, _runbody
from pytest_subproc._spec import SPEC


def replay(result: _runbody.BodyResult) -> None:
    """Raise the body's warnings and log its records again here, where pytest collects them."""
    for module, qualname, message, filename, lineno in result.warnings:
        category = _errors.find_class(module, qualname)
        if not (isinstance(category, type) and issubclass(category, Warning)):
            category, message = UserWarning, f"{module}.{qualname}: {message}"
        warnings.warn_explicit(message, category, filename, lineno)
    for fields in result.records:
        record = logging.makeLogRecord(fields)
        logging.getLogger(record.name).handle(record)


def warn_return(item: pytest.Function, type_name: str) -> None:
    category = getattr(pytest, "PytestReturnNotNoneWarning", None)
    if category is not None:
        warnings.warn(
            category(
                f"Expected None, but {item.nodeid} returned a {type_name}, which will be an "
                "error in a future version of pytest.  Did you mean to use `assert` instead "
                "of `return`?"
            ),
            stacklevel=2,
        )


_FAULT_FRAME = re.compile(r'^\s*File "(?P<file>.*)", line (?P<line>\d+) in (?P<name>.*)$')


def _dump_threads(stack: str) -> list[list[tuple[str, int, str]]]:
    """Split a faulthandler dump into threads of (file, line, name), outermost first."""
    threads: list[list[tuple[str, int, str]]] = []
    for line in stack.splitlines():
        if line.startswith(("Thread 0x", "Current thread 0x")):
            threads.append([])
            continue
        match = _FAULT_FRAME.match(line)
        if match and threads:
            threads[-1].insert(0, (match["file"], int(match["line"]), match["name"]))
    return threads


def stack_traceback(stack: str, item: pytest.Function) -> Optional[types.TracebackType]:
    """Rebuild a traceback from the dumped thread that was running the test, if any."""
    path = item.stash[SPEC].module_path
    function = inspect.unwrap(item.obj)
    name = function.__name__
    first = getattr(getattr(function, "__code__", None), "co_firstlineno", 0)
    for frames in _dump_threads(stack):
        starts = [i for i, (f, _, n) in enumerate(frames) if f == path and n == name]
        if starts:
            frames = frames[starts[0] :]
            records = [
                (f, line, n, first if i == 0 else line) for i, (f, line, n) in enumerate(frames)
            ]
            return _errors.traceback_from(records)
    # No dump (a plain exit): point at the test function itself.
    return _errors.traceback_from([(path, first, name, first)])


def traceback_at_test(item: pytest.Item) -> Optional[types.TracebackType]:
    """Return a traceback at the test function itself, for an error of no line of its own.

    pytest's report then starts at the test, as it would for any failure,
    instead of showing the plugin's frames.
    """
    try:
        code = inspect.unwrap(item.obj).__code__  # type: ignore[attr-defined]
    except Exception:  # not a Python function
        return None
    first = code.co_firstlineno
    return _errors.traceback_from([(code.co_filename, first, code.co_name, first)])


def has_worker_frames(exc: BaseException) -> bool:
    """Whether exc's traceback runs through frames rebuilt from the worker's."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__") == _errors.WORKER_FRAME_MODULE:
            return True
        tb = tb.tb_next
    return False
