"""What the parent makes of a worker's outcome for pytest's report.

The warnings a phase recorded in the worker are raised again here, for the
warnings summary; a crash or timeout gets a traceback rebuilt from the
worker's stack dump, so the report points at the test's own line.
"""

from __future__ import annotations

import inspect
import linecache
import re
import types
import warnings
from collections.abc import Iterable
from typing import Any, Optional

from pytest_subproc import _errors


def replay(rows: Iterable[tuple[str, str, str, str, int]]) -> None:
    """Raise the warnings a phase recorded in the worker again here, where pytest collects them."""
    for module, qualname, message, filename, lineno in rows:
        category = _errors.find_class(module, qualname)
        if not (isinstance(category, type) and issubclass(category, Warning)):
            category, message = UserWarning, f"{module}.{qualname}: {message}"
        warnings.warn_explicit(message, category, filename, lineno)


def add_attrs(report: Any, attrs: Iterable[tuple[str, Any]]) -> None:
    """Give pytest's report what plugins set on the worker's report of the same phase.

    The same plugins' hooks made pytest's own report, but without the test's
    fixtures, which only the worker had: the worker's value wins. A list
    keeps, after the worker's entries, those only pytest's process added.
    """
    for name, value in attrs:
        mine = getattr(report, name, None)
        if isinstance(mine, list) and isinstance(value, list):
            value = value + [entry for entry in mine if entry not in value]
        setattr(report, name, value)


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


def stack_traceback(stack: str, path: str, name: str, first: int) -> Optional[types.TracebackType]:
    """Rebuild a traceback from the dumped thread that was running the test, if any.

    ``path``, ``name`` and ``first`` say where the test function is.
    """
    for frames in _dump_threads(stack):
        starts = [i for i, (f, _, n) in enumerate(frames) if f == path and n == name]
        if starts:
            frames = frames[starts[0] :]
            records = [
                (f, line, n, first if i == 0 else _def_line(f, line, n))
                for i, (f, line, n) in enumerate(frames)
            ]
            return _errors.traceback_from(records)
    # No dump (a plain exit): point at the test function itself.
    return _errors.traceback_from([(path, first, name, first)])


def _def_line(path: str, line: int, name: str) -> int:
    """The line of ``def name`` above ``line`` (a dump tells no first line), else ``line``.

    So the report shows a helper's source from its ``def``, with its name.
    """
    lines = linecache.getlines(path)
    header = re.compile(rf"\s*(async\s+)?def\s+{re.escape(name)}\b")
    for number in range(min(line, len(lines)), 0, -1):
        if header.match(lines[number - 1]):
            return number
    return line


def where(item: Any) -> tuple[str, str, int]:
    """The file, function name and first line a report about a test points at."""
    function = inspect.unwrap(getattr(item, "obj", None) or (lambda: None))
    code = getattr(function, "__code__", None)
    if code is not None and hasattr(item, "obj"):
        return code.co_filename, function.__name__, code.co_firstlineno
    path, line, _ = item.reportinfo()
    return str(path), item.name, (line or 0) + 1


def traceback_at_test(item: Any) -> Optional[types.TracebackType]:
    """Return a traceback at the test function itself, for an error of no line of its own.

    pytest's report then starts at the test, as it would for any failure,
    instead of showing the plugin's frames.
    """
    path, name, first = where(item)
    return _errors.traceback_from([(path, first, name, first)])


def has_worker_frames(exc: BaseException) -> bool:
    """Whether exc's traceback runs through frames rebuilt from the worker's."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__") == _errors.WORKER_FRAME_MODULE:
            return True
        tb = tb.tb_next
    return False
