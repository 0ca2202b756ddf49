"""Runs in the worker (and in the template it is forked from): pytest, and each phase of an item.

Its peer in the pytest process is ``_dispatch``, which calls ``run_phase``
through a CALL request. The worker holds a pytest configuration made like
the parent's (same arguments, ini file, plugins and conftest modules), with
the plugins that only make sense once per run turned off. It collects each
item's file once, then runs the item's setup, call and teardown through
pytest's own hooks, so fixtures of every scope are cached per worker as
pytest caches them. It never imports the parent-side modules.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import pytest

from pytest_subproc import _compat, _errors, _worker_coverage, _worker_debugging

# Set on a worker's options, so the plugin knows not to route anything there.
IN_WORKER = "subprocess_in_worker"
# Appended to the parent's arguments: output goes to the worker's own capture
# files, which the parent reads per request. (No plugin is blocked with -p:
# its ini keys would become unknown, an error under --strict-config.)
_EXTRA_ARGS = ("--capture=no",)
# Options that act once per run, in the parent: off in a worker. (--pdb and
# --trace stay on: the worker debugs its own tests, see _worker_debugging.)
_OFF: dict[str, Any] = {
    "xmlpath": None,
    "lf": False,
    "failedfirst": False,
    "newfirst": False,
    "stepwise": False,
    "stepwise_skip": False,
    "cacheclear": False,
    "numprocesses": None,
    "maxprocesses": None,
    "dist": "no",
    "tx": [],
    "looponfail": False,
    "keyword": "",
    "markexpr": "",
    "deselect": [],
    "collectonly": False,
    "log_file": os.devnull,  # the parent's log file, which a worker would truncate
    "reruns": 0,
    "htmlpath": None,
}


@dataclass(frozen=True)
class ConfigSpec:
    """How the parent was configured: what a worker needs to configure pytest alike."""

    args: tuple[str, ...]
    dir: str
    path: tuple[str, ...]
    basetemp: Optional[str] = None
    cachedir: Optional[str] = None
    # The parent's junitxml family, if it writes a junitxml report.
    junit_family: Optional[str] = None

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        # It goes with every request and is read once per worker: pickled
        # once here, and unpickled there only when it is not the last one.
        return _spec, (self._pickled,)

    @cached_property
    def _pickled(self) -> bytes:
        return pickle.dumps(tuple(getattr(self, f.name) for f in fields(self)))


_LAST_SPEC: tuple[bytes, ConfigSpec] = (b"", ConfigSpec((), "", ()))


def _spec(pickled: bytes) -> ConfigSpec:
    global _LAST_SPEC
    if _LAST_SPEC[0] != pickled:
        _LAST_SPEC = (pickled, ConfigSpec(*pickle.loads(pickled)))
    return _LAST_SPEC[1]


# A warning a phase recorded: (category module, category qualname, message, file, line).
WarningRow = tuple[str, str, str, str, int]


@dataclass(frozen=True)
class PhaseResult:
    """What a phase left for the parent's report, beside its output."""

    # The phase's exception, serialized by _errors.dump_exception.
    error: Optional[bytes] = None
    # A failure of an item that renders its own (a doctest's), as pytest shows it.
    text: Optional[str] = None
    sections: tuple[tuple[str, str, str], ...] = ()
    properties: tuple[tuple[str, Any], ...] = ()
    warnings: tuple[WarningRow, ...] = ()
    # What record_xml_attribute and record_testsuite_property recorded:
    # ("attribute" or "suite", name, value).
    junit: tuple[tuple[str, str, str], ...] = ()
    # What plugins set on the phase's report beyond pytest's own fields
    # (pytest-html's extras, say), as (name, value).
    report_attrs: tuple[tuple[str, Any], ...] = ()


class _Recorder:
    """A worker-side plugin: keeps the warnings pytest records during a phase."""

    def __init__(self) -> None:
        self.rows: list[WarningRow] = []

    def pytest_warning_recorded(self, warning_message: warnings.WarningMessage) -> None:
        category = warning_message.category
        self.rows.append(
            (
                category.__module__,
                category.__qualname__,
                str(warning_message.message),
                warning_message.filename,
                warning_message.lineno,
            )
        )


class _JunitStandIn:
    """Stands for the parent's junitxml report: what tests record there is sent back."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.records: list[tuple[str, str, str]] = []

    def node_reporter(self, report: Any) -> _JunitStandIn:
        return self  # every record belongs to the test whose phase is running

    def add_attribute(self, name: str, value: object) -> None:
        self.records.append(("attribute", str(name), str(value)))

    def add_global_property(self, name: str, value: object) -> None:
        self.records.append(("suite", str(name), str(value)))


@dataclass(frozen=True)
class _Started:
    """An item's protocol entered ahead of its setup: what that printed, or raised."""

    nodeid: str
    out: str
    err: str
    error: Any  # an ExceptionInfo, if entering raised


class _State:
    """The worker's pytest: its config, session, and the items collected so far."""

    def __init__(self, spec: ConfigSpec) -> None:
        self.spec = spec
        self.config = _configured(spec)
        self.recorder = _Recorder()
        self.config.pluginmanager.register(self.recorder, "pytest_subproc-recorder")
        self.junit = _JunitStandIn(spec.junit_family) if spec.junit_family else None
        if self.junit is not None:
            _compat.set_junitxml(self.config, self.junit)
        self.session = _compat.start_session(self.config)
        self.items: dict[str, pytest.Item] = {}
        self.collected: dict[str, str] = {}  # file path -> what collecting it reported
        self.protocols: dict[str, _compat.Protocol] = {}  # by nodeid, from setup to teardown
        self.started: Optional[_Started] = None  # the protocol entered ahead, see _start
        self.report: Any = None  # the running phase's report, once made

    def item(self, path: str, nodeid: str) -> pytest.Item:
        """The worker's own item for ``nodeid``, collecting its file on first need."""
        item = self.items.get(nodeid)
        if item is not None:
            return item
        if path not in self.collected:
            self.collect(path)
        item = self.items.get(nodeid)
        if item is None:
            why = self.collected[path] or "no such test there"
            raise LookupError(
                f"pytest_subproc could not find {nodeid} in its worker, so it cannot run "
                f"there (a test made or renamed in the pytest process after collection "
                f"cannot: leave it unmarked). Collecting {path} in the worker gave:\n{why}"
            )
        return item

    def collect(self, path: str) -> None:
        """Collect every item of a file, reusing the collectors above it."""
        with warnings.catch_warnings():
            # The parent collected the same file and reported its warnings.
            warnings.simplefilter("ignore")
            items, errors = _compat.collect_file(self.session, Path(path))
        for item in items:
            self.items.setdefault(item.nodeid, item)
        self.collected[path] = "\n".join(errors)


def in_worker() -> bool:
    """Whether this process configures (or has configured) pytest as a worker."""
    return _CONFIGURING


def _configured(spec: ConfigSpec) -> pytest.Config:
    global _CONFIGURING
    _CONFIGURING = True  # before the plugins' early hooks run
    os.chdir(spec.dir)
    sys.path[:] = spec.path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = _compat.parsed_config([*spec.args, *_EXTRA_ARGS])
    for name, value in _OFF.items():
        if hasattr(config.option, name):
            setattr(config.option, name, value)
    setattr(config.option, IN_WORKER, True)
    with warnings.catch_warnings():
        # The parent configured pytest alike and reported the same warnings.
        warnings.simplefilter("ignore")
        config._do_configure()
    _compat.share_dirs(config, spec.basetemp, spec.cachedir)
    _compat.quiet_plugins(config)
    _worker_debugging.install(config)
    # The first use of tempfile in a process probes the directory (it writes
    # and unlinks a file); pytest's basetemp did that in the parent before
    # any test, so here too, not inside the first test that uses tempfile.
    tempfile.gettempdir()
    return config


_STATE: Optional[_State] = None
_CONFIGURING = False
_FAILED: Optional[str] = None  # why pytest could not be configured here


def configure(spec: ConfigSpec) -> str:
    """Configure pytest here once; return why it failed ('' if it did not)."""
    global _STATE, _FAILED
    if _STATE is None and _FAILED is None:
        try:
            _STATE = _State(spec)
        except Exception as exc:  # reported by every test that needs it
            _FAILED = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return _FAILED or ""


def _state(spec: ConfigSpec) -> _State:
    configure(spec)
    if _STATE is None:
        raise RuntimeError(f"pytest could not be configured in the subprocess worker: {_FAILED}")
    return _STATE


def preload(spec: ConfigSpec, path: str) -> None:
    """Configure pytest and collect a file here, ahead of its tests.

    In the template, every worker forked after starts with the file collected.
    """
    state = _state(spec)
    if path not in state.collected:
        state.collect(path)


def run_phase(
    spec: ConfigSpec, path: str, nodeid: str, when: str, after: Optional[tuple[str, ...]]
) -> Optional[PhaseResult]:
    """Run one phase of an item; ``after`` names the chain of the next item in this worker.

    None stands for a phase that passed and left nothing to report, the most
    common result and the cheapest to send.
    """
    state = _state(spec)
    if when == "teardown" and nodeid not in state.items:
        return None  # its setup could not find it, so nothing was set up
    item = state.item(path, nodeid)
    sections, properties = len(item._report_sections), len(item.user_properties)
    state.recorder.rows.clear()
    if state.junit is not None:
        state.junit.records.clear()
    nextitem = _compat.next_item(item.session, after, state.items) if when == "teardown" else None
    state.report = None
    with _worker_coverage.phase(item, when):
        excinfo = _run(state, item, when, nextitem)
    error = text = None
    if excinfo is not None:
        _worker_debugging.keep(state.config, nodeid, when, excinfo)
        if isinstance(item, pytest.Function) or not isinstance(excinfo.value, Exception):
            error = _errors.dump_exception(excinfo.value)
        else:
            text = str(item.repr_failure(excinfo))  # a doctest's diff, say
    new_sections = tuple(item._report_sections[sections:])
    new_properties = tuple(_sendable(p) for p in item.user_properties[properties:])
    rows = tuple(state.recorder.rows)
    junit = tuple(state.junit.records) if state.junit is not None else ()
    attrs, state.report = _added_attrs(state.report), None  # not kept: it holds the traceback
    if not (error or text or new_sections or new_properties or rows or junit or attrs):
        return None  # the common case: nothing to send
    return PhaseResult(error, text, new_sections, new_properties, rows, junit, attrs)


def run_test(
    spec: ConfigSpec,
    path: str,
    nodeid: str,
    then: tuple[str, ...],
    after: Optional[tuple[str, ...]],
    location: Optional[tuple[str, Optional[int], str]] = None,
    start_next: bool = False,
) -> Optional[PhaseResult]:
    """Set an item up and, while each phase passes, run the phases ``then`` names.

    Each phase's result but the last goes back as a part of the reply
    (``_child.reply_part``): the parent reports one phase while the next
    runs here. A phase that fails ends the request, so that the parent
    decides what comes after it, as pytest would. ``location`` is the
    item's, as the parent worked it out already. With ``start_next``, the
    next item (the last of ``after``) is pytest's next test: once the reply
    has gone, its protocol is entered, as pytest would start it.
    """
    from pytest_subproc import _child

    state = _state(spec)
    item = state.items.get(nodeid)
    if location is not None and item is not None:
        _compat.seed_location(item, location)
    result = run_phase(spec, path, nodeid, "setup", None)
    for when in then:
        if _failed(result):
            break
        _child.reply_part(result)
        result = run_phase(spec, path, nodeid, when, after if when == "teardown" else None)
        if when == "teardown" and start_next and after and not _failed(result):
            _child.after_reply(lambda: _start(state, after[-1]))
    return result


def _failed(result: Optional[PhaseResult]) -> bool:
    return result is not None and (result.error is not None or result.text is not None)


def _start(state: _State, nodeid: str) -> None:
    """Enter the protocol of the item this worker runs next, before its setup is asked for.

    The wrappers (warning capture among them) take a good part of a small
    test's setup here. What they print at Python level, or raise, is kept
    for that setup, as if they had run there.
    """
    item = state.items.get(nodeid)
    if item is None or state.protocols:
        return
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        error = _enter(state, item)
    state.started = _Started(nodeid, out.getvalue(), err.getvalue(), error)


def _enter(state: _State, item: pytest.Item) -> Any:
    """Enter the item's protocol wrappers; return the ExceptionInfo of what one raised, if any."""
    from _pytest._code import ExceptionInfo

    try:
        state.protocols[item.nodeid] = _compat.Protocol(item)
    except BaseException:
        return ExceptionInfo.from_current()
    return None


def teardown_to(
    spec: ConfigSpec, path: str, nodeid: str, after: Optional[tuple[str, ...]]
) -> Optional[PhaseResult]:
    """Finalize, after ``nodeid``'s teardown, what the next item (chain ``after``) does not need.

    For a teardown run ahead that kept more set up than the parent, when the
    teardown came, found it should (``-x`` stopped the run, say).
    """
    state = _state(spec)
    try:
        state.session._setupstate.teardown_exact(
            _compat.next_item(state.session, after, state.items)
        )
    except BaseException as exc:
        return PhaseResult(_errors.dump_exception(exc))
    return None


def _run(state: _State, item: pytest.Item, when: str, nextitem: Any) -> Any:
    """Run the phase inside the item's protocol wrappers, entered at setup, left after teardown."""
    from _pytest._code import ExceptionInfo

    if when == "setup":
        started, state.started = state.started, None
        if started is not None and started.nodeid == item.nodeid:
            sys.stdout.write(started.out)
            sys.stderr.write(started.err)
            error = started.error
        else:
            _leave_protocols(state)  # of items whose teardown never came
            error = _enter(state, item)
        if error is not None:
            return error
    elif when == "teardown" and item.nodeid not in state.protocols:
        # Its protocol refused to start, so its setup never ran: what the
        # next item does not need is finalized, without the teardown hooks.
        try:
            item.session._setupstate.teardown_exact(nextitem)
        except BaseException:
            return ExceptionInfo.from_current()
        return None
    excinfo, state.report = _compat.run_phase(item, when, nextitem)
    if when == "teardown":
        try:
            _leave_protocols(state)
        except BaseException:
            excinfo = excinfo or ExceptionInfo.from_current()
    return excinfo


def _leave_protocols(state: _State) -> None:
    while state.protocols:
        state.protocols.pop(next(iter(state.protocols))).close()


def finish(spec: ConfigSpec) -> None:
    """Finalize what this worker still holds set up (its scope is ending)."""
    if _STATE is not None:
        try:
            _compat.teardown_all(_STATE.session)
        finally:
            _leave_protocols(_STATE)


_OWN_FIELDS: frozenset[str] = frozenset()


def _added_attrs(report: Any) -> tuple[tuple[str, Any], ...]:
    """What plugins set on a report beyond pytest's own fields, that can be sent.

    As pytest-xdist carries a report between processes, private names
    included (hypothesis keeps its statistics under one).
    """
    global _OWN_FIELDS
    if report is None:
        return ()
    if not _OWN_FIELDS:
        blank = pytest.TestReport("", ("", None, ""), {}, "passed", None, "call")
        _OWN_FIELDS = frozenset(vars(blank)) | {"wasxfail"}
    attrs = []
    for name, value in vars(report).items():
        if name in _OWN_FIELDS or _empty(value):
            continue  # an empty value (pytest-html's extras, mostly) adds nothing
        try:
            pickle.dumps(value)
        except Exception:
            continue  # a live object (a browser, a connection): nothing pytest could report
        attrs.append((name, value))
    return tuple(attrs)


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (list, tuple, dict, set, str)) and not value)


def _sendable(prop: tuple[str, Any]) -> tuple[str, Any]:
    name, value = prop
    try:
        pickle.dumps(value)
    except Exception:
        return name, repr(value)
    return name, value
