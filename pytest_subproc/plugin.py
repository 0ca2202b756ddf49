"""What pytest sees: options, ini keys, the marker, fixtures and hooks."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Generator, Iterator
from typing import Any, Optional

import pytest

from pytest_subproc import _compat, _dispatch, _events, _report, _settings, _spec, _summary
from pytest_subproc._dispatch import Runtime
from pytest_subproc._exceptions import ChildTraceException, WorkerStartError
from pytest_subproc._process import Worker
from pytest_subproc._subworker import Subworker

RUNTIME = pytest.StashKey[Runtime]()


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pytest_subproc import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("subprocess", "subprocess-isolated tests")
    group.addoption(
        "--subprocess", action="store_true", dest="subprocess_all", help=_settings.ALL_HELP
    )
    group.addoption("--subprocess-scope", dest="subprocess_scope", help=_settings.SCOPE_HELP)
    group.addoption("--subprocess-timeout", dest="subprocess_timeout", help=_settings.TIMEOUT_HELP)
    group.addoption(
        "--subprocess-start",
        dest="subprocess_start",
        choices=("fork", "spawn"),
        help=_settings.START_HELP,
    )
    group.addoption(
        "--subprocess-preload",
        action="append",
        dest="subprocess_preload",
        metavar="MODULE",
        help=_settings.PRELOAD_HELP + " Repeatable; added to the ini's.",
    )
    # Parsed by _settings, so a bad value is a usage error naming the key.
    parser.addini("subprocess_all", _settings.ALL_INI_HELP, default="")
    parser.addini("subprocess_scope", _settings.SCOPE_HELP, default="")
    parser.addini("subprocess_timeout", _settings.TIMEOUT_HELP, default="")
    parser.addini("subprocess_start", _settings.START_HELP, default="")
    parser.addini("subprocess_preload", _settings.PRELOAD_HELP, type="args", default=[])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", _settings.MARKER_HELP)
    config.stash[RUNTIME] = Runtime.from_config(config)
    _settings.check_preload(config.stash[RUNTIME].defaults.preload)
    # Workers reuse the test modules' rewritten code instead of rewriting them again.
    kept = contextlib.ExitStack()
    kept.enter_context(_compat.rewritten_modules_kept())
    config.add_cleanup(kept.close)


def pytest_unconfigure(config: pytest.Config) -> None:
    runtime = config.stash.get(RUNTIME, None)
    if runtime is not None:
        live = list(runtime.live)
        runtime.close_all()
        for worker in live:
            _events.announce(config, worker)


def pytest_itemcollected(item: pytest.Item) -> None:
    # The first test that will need a worker starts the template, which then
    # imports pytest while the rest of the suite is collected.
    runtime = item.config.stash[RUNTIME]
    if runtime.template is None and (
        runtime.defaults.isolate_all or item.get_closest_marker(_settings.MARKER) is not None
    ):
        # Only a head start: a template that cannot start fails the tests that
        # need a worker, when they run, not the whole collection.
        with contextlib.suppress(WorkerStartError, OSError):
            runtime.warm_up()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    runtime = config.stash[RUNTIME]
    for item in items:
        runtime.prepare(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    if _dispatch.UNSHIPPED in item.stash:
        _warn_unshipped(item, item.stash[_dispatch.UNSHIPPED])
    result = yield
    if _is_isolated(item):
        assert isinstance(item, pytest.Function)
        item.stash[_spec.SPEC] = _spec.build_spec(item, item.config.stash[RUNTIME].verbosity)
        runtime = item.config.stash[RUNTIME]
        try:
            runtime.check_values(item)
        finally:
            _events.announce_for(item, runtime)
        _spec.warn_parent_patches(item)
    return result


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Optional[bool]:
    if not _is_isolated(pyfuncitem):
        return None
    runtime = pyfuncitem.config.stash[RUNTIME]
    try:
        runtime.start(pyfuncitem)
        _events.announce_for(pyfuncitem, runtime)  # a worker just started: before the body
        runtime.run(pyfuncitem)
    finally:
        # Not needed again; kept for every test of a run, the specs would be
        # a tenth of the heap the garbage collector walks.
        del pyfuncitem.stash[_spec.SPEC]
        _events.announce_for(pyfuncitem, runtime)
    return True


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # The report shows the worker's frames natively; the chained worker
    # traceback would only repeat them, so it is left out of the report
    # (and kept on the exception for whoever inspects it).
    exc = call.excinfo.value if call.excinfo is not None and _is_isolated(item) else None
    cause = exc.__cause__ if exc is not None and _report.has_worker_frames(exc) else None
    if isinstance(cause, ChildTraceException):
        exc.__cause__ = None  # type: ignore[union-attr]
    try:
        report = yield
    finally:
        if isinstance(cause, ChildTraceException):
            exc.__cause__ = cause  # type: ignore[union-attr]
    _summary.shorten_report(report, None if call.excinfo is None else call.excinfo.value)
    return report


def _warn_unshipped(item: pytest.Item, warning: Warning) -> None:
    """Warn that a marked test runs here; where the filters make that an error, it is the test's."""
    __tracebackhide__ = True
    try:
        item.warn(warning)
    except Warning as exc:
        raise exc.with_traceback(_report.traceback_at_test(item)) from None


def _is_isolated(item: pytest.Item) -> bool:
    settings = item.stash.get(_dispatch.SETTINGS, None)
    return settings is not None and settings.isolated


def _scoped_worker(request: pytest.FixtureRequest) -> Iterator[Worker]:
    runtime = request.config.stash[RUNTIME]
    try:
        worker = runtime.new_worker(request.node, request.scope)
    except (WorkerStartError, OSError) as exc:
        # The error of the test that asked for the worker, shown there.
        raise runtime.start_failed(request._pyfuncitem, exc) from None
    _events.serves(worker, request.scope)
    try:
        yield worker
    finally:
        try:
            runtime.retire(worker, request.node.nodeid)
        finally:
            _events.announce(request.config, worker)


@pytest.fixture(scope="session")
def _subprocess_worker_session(request: pytest.FixtureRequest) -> Iterator[Worker]:
    yield from _scoped_worker(request)


@pytest.fixture(scope="module")
def _subprocess_worker_module(request: pytest.FixtureRequest) -> Iterator[Worker]:
    yield from _scoped_worker(request)


@pytest.fixture
def _subprocess_worker_function(request: pytest.FixtureRequest) -> Iterator[Worker]:
    yield from _scoped_worker(request)


@pytest.fixture
def subworker(request: pytest.FixtureRequest) -> Subworker:
    """A handle on the subprocess worker of this test's scope (module by default)."""
    settings = request.node.stash.get(_dispatch.SETTINGS, None)
    if settings is None:
        settings = _settings.for_item(request.node, request.config.stash[RUNTIME].defaults)
    worker = request.getfixturevalue(_dispatch.worker_fixture(settings.scope))
    runtime = request.config.stash[RUNTIME]
    return Subworker(worker, after=functools.partial(_events.after_request, request.node, runtime))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    runtime = terminalreporter.config.stash.get(RUNTIME, None)
    if runtime is not None:
        _summary.write(terminalreporter, runtime)


@pytest.hookimpl(trylast=True)  # after the session's workers have been retired
def pytest_sessionfinish(session: pytest.Session) -> None:
    runtime = session.config.stash.get(RUNTIME, None)
    if runtime is not None:
        _summary.send(session.config, runtime)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    runtime = node.config.stash.get(RUNTIME, None)
    if runtime is not None:
        _summary.receive(runtime, node)
