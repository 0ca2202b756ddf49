"""Every use of pytest's private API, in one place, for pytest 7, 8 and 9.

Worker side: counterparts of the built-in fixtures that act on the process a
test runs in, and assertion explanations outside a pytest session. Parent
side: the test function's own argument names and a monkeypatch's undo lists.
"""

from __future__ import annotations

import contextlib
import inspect
import marshal
import warnings
from collections.abc import Iterator
from typing import Any, Optional

import pytest

# Built-in fixtures whose value acts on the process the test runs in: the
# worker builds its own instead of receiving the parent's.
COUNTERPARTS = (
    "monkeypatch",
    "capsys",
    "capsysbinary",
    "capfd",
    "capfdbinary",
    "caplog",
    "recwarn",
    "request",
)


# The rewritten code of each test module pytest imported, marshalled, by path:
# a worker need not rewrite the module again.
_REWRITTEN: dict[str, bytes] = {}


def _kept(path: Any, code: Any) -> None:
    with contextlib.suppress(Exception):  # a code object marshal refuses: rewrite instead
        _REWRITTEN[str(path)] = marshal.dumps(code)


@contextlib.contextmanager
def rewritten_modules_kept() -> Iterator[None]:
    """Keep the code pytest's assertion rewriter produces or reads from its cache."""
    from _pytest.assertion import rewrite

    rewrite_test, read_pyc = rewrite._rewrite_test, rewrite._read_pyc

    def kept_rewrite(fn: Any, *args: Any, **kwargs: Any) -> Any:
        result = rewrite_test(fn, *args, **kwargs)
        _kept(fn, result[1])
        return result

    def kept_read(source: Any, *args: Any, **kwargs: Any) -> Any:
        code = read_pyc(source, *args, **kwargs)
        if code is not None:
            _kept(source, code)
        return code

    rewrite._rewrite_test, rewrite._read_pyc = kept_rewrite, kept_read
    try:
        yield
    finally:
        rewrite._rewrite_test, rewrite._read_pyc = rewrite_test, read_pyc


def rewritten_code(path: str) -> Optional[bytes]:
    """The marshalled rewritten code of the test module at ``path``, if pytest made it."""
    return _REWRITTEN.get(path)


def function_argnames(item: pytest.Function) -> tuple[str, ...]:
    """Return the names the test function itself takes (not autouse fixtures)."""
    return tuple(item._fixtureinfo.argnames)


def monkeypatch_targets(mp: pytest.MonkeyPatch) -> list[str]:
    """Describe the setattr/setitem/delattr patches a MonkeyPatch holds, bar os.environ."""
    import os

    found = []
    for obj, name, _ in getattr(mp, "_setattr", []):
        found.append(f"{getattr(obj, '__name__', type(obj).__name__)}.{name}")
    for mapping, key, _ in getattr(mp, "_setitem", []):
        if mapping is not os.environ:  # the environment is sent to the worker
            found.append(f"{type(mapping).__name__}[{key!r}]")
    return found


def _capture_fixture(kind: str) -> Any:
    from _pytest import capture

    classes = {
        "capsys": capture.SysCapture,
        "capsysbinary": capture.SysCaptureBinary,
        "capfd": capture.FDCapture,
        "capfdbinary": capture.FDCaptureBinary,
    }

    class WorkerCapture(capture.CaptureFixture):  # type: ignore[type-arg]
        @contextlib.contextmanager
        def disabled(self) -> Iterator[None]:
            """Let output through to the worker's own output while inside the block."""
            self._suspend()
            try:
                yield
            finally:
                self._resume()

    return WorkerCapture(classes[kind], None, _ispytest=True)  # type: ignore[arg-type]


@contextlib.contextmanager
def _capture(kind: str) -> Iterator[Any]:
    fixture = _capture_fixture(kind)
    fixture._start()
    try:
        yield fixture
    finally:
        fixture.close()


class _LogItem:
    """Just enough of an item for LogCaptureFixture: a stash with the handler."""

    def __init__(self, handler: Any) -> None:
        from _pytest import logging as plog

        self.stash = pytest.Stash()
        self.stash[plog.caplog_handler_key] = handler
        self.stash[plog.caplog_records_key] = {"setup": [], "call": handler.records, "teardown": []}


@contextlib.contextmanager
def _caplog() -> Iterator[Any]:
    from _pytest import logging as plog

    handler = plog.LogCaptureHandler()
    with plog.catching_logs(handler):
        fixture = plog.LogCaptureFixture(_LogItem(handler), _ispytest=True)  # type: ignore[arg-type]
        try:
            yield fixture
        finally:
            fixture._finalize()


@contextlib.contextmanager
def _recwarn() -> Iterator[Any]:
    recorder = pytest.WarningsRecorder(_ispytest=True)
    with recorder:
        warnings.simplefilter("default")
        yield recorder


@contextlib.contextmanager
def _monkeypatch() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def counterpart(kind: str) -> contextlib.AbstractContextManager[Any]:
    """Return a context manager giving the worker-side counterpart of a built-in fixture."""
    if kind in ("capsys", "capsysbinary", "capfd", "capfdbinary"):
        return _capture(kind)
    factories = {"caplog": _caplog, "recwarn": _recwarn, "monkeypatch": _monkeypatch}
    return factories[kind]()


class _ExplanationConfig:
    """The part of pytest's Config that assertion explanations read."""

    def __init__(self, verbosity: int) -> None:
        self.verbosity = verbosity

    def getoption(self, name: str, default: Any = None) -> Any:
        return self.verbosity if name == "verbose" else default

    def get_verbosity(self, verbosity_type: Any = None) -> int:
        return self.verbosity

    def getini(self, name: str) -> Any:
        return None

    def get_terminal_writer(self) -> _PlainWriter:
        return _PlainWriter()


class _PlainWriter:
    """A terminal writer that highlights nothing: explanations travel as plain text."""

    def _highlight(self, source: str, lexer: str = "python") -> str:
        return source


def _comparer(util: Any, verbosity: int) -> Any:
    """Return compare(op, left, right) -> lines, for the running pytest's signature."""
    if "config" in inspect.signature(util.assertrepr_compare).parameters:
        config = _ExplanationConfig(verbosity)  # pytest 7 to 9.1 read a Config
        return lambda op, left, right: util.assertrepr_compare(config, op, left, right)
    plain = getattr(util, "dummy_highlighter", _PlainWriter()._highlight)

    def compare(op: str, left: object, right: object) -> list[str]:
        return list(
            util.assertrepr_compare(
                op,
                left,
                right,
                verbose=verbosity,
                highlighter=plain,
                assertion_text_diff_style="ndiff",  # the ini key's default
            )
        )

    return compare


def install_assert_explanations(verbosity: int) -> None:
    """Make rewritten asserts explain comparisons (list and dict diffs) as under pytest."""
    from _pytest.assertion import util

    if getattr(util._reprcompare, "verbosity", None) == verbosity:
        return  # installed by an earlier test in this worker
    compare = _comparer(util, verbosity)

    def explain(op: str, left: object, right: object) -> Any:
        try:
            lines = compare(op, left, right)
        except Exception:  # an explanation must never replace the assertion itself
            return None
        if not lines:
            return None
        return "\n~".join(line.replace("\n", "\\n") for line in lines).replace("%", "%%")

    explain.verbosity = verbosity  # type: ignore[attr-defined]
    util._reprcompare = explain
