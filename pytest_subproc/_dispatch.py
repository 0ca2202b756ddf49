"""The parent's runtime: route marked tests to scoped workers, keep the books."""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import unittest
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import pytest

from pytest_subproc import _compat, _errors, _runbody, _wire
from pytest_subproc._exceptions import WorkerCrashed, WorkerStartError, WorkerTimeout
from pytest_subproc._process import PACKAGE_ROOT, Reply, Worker, child_env
from pytest_subproc._report import replay, stack_traceback, traceback_at_test, warn_return
from pytest_subproc._settings import MARKER, Defaults, Settings, for_item
from pytest_subproc._spec import SPEC, SubprocessWarning, unsendable
from pytest_subproc._subworker import relay_output
from pytest_subproc._template import Template
from pytest_subproc._wire import Kind

SETTINGS = pytest.StashKey[Settings]()
# The warning due at setup for a marked test that runs in the pytest process.
UNSHIPPED = pytest.StashKey[SubprocessWarning]()
# How many workers to fork ahead: a module lasts long enough for one to be
# ready in time; a test often does not, and a fork takes a few milliseconds.
_AHEAD = {"module": 1, "function": 2}


def worker_fixture(scope: str) -> str:
    """Name the fixture that owns the worker of ``scope``."""
    return f"_subprocess_worker_{scope}"


def shippable(item: pytest.Item) -> bool:
    """Whether the item's body can run in a worker (plain Python test functions)."""
    if not isinstance(item, pytest.Function):
        return False
    cls = getattr(item, "cls", None)
    if cls is not None and issubclass(cls, unittest.TestCase):
        return False  # unittest runs the method itself, never through pytest_pyfunc_call
    obj = getattr(item, "obj", None)
    return callable(obj) and not (
        inspect.iscoroutinefunction(obj) or inspect.isasyncgenfunction(obj)
    )


@dataclass
class Runtime:
    """Run-wide state, one per pytest process (so one per xdist worker)."""

    defaults: Defaults
    capture: bool = True
    verbosity: int = 0
    workers: int = 0
    restarts: int = 0
    live: list[Worker] = field(default_factory=list)
    casualties: list[tuple[str, str]] = field(default_factory=list)
    # The crashes and timeouts of marked tests, until their hooks are called.
    crashed: list[tuple[pytest.Item, Union[WorkerCrashed, WorkerTimeout]]] = field(
        default_factory=list
    )
    template: Optional[Template] = None
    # Forked ahead, oldest first, to be the next modules' or tests' workers.
    spares: list[Worker] = field(default_factory=list)
    modules: list[tuple[str, str]] = field(default_factory=list)  # isolated, in run order

    @classmethod
    def from_config(cls, config: pytest.Config) -> Runtime:
        """Build the runtime from validated options."""
        return cls(
            Defaults.from_config(config),
            capture=config.getoption("capture") != "no",
            verbosity=config.getoption("verbose"),
        )

    def prepare(self, item: pytest.Item) -> None:
        """Resolve an item's settings and have it request its scope's worker."""
        settings = for_item(item, self.defaults)
        # A test that drives the worker by hand through `subworker` runs in the
        # parent; its marker still picks the worker's scope.
        by_hand = "subworker" in getattr(item, "fixturenames", ())
        isolated = settings.isolated and shippable(item) and not by_hand
        if settings.isolated and not isolated:
            settings = Settings(isolated=False, scope=settings.scope, timeout=settings.timeout)
            if not by_hand and item.get_closest_marker(MARKER) is not None:
                # Warned at the test's setup, not here: under `-W error` a
                # warning at collection aborts the whole run.
                item.stash[UNSHIPPED] = SubprocessWarning(
                    f"{item.nodeid} is marked subprocess, but pytest_subproc cannot "
                    "ship it (unittest, async or non-Python test): it runs in the "
                    "pytest process"
                )
        item.stash[SETTINGS] = settings
        if isolated:
            item.fixturenames.append(worker_fixture(settings.scope))  # type: ignore[attr-defined]
            module = (item.module.__name__, _module_path(item))  # type: ignore[attr-defined]
            if module not in self.modules:
                self.modules.append(module)

    def warm_up(self) -> None:
        """Start the template now (without waiting), if workers will be forked."""
        if self.template is None and self.defaults.start == "fork":
            self.template = Template(child_env(), PACKAGE_ROOT, self.defaults.preload)
        if self.template is not None:
            self.template.launch()

    def new_worker(self, node: pytest.Item | pytest.Collector, scope: str) -> Worker:
        """Return a worker for one scope instance (its test or module); it starts on first use."""
        self.warm_up()
        if (
            scope == "session"
            or self.template is None
            or not isinstance(node, (pytest.Function, pytest.Module))
        ):
            return self._worker()
        # A worker per module or per test: each takes one forked while those
        # before it served, and has more forked meanwhile, from a template
        # that has imported this test module and the next one.
        path = _module_path(node)
        context = _call_context()
        for module in (node.module.__name__, path), self.module_after(path):
            if module is not None:
                self.preload(module[0], module[1], context)
        for spare in [s for s in self.spares if path not in s.preloaded]:
            self.spares.remove(spare)
            self.retire(spare)  # forked before this module was imported
        worker = self.spares.pop(0) if self.spares else self._launched()
        while len(self.spares) < _AHEAD[scope]:
            self.spares.append(self._launched())
        return worker

    def module_after(self, path: str) -> Optional[tuple[str, str]]:
        """The (name, path) of the test module that runs after the one at ``path``."""
        paths = [p for _, p in self.modules]
        index = paths.index(path) if path in paths else len(paths)
        return self.modules[index + 1] if index + 1 < len(paths) else None

    def _launched(self) -> Worker:
        worker = self._worker()
        worker.launch()
        return worker

    def _worker(self) -> Worker:
        worker = Worker(capture=self.capture, template=self.template, warm=self.defaults.preload)
        self.live.append(worker)
        return worker

    def retire(self, worker: Worker, nodeid: str = "") -> None:
        """Close a worker at the end of its scope and count its starts."""
        try:
            worker.close()
        finally:
            if worker in self.live:
                self.live.remove(worker)
            self.workers += worker.starts
            self.restarts += max(worker.starts - 1, 0)
            self.note_idle_deaths(worker, nodeid)

    def close_all(self) -> None:
        """Close every worker still open (the run is ending, maybe on Ctrl-C), come what may."""
        self.spares.clear()
        with contextlib.ExitStack() as closing:  # each one closed even if another fails
            for worker in list(self.live):
                closing.callback(self.retire, worker)
            if self.template is not None:
                closing.callback(self.template.close)
                self.template = None

    def preload(self, name: str, path: str, context: dict[str, Any]) -> None:
        """Have the template import a test module, so that later forks start with it.

        Only worth it for workers forked per test: a worker of a module or the
        session imports each module once anyway.
        """
        if self.template is not None:
            self.template.preload(name, path, _compat.rewritten_code(path), context)

    def check_values(self, item: pytest.Function) -> None:
        """Fail at setup, naming the fixture, if the worker cannot rebuild a value.

        A value is checked once per worker: module and session fixtures pass
        the same bytes to every test. Rebuilding one runs the user's code, so
        it has the test's timeout, and a crash or a timeout there is the
        test's error at setup.
        """
        __tracebackhide__ = True
        worker, spec = _worker_of(item), item.stash[SPEC]
        new = {n: v for n, v in spec.values.items() if (n, hash(v)) not in worker.checked}
        if not new:
            return
        names = ", ".join(map(repr, new))
        call: tuple[Any, ...] = (_runbody.unsendable, (new,), {})
        self._start(item, worker)
        doing = f"rebuilt fixture {names} at the setup of"
        reply = self._request(item, worker, call, doing)
        relay_output(reply)
        if isinstance(reply.error, (WorkerCrashed, WorkerTimeout)):
            self._casualty(item, reply.error, f"at setup, rebuilding fixture {names}")
        failed = reply.unwrap()
        for name, why in failed.items():
            unsendable(item, name, f"cannot be rebuilt in the subprocess worker: {why}")
        worker.checked.update((n, hash(v)) for n, v in new.items())

    def start(self, item: pytest.Function) -> Worker:
        """Start the item's worker unless it runs, and return it."""
        __tracebackhide__ = True
        worker = _worker_of(item)
        self._start(item, worker)
        return worker

    def run(self, item: pytest.Function) -> None:
        """Run the item's body in its worker and raise what it raised."""
        __tracebackhide__ = True
        worker, spec = _worker_of(item), item.stash[SPEC]
        # Started first: a replaced worker's environment changes and modules
        # are counted afresh.
        self._start(item, worker)
        code = _code_for(worker, spec)
        call: tuple[Any, ...] = (_runbody.run_body, (spec, code), {})
        reply = self._request(item, worker, call, "ran")
        relay_output(reply)
        if isinstance(reply.error, (WorkerCrashed, WorkerTimeout)):
            self._casualty(item, reply.error)
        result: Optional[_runbody.BodyResult] = reply.unwrap()
        if result is None:
            return  # passed, nothing to report
        replay(result)
        if result.returned is not None:
            warn_return(item, result.returned)
        if result.error is not None:
            raise _errors.load_exception(result.error)

    def _start(self, item: pytest.Function, worker: Worker) -> None:
        """Start the worker unless it runs; a failure is the test's error, said plainly."""
        __tracebackhide__ = True
        try:
            worker.start()
        except (WorkerStartError, _wire.WireError, OSError) as exc:
            raise self.start_failed(item, exc) from None

    def _request(
        self,
        item: pytest.Function,
        worker: Worker,
        call: tuple[Any, ...],
        doing: str,
    ) -> Reply:
        """Send the call with the test's timeout; a broken channel is the test's error."""
        __tracebackhide__ = True
        timeout = item.stash[SETTINGS].timeout
        try:
            return worker.request(
                Kind.CALL, call, timeout=timeout, context=lambda: _call_context(worker)
            )
        except (_wire.WireError, OSError) as exc:
            raise self._lost(item, worker, exc, doing) from None
        finally:
            self.note_idle_deaths(worker, item.nodeid)

    def note_idle_deaths(self, worker: Worker, nodeid: str) -> None:
        """List the deaths of a worker between requests, under the test that found it dead."""
        for death in worker.idle_deaths:
            self.casualties.append((nodeid, f"{death}; a fresh worker took over"))
        worker.idle_deaths.clear()

    def _casualty(
        self, item: pytest.Function, error: WorkerCrashed | WorkerTimeout, when: str = ""
    ) -> None:
        """List a test whose worker died, and point its report at the line the worker was on."""
        if when:
            first, newline, rest = str(error).partition("\n")
            error.args = (f"{first} ({when}){newline}{rest}", *error.args[1:])
        self.casualties.append((item.nodeid, str(error).partition("\n")[0]))
        self.crashed.append((item, error))
        error.__traceback__ = stack_traceback(error.stack, item)

    def _lost(
        self, item: pytest.Function, worker: Worker, exc: BaseException, doing: str
    ) -> WorkerCrashed:
        """Say in a sentence that the channel to the worker failed, for the test's report.

        The plugin's frames and the wire's own exception would tell the user
        nothing they can act on.
        """
        what = "its reply was corrupt" if isinstance(exc, _wire.WireError) else "its pipe broke"
        pid = _pid_of(worker)
        detail = str(exc) if isinstance(exc, _wire.WireError) else f"{type(exc).__name__}: {exc}"
        error = WorkerCrashed(
            f"worker lost: {what}{f' (pid {pid})' if pid else ''} while it {doing} "
            f"{item.nodeid} ({detail}); the next test gets a fresh worker",
            pid=pid or 0,
            exitcode=None,
        )
        self._casualty(item, error)
        return error

    def start_failed(self, item: pytest.Function, exc: BaseException) -> WorkerStartError:
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


def _module_path(node: pytest.Item | pytest.Collector) -> str:
    module = node.module  # type: ignore[union-attr]
    return str(getattr(module, "__file__", None) or node.path)


def _code_for(worker: Worker, spec: _runbody.BodySpec) -> Optional[bytes]:
    """The test module's rewritten code, unless this worker (just started) has had it."""
    if spec.module_path in worker.modules or spec.module_path in worker.preloaded:
        return None  # it has the module already
    worker.modules.add(spec.module_path)
    return _compat.rewritten_code(spec.module_path)


def _call_context(worker: Optional[Worker] = None) -> dict[str, Any]:
    """The parent's environment, cwd and sys.path, to apply in the worker for a call.

    A running worker is sent only what changed since its last call: pytest
    changes one variable per test, and the whole of it costs more to build
    and move than a trivial test takes to run. The worker puts back what a
    body changed on its side.
    """
    cwd = os.getcwd()
    raw = getattr(os.environ, "_data", None)
    if worker is None or not isinstance(raw, dict):
        return {"cwd": cwd, "path": list(sys.path), "env": dict(os.environ)}
    context: dict[str, Any] = {}
    if cwd != worker.sent_cwd:
        context["cwd"] = worker.sent_cwd = cwd
    if sys.path != worker.sent_path:
        context["path"] = worker.sent_path = list(sys.path)
    sent = worker.sent_env
    changes: dict[str, Optional[str]] = {
        os.fsdecode(k): os.fsdecode(v) for k, v in raw.items() if sent.get(k) != v
    }
    changes.update((os.fsdecode(k), None) for k in sent.keys() - raw.keys())
    worker.sent_env = dict(raw)
    context["env_changes"] = changes  # even empty: the worker then checks its own
    return context


def _pid_of(worker: Worker) -> Optional[int]:
    """The worker's pid, if it can still be told."""
    try:
        return worker.pid
    except Exception:  # a forked worker's pid comes from a template that may be gone
        return None


def _worker_of(item: pytest.Function) -> Worker:
    worker = item.funcargs[worker_fixture(item.stash[SETTINGS].scope)]
    assert isinstance(worker, Worker)
    return worker
