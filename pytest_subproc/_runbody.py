"""Worker side of a marked test: import its module as pytest would, call its body.

The parent sends a BodySpec through a CALL request naming ``run_body``; this
module then lives in the worker. It imports pytest, but never the parent-side
modules.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import inspect
import logging
import marshal
import pickle
import sys
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest

from pytest_subproc import _compat, _errors

# Taken at import: a body that replaces pickle.loads must not break the tests after it.
_loads = pickle.loads


@dataclass(frozen=True)
class CallSpecFacts:
    """The parameters of a parametrized test."""

    params: dict[str, Any]


@dataclass(frozen=True)
class NodeFacts:
    """The read-only facts of the test item."""

    name: str
    nodeid: str
    keywords: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    markers: tuple[tuple[str, tuple[Any, ...], dict[str, Any]], ...] = ()

    @property
    def callspec(self) -> CallSpecFacts:
        """The parameters of a parametrized test (AttributeError otherwise, as in pytest)."""
        if not self.params:
            raise AttributeError("callspec: the test is not parametrized")
        return CallSpecFacts(self.params)

    def iter_markers(self, name: Optional[str] = None) -> Iterator[pytest.Mark]:
        """Yield the item's markers, closest first, as pytest.Mark objects."""
        for mark_name, args, kwargs in self.markers:
            if name is None or mark_name == name:
                yield pytest.Mark(mark_name, args, kwargs, _ispytest=True)

    def get_closest_marker(self, name: str, default: Any = None) -> Any:
        """Return the closest marker of that name, or ``default``."""
        return next(self.iter_markers(name), default)


@dataclass(frozen=True)
class ConfigFacts:
    """The command-line option values of the run."""

    options: dict[str, Any] = field(default_factory=dict)

    def getoption(self, name: str, default: Any = None, skip: bool = False) -> Any:
        """Return an option's value, as Config.getoption does."""
        name = name.lstrip("-").replace("-", "_")
        if name in self.options:
            return self.options[name]
        if skip:
            pytest.skip(f"no {name!r} option found")
        if default is not None:
            return default
        raise ValueError(f"no option named {name!r}")


@dataclass(frozen=True)
class RequestFacts:
    """What a test body may read from pytest's ``request``."""

    node: NodeFacts
    config: ConfigFacts

    @property
    def keywords(self) -> dict[str, bool]:
        return dict.fromkeys(self.node.keywords, True)


@dataclass(frozen=True)
class BodySpec:
    """What the worker needs to run one test body."""

    module_name: str
    module_path: str
    qualname: str
    # Fixture values, pickled one by one in the parent so a failure names the fixture.
    values: dict[str, bytes] = field(default_factory=dict)
    # Built-in fixtures that act on the running process get worker-side counterparts.
    builtins: dict[str, str] = field(default_factory=dict)
    request: Optional[RequestFacts] = None
    verbosity: int = 0
    # The test's class instance as the parent set it up, pickled, if it could be.
    instance: Optional[bytes] = None
    # The parent's root logger level during the call, which pytest may have lowered.
    log_level: int = logging.WARNING


def _rewritten_code(path: str) -> types.CodeType:
    with open(path, "rb") as f:
        source = f.read()
    tree = ast.parse(source, filename=path)
    from _pytest.assertion.rewrite import rewrite_asserts

    rewrite_asserts(tree, source, path)
    code: types.CodeType = compile(tree, path, "exec", dont_inherit=True)
    return code


def import_test_module(name: str, path: str, code: Optional[bytes] = None) -> types.ModuleType:
    """Import the test module under the parent's name, with pytest's assertion rewriting.

    ``code`` is the parent's own rewritten module code, marshalled, if it has
    it: rewriting a module costs far more than running it.
    """
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__file__", None) == path:
        return module
    package = name.rpartition(".")[0]
    if package:
        # Relative imports in the test module need its package imported first.
        with contextlib.suppress(ImportError):
            importlib.import_module(package)
    spec = importlib.util.spec_from_file_location(name, path)
    module = types.ModuleType(name)
    module.__file__ = path
    module.__spec__ = spec
    module.__package__ = package
    sys.modules[name] = module
    try:
        exec(marshal.loads(code) if code else _rewritten_code(path), module.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def resolve(module: types.ModuleType, qualname: str, instance: Optional[bytes] = None) -> Any:
    """Find the test function; a method is bound to the parent's instance, or a fresh one.

    The parent's instance carries what setup_method and class fixtures set on
    it; a fresh one stands in when it could not be pickled.
    """
    owner: Any = module
    *classes, name = qualname.split(".")
    for cls_name in classes:
        owner = getattr(owner, cls_name)
    if classes:
        owner = _loads(instance) if instance is not None else owner()
    return getattr(owner, name)


def _counterparts(spec: BodySpec, stack: contextlib.ExitStack) -> dict[str, Any]:
    made: dict[str, Any] = {}
    for argname, kind in spec.builtins.items():
        if kind == "request":
            made[argname] = spec.request
        else:
            made[argname] = stack.enter_context(_compat.counterpart(kind))
    return made


# A warning the body raised: (category module, category qualname, message, file, line).
WarningRow = tuple[str, str, str, str, int]


@dataclass(frozen=True)
class BodyResult:
    """What a body left for the parent: its error, warnings and log records."""

    # The type name of a value the body returned (pytest warns about those).
    returned: Optional[str] = None
    # The body's exception, serialized by _errors.dump_exception.
    error: Optional[bytes] = None
    warnings: tuple[WarningRow, ...] = ()
    # Log records as logging.makeLogRecord() takes them.
    records: tuple[dict[str, Any], ...] = ()


# The LogRecord attributes that travel; args are merged into msg first.
_RECORD_FIELDS = (
    "name", "levelno", "levelname", "pathname", "filename", "module", "lineno",
    "funcName", "created", "msecs", "relativeCreated", "thread", "threadName",
    "process", "processName", "exc_text", "stack_info",
)  # fmt: skip


class _Records(logging.Handler):
    """Keeps every record the body logs, in a form that pickles."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.kept: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        kept = {name: getattr(record, name, None) for name in _RECORD_FIELDS}
        kept["msg"] = self.format_message(record)
        if record.exc_info and not record.exc_text:
            kept["exc_text"] = logging.Formatter().formatException(record.exc_info)
        self.kept.append(kept)

    @staticmethod
    def format_message(record: logging.LogRecord) -> str:
        try:
            return record.getMessage()
        except Exception as exc:  # a bad format string must not break the test run
            return f"{record.msg!r} (could not format {record.args!r}: {exc})"


_RECORDS = _Records()  # one handler for every body: making one costs a lock and more


@contextlib.contextmanager
def _observed(log_level: int) -> Iterator[tuple[list[warnings.WarningMessage], _Records]]:
    """Record the warnings and log records of a body, as pytest does in-process."""
    root, saved_level = logging.getLogger(), logging.getLogger().level
    _RECORDS.kept = []
    root.addHandler(_RECORDS)
    if saved_level != log_level:  # setLevel clears every logger's cache
        root.setLevel(log_level)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # the parent's filters decide, not ours
            yield caught, _RECORDS
    finally:
        root.removeHandler(_RECORDS)
        if root.level != saved_level:
            root.setLevel(saved_level)


def _warning_rows(
    caught: list[warnings.WarningMessage],
) -> tuple[tuple[str, str, str, str, int], ...]:
    return tuple(
        (w.category.__module__, w.category.__qualname__, str(w.message), w.filename, w.lineno)
        for w in caught
    )


def unsendable(values: dict[str, bytes]) -> dict[str, str]:
    """Try to rebuild each fixture value here; return why each that fails did."""
    failed = {}
    for name, data in values.items():
        try:
            _loads(data)
        except Exception as exc:
            failed[name] = f"{type(exc).__name__}: {exc}"
    return failed


def _call(spec: BodySpec, code: Optional[bytes]) -> Optional[str]:
    _compat.install_assert_explanations(spec.verbosity)
    module = import_test_module(spec.module_name, spec.module_path, code)
    function = resolve(module, spec.qualname, spec.instance)
    kwargs = {name: _loads(data) for name, data in spec.values.items()}
    with contextlib.ExitStack() as stack:
        kwargs.update(_counterparts(spec, stack))
        result = function(**kwargs)
    if result is None or inspect.iscoroutine(result):
        return None
    return type(result).__name__


def run_body(spec: BodySpec, code: Optional[bytes] = None) -> Optional[BodyResult]:
    """Run one test body; what it raised travels inside the result, beside its logs.

    None stands for a body that passed and left nothing to report, the most
    common result and the cheapest to send.
    """
    returned, error = None, None
    with _observed(spec.log_level) as (caught, records):
        try:
            returned = _call(spec, code)
        except BaseException as exc:  # every outcome goes back, skip and exit included
            error = _errors.dump_exception(exc)
    if returned is None and error is None and not caught and not records.kept:
        return None
    return BodyResult(returned, error, _warning_rows(caught), tuple(records.kept))
