"""The parent's runtime: hand each phase of a marked test to its scoped worker, keep the books.

pytest's run protocol stays here: its hooks run for every test as usual. A
marked test's own ``setup``, ``runtest`` and ``teardown`` are replaced by
requests that have its worker run that phase on the worker's own item
(``_worker_items`` runs there), and raise what the worker raised.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import pytest

from pytest_subproc import _compat, _coverage, _errors, _interrupts, _settings, _wire, _worker_items
from pytest_subproc._exceptions import WorkerCrashed, WorkerStartError, WorkerTimeout
from pytest_subproc._process import PACKAGE_ROOT, Pauser, Reply, Worker, child_env
from pytest_subproc._report import replay, stack_traceback, traceback_at_test, where
from pytest_subproc._settings import Defaults, Settings, for_item
from pytest_subproc._subworker import relay_output
from pytest_subproc._template import Template
from pytest_subproc._wire import Kind

SETTINGS = pytest.StashKey[Settings]()
# The worker that set an item up, and which of its processes (its start count).
_SET_UP_BY = pytest.StashKey[tuple[Worker, int]]()
# The next item pytest runs after this one (teardown's ``nextitem``).
NEXT = pytest.StashKey[Optional[pytest.Item]]()
# The chain the worker keeps set up when it runs a teardown ahead.
_AHEAD = pytest.StashKey[Optional[tuple[str, ...]]]()
# A setup request sent, its reply due: the worker, its start count, the phases it runs on to.
_SENT = pytest.StashKey[tuple[Worker, int, tuple[str, ...]]]()
# The phases whose results the worker, running ahead, is yet to send, in order.
_DUE = pytest.StashKey[list[str]]()
# What plugins set on the worker's report of the phase just run, for pytest's report.
REPORT_ATTRS = pytest.StashKey[tuple[tuple[str, Any], ...]]()
# How many workers to fork ahead: a module lasts long enough for one to be
# ready in time; a test often does not, and a fork takes a few milliseconds.
_SPARES = {"module": 1, "function": 2}

Node = Union[pytest.Item, pytest.Collector]
# The node ids of an item's chain, from the session down.
_CHAIN = pytest.StashKey[tuple[str, ...]]()
# The test file a node belongs to (its module-scope worker's node).
_FILE = pytest.StashKey[Node]()


class SubprocessWarning(pytest.PytestWarning):
    """Something about a marked test that the user should know."""


def scope_node(item: Node, scope: str) -> Node:
    """The node whose life a worker of ``scope`` follows: the session, the test's file, the test."""
    if scope == "session":
        return item.session
    if scope == "module":
        # Asked several times a test: the walk up the tree is done once.
        file = item.stash.get(_FILE, None)
        if file is None:
            file = item.stash[_FILE] = item.getparent(pytest.File) or item
        return file
    return item


def _file_of(node: Node) -> str:
    return str(node.path)


@dataclass
class Runtime:
    """Run-wide state, one per pytest process (so one per xdist worker)."""

    defaults: Defaults
    config: Optional[pytest.Config] = None
    capture: bool = True
    workers: int = 0
    restarts: int = 0
    live: list[Worker] = field(default_factory=list)
    casualties: list[tuple[str, str]] = field(default_factory=list)
    # The crashes and timeouts of marked tests, until their hooks are called.
    crashed: list[tuple[pytest.Item, Union[WorkerCrashed, WorkerTimeout]]] = field(
        default_factory=list
    )
    # The scope each worker serves, for the plugin's hooks to tell.
    scopes: dict[Worker, str] = field(default_factory=dict)
    # Workers closed since the hooks were last called for them.
    retired: list[Worker] = field(default_factory=list)
    template: Optional[Template] = None
    # Started before pytest configured itself (see ``early_template``), until used.
    early: Optional[Template] = None
    # Forked ahead, oldest first, to be the next files' or tests' workers.
    spares: list[Worker] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # of isolated tests, in run order
    owned: dict[Node, Worker] = field(default_factory=dict)  # by the node whose life they follow
    spec: Optional[_worker_items.ConfigSpec] = None
    forked: bool = True  # False once configuring in the template started a thread
    positions: dict[int, int] = field(default_factory=dict)  # id(item) -> index in session.items
    # By worker: the process (its start count) that collected these files.
    readied: dict[Worker, tuple[int, set[str]]] = field(default_factory=dict)
    # Scope nodes whose finalizer, which ends their worker, is yet to be added.
    rearm: set[Node] = field(default_factory=set)
    # What each worker tells when a debugger starts there (see _debugging).
    pauser: Optional[Pauser] = None

    @classmethod
    def from_config(cls, config: pytest.Config) -> Runtime:
        """Build the runtime from validated options."""
        return cls(
            Defaults.from_config(config),
            config=config,
            capture=config.getoption("capture") != "no",
        )

    def prepare(self, item: pytest.Item) -> None:
        """Resolve an item's settings; a marked item's phases are handed to its worker."""
        settings = for_item(item, self.defaults)
        # A test that drives the worker by hand through `subworker` runs here;
        # its marker still picks the worker's scope.
        if settings.isolated and drives_worker(item):
            settings = Settings(isolated=False, scope=settings.scope, timeout=settings.timeout)
        item.stash[SETTINGS] = settings
        if not settings.isolated:
            return
        # Instance attributes: pytest's runner calls these, and only these run
        # the item's own fixtures and body.
        item.setup = lambda: self.setup(item)  # type: ignore[method-assign]
        item.runtest = lambda: self.call(item)  # type: ignore[method-assign]
        item.teardown = lambda: self.teardown(item)  # type: ignore[method-assign]
        path = _file_of(item)
        if not self.files or self.files[-1] != path:
            self.files.append(path)

    def config_spec(self) -> _worker_items.ConfigSpec:
        """What a worker needs to configure pytest as this process did."""
        if self.spec is None:
            config = self.config
            assert config is not None
            factory = getattr(config, "_tmp_path_factory", None)
            cache = getattr(config, "cache", None)
            xml = _compat.junitxml(config)
            self.spec = _worker_items.ConfigSpec(
                args=(
                    *(str(a) for a in config.invocation_params.args),
                    *_coverage.worker_args(config),
                ),
                dir=str(config.invocation_params.dir),
                path=tuple(sys.path),
                basetemp=str(factory.getbasetemp()) if factory is not None else None,
                cachedir=str(cache._cachedir) if cache is not None else None,
                junit_family=getattr(xml, "family", None),
            )
        return self.spec

    def warm_up(self) -> None:
        """Start the template now (without waiting), if workers will be forked."""
        if self.template is None and self.defaults.start == "fork" and self.forked:
            template, self.early = self.early, None
            if template is None:
                template = Template(child_env(), PACKAGE_ROOT)
            template.prepare(self.defaults.preload, self.config_spec())
            self.template = template
        if self.template is not None:
            self.template.launch()

    # The three phases, in place of the item's own methods.

    def send_early(self, item: pytest.Item) -> None:
        """Send a marked test's setup request as pytest starts the test's protocol.

        The worker sets the test up while pytest logs its start and runs the
        setup hooks before the test's own; ``setup`` takes the reply. Not
        when output goes to the terminal (the worker's would come before
        pytest names the test), nor one phase at a time, nor for a test a
        marker may skip before its setup (the worker, whose item may lack a
        marker added here, would run the test).
        """
        settings = item.stash.get(SETTINGS, None)
        if settings is None or not settings.isolated or not self.capture:
            return
        if self._step_by_step(item) or _may_skip(item):
            return
        # Only to a worker serving with the file collected: starting one, or
        # collecting there, stays inside the setup, where pytest captures
        # what it prints and warns.
        worker = self.owned.get(scope_node(item, settings.scope))
        if worker is None or not worker.serving or not self._collected(worker, _file_of(item)):
            return
        item.stash[_SENT] = (worker, worker.starts, self._send(item, worker))

    def _send(self, item: pytest.Item, worker: Worker) -> tuple[str, ...]:
        """Send the request that sets ``item`` up and, unless stepping, runs it on."""
        then = () if self._step_by_step(item) else ("call", "teardown")
        after = item.stash[_AHEAD] = self._after(item, item.stash[SETTINGS].scope)
        start = bool(then) and self._starts_next(item, after)
        call = self._call(item, _worker_items.run_test, then, after, item.location, start)
        worker.submit(Kind.CALL, call, timeout=item.stash[SETTINGS].timeout)
        return then

    def _starts_next(self, item: pytest.Item, after: Optional[tuple[str, ...]]) -> bool:
        """Whether the worker may start the test after ``item`` as soon as ``item`` is done.

        Only pytest's very next test, which then goes to the same worker, and
        only one that no marker may skip first (its setup request would go
        early, see ``send_early``): the worker enters its protocol while
        pytest reports ``item``.
        """
        following = item.stash.get(NEXT, None)
        return (
            self.capture
            and after is not None
            and following is not None
            and after[-1] == following.nodeid
            and not _may_skip(following)
        )

    def _taken(self, item: pytest.Item) -> Optional[tuple[Worker, int, tuple[str, ...]]]:
        """The setup request sent for ``item`` whose reply is due, now taken off the item."""
        sent = item.stash.get(_SENT, None)
        if sent is not None:
            del item.stash[_SENT]
            worker, starts, _ = sent
            if worker.starts != starts:
                return None  # the process it went to is gone, and the request with it
        return sent

    def abandon(self, item: pytest.Item, *, interrupted: bool) -> None:
        """End a setup request sent early that pytest never asked for.

        A hook before ours failed or skipped the test: what the worker sends
        is taken and dropped. If the run is being interrupted, the worker is
        ended instead.
        """
        sent = self._taken(item)
        if sent is not None and interrupted:
            sent[0].close()
        elif sent is not None:
            sent[0].drain()

    def setup(self, item: pytest.Item) -> None:
        """Have the item's worker set it up, then run on through its call and teardown.

        Its fixtures, of every scope, run there. While each phase passes, the
        worker goes on to the next, and this process takes each result as
        pytest asks for that phase: it reports one phase while the next runs.
        """
        __tracebackhide__ = True
        scope = item.stash[SETTINGS].scope
        sent = self._taken(item)
        try:
            worker = self.worker_for(item, scope)
            if sent is None:
                self._ready(worker, _file_of(item))
        except (WorkerStartError, OSError) as exc:
            raise self.start_failed(item, exc) from None
        try:
            then = self._send(item, worker) if sent is None else sent[2]
            reply = self._replied(item, worker, "setup", worker.reply)
            item.stash[_DUE] = list(then) if worker.more else []
            self._report(item, reply)
        finally:
            item.stash[_SET_UP_BY] = (worker, worker.starts)

    def _step_by_step(self, item: pytest.Item) -> bool:
        """Whether each phase must wait for pytest to ask for it, rather than run ahead."""
        option = item.config.option
        # Fixtures shown but not run; a debugger that takes over the call.
        return bool(getattr(option, "setuponly", False) or option.usepdb or option.trace)

    def _ready(self, worker: Worker, path: str) -> None:
        """Have a worker configure pytest and collect a file, outside any test's timeout.

        A forked worker has pytest configured already; a spawned one does it
        now. What fails here fails again, and is reported, in the setup.
        """
        worker.start()
        if not self._collected(worker, path):
            starts, files = self.readied.get(worker, (-1, set()))
            if starts != worker.starts:
                files = set()
                self.readied[worker] = (worker.starts, files)
            files.add(path)
            call: tuple[Any, ...] = (_worker_items.preload, (self.config_spec(), path), {})
            relay_output(worker.request(Kind.CALL, call))

    def _collected(self, worker: Worker, path: str) -> bool:
        """Whether the worker's process has collected the file (or was forked with it)."""
        starts, files = self.readied.get(worker, (-1, set()))
        return path in worker.preloaded or (starts == worker.starts and path in files)

    def call(self, item: pytest.Item) -> None:
        """Take the item's call from its worker, or have it run the call now."""
        __tracebackhide__ = True
        worker, starts = item.stash[_SET_UP_BY]
        if worker.starts != starts or not worker.serving:
            raise WorkerCrashed(
                f"the worker that set up {item.nodeid} died before its call",
                pid=worker.pid or 0,
                exitcode=None,
            )
        if self._due(item, worker, "call"):
            reply = self._follow(item, worker, "call")
        else:
            reply = self._ask(item, worker, "call", _worker_items.run_phase, "call", None)
        self._report(item, reply)

    def teardown(self, item: pytest.Item) -> None:
        """Have the item's worker tear it down, keeping what its next test there needs."""
        __tracebackhide__ = True
        worker, starts = item.stash.get(_SET_UP_BY, (None, 0))
        scope = item.stash[SETTINGS].scope
        try:
            if worker is not None and worker.starts == starts:
                self._teardown(item, worker, self._kept_chain(item, scope))
        finally:
            if scope == "function":
                self.release(item, finish=False)

    def _teardown(
        self, item: pytest.Item, worker: Worker, after: Optional[tuple[str, ...]]
    ) -> None:
        __tracebackhide__ = True
        if self._due(item, worker, "call"):
            # Run ahead, but pytest did not call the test: nothing of it is
            # reported. If a plugin's setup hook failed after ours, the body
            # is let finish; if the run was interrupted meanwhile, it is not.
            if getattr(item.session, "exitstatus", None) == pytest.ExitCode.INTERRUPTED:
                worker.close()
                return
            self._follow(item, worker, "call")
        if not worker.serving:
            return
        if not self._due(item, worker, "teardown"):
            args = ("teardown", after)
            self._report(item, self._ask(item, worker, "teardown", _worker_items.run_phase, *args))
            return
        reply = self._follow(item, worker, "teardown")
        if after == item.stash[_AHEAD]:
            self._report(item, reply)
            return
        # It kept more set up than pytest now wants kept (-x stopped the run, say).
        rest = self._ask(item, worker, "teardown", _worker_items.teardown_to, after)
        try:
            self._report(item, reply)
        finally:
            self._report(item, rest)

    def _due(self, item: pytest.Item, worker: Worker, when: str) -> bool:
        """Whether the worker, running ahead, is yet to send ``when``'s result."""
        due = item.stash.get(_DUE, [])
        if due and not worker.more:
            due.clear()  # a phase failed (or the worker died): the worker stopped there
        return bool(due) and due[0] == when

    def _ask(self, item: pytest.Item, worker: Worker, when: str, fn: Any, *args: Any) -> Reply:
        """Send a request for a phase of ``item``: ``fn(spec, path, nodeid, *args)`` there."""
        call, timeout = self._call(item, fn, *args), item.stash[SETTINGS].timeout
        return self._replied(item, worker, when, worker.request, Kind.CALL, call, timeout=timeout)

    def _call(self, item: pytest.Item, fn: Any, *args: Any) -> tuple[Any, ...]:
        """The CALL that has the worker run ``fn(spec, path, nodeid, *args)`` for ``item``."""
        return (fn, (self.config_spec(), _file_of(item), item.nodeid, *args), {})

    def _replied(
        self, item: pytest.Item, worker: Worker, when: str, get: Any, *args: Any, **kwargs: Any
    ) -> Reply:
        """``_wait`` for a request's reply, then list the deaths between tests it found."""
        try:
            return self._wait(item, worker, when, get, *args, **kwargs)
        finally:
            self.note_idle_deaths(worker, item.nodeid)

    def _follow(self, item: pytest.Item, worker: Worker, when: str) -> Reply:
        """Take the next phase's result, which the worker sends as it runs ahead."""
        item.stash[_DUE].pop(0)
        return self._wait(item, worker, when, worker.follow)

    def _wait(
        self, item: pytest.Item, worker: Worker, when: str, get: Any, *args: Any, **kwargs: Any
    ) -> Reply:
        """Return ``get(*args, **kwargs)``, a reply; raise what broke or interrupted the wait."""
        try:
            reply: Reply = get(*args, **kwargs)
        except (_wire.WireError, OSError) as exc:
            raise self._lost(item, worker, exc, when) from None
        except BaseException as exc:  # Ctrl-C, pytest-timeout: show the worker's frames
            what = _interrupts.point_at_worker(item, exc)
            if what is not None:
                self.casualties.append((item.nodeid, what))
            raise exc  # with its traceback rebuilt (a bare raise keeps the old one on 3.9)
        return reply

    def _report(self, item: pytest.Item, reply: Reply) -> None:
        """Give pytest what a phase left for its report, and raise what it raised."""
        __tracebackhide__ = True
        relay_output(reply)
        if isinstance(reply.error, (WorkerCrashed, WorkerTimeout)):
            self.casualties.append((item.nodeid, str(reply.error).partition("\n")[0]))
            self.crashed.append((item, reply.error))
            # Point the report at the line the worker was on, as for any failure.
            reply.error.__traceback__ = stack_traceback(reply.error.stack, *where(item))
        result: Optional[_worker_items.PhaseResult] = reply.unwrap()
        if result is None:
            return  # passed, nothing to report
        if result.report_attrs:
            item.stash[REPORT_ATTRS] = item.stash.get(REPORT_ATTRS, ()) + result.report_attrs
        for section in result.sections:
            item.add_report_section(*section)
        item.user_properties.extend(result.properties)
        replay(result.warnings)
        if result.junit:
            _record_junit(item, result.junit)
        if result.error is not None:
            raise _errors.load_exception(result.error)
        if result.text is not None:
            raise pytest.fail.Exception(result.text, pytrace=False)

    def worker_of(self, item: pytest.Item) -> Optional[Worker]:
        """The worker running this marked item, if it still is the process that set it up."""
        worker, starts = item.stash.get(_SET_UP_BY, (None, 0))
        if worker is not None:
            return worker if worker.starts == starts and worker.serving else None
        settings = item.stash.get(SETTINGS, None)
        if settings is None or not settings.isolated:
            return None
        return self.owned.get(scope_node(item, settings.scope))  # setting it up now

    def _kept_chain(self, item: pytest.Item, scope: str) -> Optional[tuple[str, ...]]:
        """The node ids of the collectors the worker keeps set up after this teardown."""
        if scope != "function" and _compat.collectors_kept(item):
            # A rerun plugin took them off this process's stack, to keep them
            # set up for the next attempt: so does the worker. Their
            # finalizers went with them, the worker's end among them.
            self.rearm.add(scope_node(item, scope))
            return tuple(n.nodeid for n in item.listchain()[:-1])
        session = item.session
        if _AHEAD in item.stash and not (session.shouldfail or session.shouldstop):
            return item.stash[_AHEAD]  # nothing it was worked out from has changed since
        return self._after(item, scope)

    def _after(self, item: pytest.Item, scope: str) -> Optional[tuple[str, ...]]:
        """The chain of the next test that runs in this item's worker, if its scope lasts."""
        after = self._next_here(item, scope)
        if after is None:
            return None
        chain = after.stash.get(_CHAIN, None)
        if chain is None:  # asked at a test's setup and again at its teardown
            chain = after.stash[_CHAIN] = tuple(n.nodeid for n in after.listchain())
        return chain

    def _next_here(self, item: pytest.Item, scope: str) -> Optional[pytest.Item]:
        """The next test that runs in this item's worker, or None if its scope ends first."""
        if scope == "function" or item.session.shouldfail or item.session.shouldstop:
            return None
        candidate = item.stash.get(NEXT, None)
        items = item.session.items
        if candidate is not None and not self._same_worker(item, candidate, scope):
            if not self.positions or len(self.positions) != len(items):
                self.positions = {id(it): i for i, it in enumerate(items)}
            start = self.positions.get(id(candidate))
            candidate = None
            for later in items[start:] if start is not None else ():
                if scope == "module" and later.path != item.path:
                    break  # the file's worker ends before it
                if self._same_worker(item, later, scope):
                    candidate = later
                    break
        if candidate is None:
            return None
        return candidate if self._same_worker(item, candidate, scope) else None

    @staticmethod
    def _same_worker(item: pytest.Item, other: pytest.Item, scope: str) -> bool:
        settings = other.stash.get(SETTINGS, None)
        if settings is None or not settings.isolated or settings.scope != scope:
            return False
        return scope == "session" or scope_node(other, scope) is scope_node(item, scope)

    # Workers and their lives.

    def worker_for(
        self, node: Node, scope: str, request: Optional[pytest.FixtureRequest] = None
    ) -> Worker:
        """The worker of ``node``'s scope, started on first use and closed when the scope ends."""
        owner = scope_node(node, scope)
        worker = self.owned.get(owner)
        if worker is None:
            worker = self.owned[owner] = self.new_worker(owner, scope)
            self.scopes[worker] = scope
            if request is not None:
                request.addfinalizer(lambda: self.release(owner, finish=False))
            elif scope != "function":  # a test's own worker ends with its teardown
                self.rearm.add(owner)
        if owner in self.rearm:
            self.rearm.discard(owner)
            owner.addfinalizer(lambda: self.release(owner, finish=True))
        return worker

    def release(self, owner: Node, *, finish: bool) -> None:
        """End a worker at the end of its scope, finalizing what it still has set up."""
        __tracebackhide__ = True
        worker = self.owned.pop(owner, None)
        if worker is None:
            return
        try:
            if finish and worker.serving:
                call: tuple[Any, ...] = (_worker_items.finish, (self.config_spec(),), {})
                reply = worker.request(Kind.CALL, call, timeout=self.defaults.timeout)
                relay_output(reply)
                reply.unwrap()
        finally:
            self.retire(worker)

    def new_worker(self, node: Node, scope: str) -> Worker:
        """Return a worker for one scope instance (its test or file); it starts on first use."""
        self.warm_up()
        self._check_template()
        if scope == "session" or self.template is None:
            return self._worker()
        # A worker per file or per test: each takes one forked while those
        # before it served, and has more forked meanwhile, from a template
        # that has collected this test file and the next one.
        path = _file_of(node)
        for file in path, self.file_after(path):
            if file is not None:
                self.template.preload(file)
        for spare in [s for s in self.spares if path not in s.preloaded]:
            self.spares.remove(spare)
            self.retire(spare)  # forked before this file was collected
        worker = self.spares.pop(0) if self.spares else self._launched()
        while len(self.spares) < _SPARES[scope]:
            self.spares.append(self._launched())
        return worker

    def _check_template(self) -> None:
        """Fall back to spawning workers, once, if configuring the template started a thread."""
        if self.template is None:
            return
        unsafe = self.template.wait_configured()
        if not unsafe:
            return
        self.forked = False
        for spare in self.spares:
            self.retire(spare)
        self.spares.clear()
        self.template.close()
        self.template = None
        warnings.warn(
            SubprocessWarning(
                f"pytest_subproc spawns each worker instead of forking it from a template: "
                f"{unsafe}, and a process with threads cannot fork safely"
            ),
            stacklevel=2,
        )

    def file_after(self, path: str) -> Optional[str]:
        """The test file that runs after the one at ``path``."""
        index = self.files.index(path) if path in self.files else len(self.files)
        return self.files[index + 1] if index + 1 < len(self.files) else None

    def _launched(self) -> Worker:
        worker = self._worker()
        worker.launch()
        return worker

    def _worker(self) -> Worker:
        worker = Worker(capture=self.capture, template=self.template, warm=self.defaults.preload)
        worker.pauser = self.pauser
        self.live.append(worker)
        return worker

    def retire(self, worker: Worker, nodeid: str = "") -> None:
        """Close a worker at the end of its scope and count its starts."""
        self.readied.pop(worker, None)
        try:
            worker.close()
        finally:
            if worker in self.live:
                self.live.remove(worker)
                self.retired.append(worker)
            self.workers += worker.starts
            self.restarts += max(worker.starts - 1, 0)
            self.note_idle_deaths(worker, nodeid)

    def note_idle_deaths(self, worker: Worker, nodeid: str) -> None:
        """List the deaths of a worker between requests, under the test that found it dead."""
        for death in worker.idle_deaths:
            self.casualties.append((nodeid, f"{death}; a fresh worker took over"))
        worker.idle_deaths.clear()

    def _lost(
        self, item: pytest.Item, worker: Worker, exc: BaseException, when: str
    ) -> WorkerCrashed:
        """Say in a sentence that the channel to the worker failed, for the test's report.

        The plugin's frames and the wire's own exception would tell the user
        nothing they can act on.
        """
        what = "its reply was corrupt" if isinstance(exc, _wire.WireError) else "its pipe broke"
        pid = worker.pid
        detail = str(exc) if isinstance(exc, _wire.WireError) else f"{type(exc).__name__}: {exc}"
        doing = "ran" if when == "call" else f"ran the {when} of"
        error = WorkerCrashed(
            f"worker lost: {what}{f' (pid {pid})' if pid else ''} while it {doing} "
            f"{item.nodeid} ({detail}); the next test gets a fresh worker",
            pid=pid or 0,
            exitcode=None,
        )
        self.casualties.append((item.nodeid, str(error)))
        self.crashed.append((item, error))
        error.__traceback__ = traceback_at_test(item)
        return error

    def start_failed(self, item: pytest.Item, exc: BaseException) -> WorkerStartError:
        """Return the worker's failure to start, listed and shown at the test, not the plugin.

        Its cause (a broken pipe, say) stays on the error as its context, out
        of the report.
        """
        if isinstance(exc, WorkerStartError):
            error, exc.__context__, exc.__cause__ = exc, exc.__cause__, None
        else:
            error = WorkerStartError(
                f"the worker could not be started: {type(exc).__name__}: {exc}"
            )
            error.__context__ = exc
        error.__traceback__ = traceback_at_test(item)
        self.casualties.append((item.nodeid, str(error).partition("\n")[0]))
        return error

    def close_templates(self) -> None:
        """Close the templates started so far; a test that needs a worker starts one again."""
        with contextlib.ExitStack() as closing:
            for template in (self.template, self.early):
                if template is not None:
                    closing.callback(template.close)
            self.template = self.early = None

    def close_all(self) -> None:
        """Close every worker still open (the run is ending, maybe on Ctrl-C), come what may."""
        self.spares.clear()
        self.owned.clear()
        with contextlib.ExitStack() as closing:  # each one closed even if another fails
            for worker in list(self.live):
                closing.callback(self.retire, worker)
            closing.callback(self.close_templates)


def drives_worker(item: pytest.Item) -> bool:
    """Whether a test drives its scope's worker by hand, through the ``subworker`` fixture."""
    return "subworker" in getattr(item, "fixturenames", ())


def _may_skip(item: pytest.Item) -> bool:
    """Whether a marker may have pytest skip the test before its own setup runs."""
    return any(
        mark.name in ("skip", "skipif")
        or (mark.name == "xfail" and not mark.kwargs.get("run", True))  # not run: skipped
        for mark in item.iter_markers()
    )


def early_template(early_config: pytest.Config) -> Optional[Template]:
    """Start the template before pytest configures itself, if every test will need it.

    It imports pytest while this process loads conftest modules and
    configures; the pytest configuration follows when the runtime takes it
    (``warm_up``). (It does not import the plugins ahead: pytest marks them
    for assertion rewriting as it configures, and warns of any imported
    before, an error under ``-W error``.)
    """
    if not _settings.forks_every_test(early_config) or _coverage.starts_later(early_config):
        return None
    if _compat.xdist_controller(early_config, early_config.known_args_namespace):
        return None  # xdist's workers run the tests, each with a template of its own
    template = Template(child_env(), PACKAGE_ROOT)
    try:
        template.launch()
    except (WorkerStartError, OSError):
        template.close()
        return None  # the tests that need a worker will say why
    return template


def _record_junit(item: pytest.Item, records: tuple[tuple[str, str, str], ...]) -> None:
    """Put what the worker's test recorded for junitxml into this run's report."""
    xml = _compat.junitxml(item.config)
    if xml is None:
        return
    for kind, name, value in records:
        if kind == "attribute":
            xml.node_reporter(item.nodeid).add_attribute(name, value)
        else:
            xml.add_global_property(name, value)
