"""What pytest sees: options, ini keys, the marker, fixtures and hooks."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Generator
from typing import Any, Optional

import pytest

from pytest_subproc import (
    _compat,
    _coverage,
    _debugging,
    _dispatch,
    _events,
    _interrupts,
    _report,
    _settings,
    _summary,
    _worker_items,
)
from pytest_subproc._dispatch import Runtime
from pytest_subproc._exceptions import ChildTraceException, WorkerStartError
from pytest_subproc._subworker import Subworker
from pytest_subproc._template import Template

RUNTIME = pytest.StashKey[Runtime]()
# A template started before pytest configured itself, until the runtime takes it.
EARLY = pytest.StashKey[Template]()


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


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    # The earliest the options are known: a template every test will need
    # starts now, while this process loads conftest modules.
    if not _worker_items.in_worker():
        template = _dispatch.early_template(early_config)
        if template is not None:
            early_config.stash[EARLY] = template


@pytest.hookimpl(trylast=True)  # after tmp_path's and the cache's own, which workers share
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", _settings.MARKER_HELP)
    # In a worker, tests run where they are: nothing is routed further.
    if getattr(config.option, _worker_items.IN_WORKER, False):
        return
    config.stash[RUNTIME] = runtime = Runtime.from_config(config)
    runtime.early = config.stash.get(EARLY, None)
    if EARLY in config.stash:
        del config.stash[EARLY]
    _settings.check_preload(runtime.defaults.preload)
    # Debuggers and interrupts reach into the workers.
    runtime.pauser = _debugging.TerminalLender(config)
    _debugging.register(config, runtime.worker_of)
    config.pluginmanager.register(
        _interrupts.ThreadTimeout(_is_isolated, runtime.worker_of), "pytest_subproc-thread-timeout"
    )
    if (
        runtime.defaults.isolate_all
        and not _settings.runs_no_test(config.option)
        and not _compat.xdist_controller(config, config.option)
    ):
        # Every test needs a worker: the template configures pytest while
        # this process collects.
        _warm_up(runtime)


def _runtime(config: pytest.Config) -> Optional[Runtime]:
    return config.stash.get(RUNTIME, None)


def _warm_up(runtime: Runtime) -> None:
    # Only a head start: a template that cannot start fails the tests that
    # need a worker, when they run, not the whole collection.
    with contextlib.suppress(WorkerStartError, OSError):
        runtime.warm_up()


def pytest_unconfigure(config: pytest.Config) -> None:
    early = config.stash.get(EARLY, None)
    if early is not None:  # pytest_configure failed before the runtime took it
        early.close()
    runtime = _runtime(config)
    if runtime is not None:
        runtime.close_all()
        _coverage.combine_leftovers(config)  # the workers are gone: their data is all written
        _events.announce_all(config, runtime)


def pytest_itemcollected(item: pytest.Item) -> None:
    # The first test that will need a worker starts the template, which then
    # imports pytest and configures it while the rest of the suite is collected.
    runtime = _runtime(item.config)
    if (
        runtime is not None
        and runtime.template is None
        and (runtime.defaults.isolate_all or item.get_closest_marker(_settings.MARKER) is not None)
        and not _settings.runs_no_test(item.config.option)
    ):
        _warm_up(runtime)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    runtime = _runtime(config)
    if runtime is not None:
        for item in items:
            runtime.prepare(item)


def pytest_collection_finish(session: pytest.Session) -> None:
    # A template started for tests that were then deselected (-k, -m) has
    # nothing to serve: it ends now rather than idle through the run.
    runtime = _runtime(session.config)
    if runtime is None or (runtime.template is None and runtime.early is None):
        return
    if not any(_is_isolated(item) or _dispatch.drives_worker(item) for item in session.items):
        runtime.close_templates()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: Optional[pytest.Item]
) -> Generator[None, object, object]:
    # Known before the setup: the worker runs the teardown ahead, keeping
    # what the next test it runs needs set up.
    runtime = _runtime(item.config)
    if runtime is None or not _is_isolated(item):
        return (yield)
    item.stash[_dispatch.NEXT] = nextitem
    runtime.send_early(item)
    try:
        result = yield
    except BaseException:
        runtime.abandon(item, interrupted=True)
        raise
    runtime.abandon(item, interrupted=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    try:
        return (yield)
    finally:
        _announce(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    try:
        return (yield)
    finally:
        _announce(item)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(
    item: pytest.Item, nextitem: Optional[pytest.Item]
) -> Generator[None, None, None]:
    # The item's worker keeps what the next test it runs needs set up.
    if _is_isolated(item):
        item.stash[_dispatch.NEXT] = nextitem
    try:
        return (yield)
    finally:
        _announce(item)


def _announce(item: pytest.Item) -> None:
    """Call the plugin's hooks for the workers a test's phase started, ended or lost."""
    runtime = _runtime(item.config)
    if runtime is not None and (
        runtime.crashed or runtime.retired or any(w.events for w in runtime.live)
    ):
        _events.announce_all(item.config, runtime)


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


# pytest takes only names that start with pytest_ for hooks.
@pytest.hookimpl(specname="pytest_runtest_makereport", wrapper=True, tryfirst=True)
def pytest_runtest_makereport_attrs(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    # After every other plugin's wrapper: what theirs left unset is the worker's.
    attrs = item.stash.get(_dispatch.REPORT_ATTRS, None)
    if attrs is not None:
        del item.stash[_dispatch.REPORT_ATTRS]
        _report.add_attrs(report, attrs)
    return report


def _is_isolated(item: pytest.Item) -> bool:
    settings = item.stash.get(_dispatch.SETTINGS, None)
    return settings is not None and settings.isolated


@pytest.fixture
def subworker(request: pytest.FixtureRequest) -> Subworker:
    """A handle on the subprocess worker of this test's scope (module by default)."""
    runtime = request.config.stash[RUNTIME]
    settings = request.node.stash.get(_dispatch.SETTINGS, None)
    if settings is None:
        settings = _settings.for_item(request.node, runtime.defaults)
    by_request = request if settings.scope == "function" else None
    worker = runtime.worker_for(request.node, settings.scope, by_request)
    after = functools.partial(_events.after_request, request.node, runtime)
    return Subworker(worker, after=after)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    runtime = _runtime(terminalreporter.config)
    if runtime is not None:
        _summary.write(terminalreporter, runtime)


@pytest.hookimpl(trylast=True)  # after the session's workers have been retired
def pytest_sessionfinish(session: pytest.Session) -> None:
    runtime = _runtime(session.config)
    if runtime is not None:
        _summary.send(session.config, runtime)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    runtime = node.config.stash.get(RUNTIME, None)
    if runtime is not None:
        _summary.receive(runtime, node)
