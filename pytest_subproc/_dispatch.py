"""The parent's runtime: route marked tests to scoped workers, keep the books."""

from __future__ import annotations

import inspect
import logging
import os
import pickle
import re
import sys
import types
import unittest
import warnings
from dataclasses import dataclass, field
from typing import Any, NoReturn, Optional

import pytest

from pytest_subproc import _compat, _errors, _runbody
from pytest_subproc._codec import PROTOCOL as PICKLE_PROTOCOL
from pytest_subproc._exceptions import WorkerCrashed, WorkerTimeout
from pytest_subproc._process import PACKAGE_ROOT, Worker, child_env
from pytest_subproc._settings import MARKER, Defaults, Settings, for_item
from pytest_subproc._subworker import relay_output
from pytest_subproc._template import Template
from pytest_subproc._wire import Kind

SETTINGS = pytest.StashKey[Settings]()
SPEC = pytest.StashKey[_runbody.BodySpec]()


class SubprocessWarning(pytest.PytestWarning):
    """Something done in the parent for a marked test cannot reach its worker."""


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
    template: Optional[Template] = None
    spare: Optional[Worker] = None  # forked ahead for the next module's or test's worker

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
                item.warn(
                    SubprocessWarning(
                        f"{item.nodeid} is marked subprocess, but pytest_subproc cannot "
                        "ship it (unittest, async or non-Python test): it runs in the "
                        "pytest process"
                    )
                )
        item.stash[SETTINGS] = settings
        if isolated:
            item.fixturenames.append(worker_fixture(settings.scope))  # type: ignore[attr-defined]

    def warm_up(self) -> None:
        """Start the template now (without waiting), if workers will be forked."""
        if self.template is None and self.defaults.start == "fork":
            self.template = Template(child_env(), PACKAGE_ROOT)
        if self.template is not None:
            self.template.launch()

    def new_worker(self, item: pytest.Item, scope: str) -> Worker:
        """Return a worker for one scope instance; it starts on first use."""
        self.warm_up()
        if scope == "session" or self.template is None or not isinstance(item, pytest.Function):
            return self._worker()
        # A worker per module or per test: each takes the one forked while the
        # one before it served, and has the next forked meanwhile. Per test,
        # they come from a template that has imported the test module.
        if scope == "function":
            path = str(getattr(item.module, "__file__", None) or item.path)
            self.preload(item.module.__name__, path, _call_context())
            if self.spare is not None and path not in self.spare.preloaded:
                self.retire(self.spare)  # forked before this module was imported
                self.spare = None
        worker, self.spare = self.spare or self._launched(), self._launched()
        return worker

    def _launched(self) -> Worker:
        worker = self._worker()
        worker.launch()
        return worker

    def _worker(self) -> Worker:
        worker = Worker(capture=self.capture, template=self.template)
        self.live.append(worker)
        return worker

    def retire(self, worker: Worker) -> None:
        """Close a worker at the end of its scope and count its starts."""
        try:
            worker.close()
        finally:
            if worker in self.live:
                self.live.remove(worker)
            self.workers += worker.starts
            self.restarts += max(worker.starts - 1, 0)

    def close_all(self) -> None:
        """Close every worker still open (the run is ending, maybe on Ctrl-C)."""
        self.spare = None
        for worker in list(self.live):
            self.retire(worker)
        if self.template is not None:
            self.template.close()
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
        the same bytes to every test.
        """
        worker, spec = _worker_of(item), item.stash[SPEC]
        new = {n: v for n, v in spec.values.items() if (n, hash(v)) not in worker.checked}
        if not new:
            return
        call: tuple[Any, ...] = (_runbody.unsendable, (new,), {})
        worker.start()
        failed = worker.request(Kind.CALL, call, context=_call_context(worker)).unwrap()
        for name, why in failed.items():
            _unsendable(item, name, f"cannot be rebuilt in the subprocess worker: {why}")
        worker.checked.update((n, hash(v)) for n, v in new.items())

    def run(self, item: pytest.Function) -> None:
        """Run the item's body in its worker and raise what it raised."""
        __tracebackhide__ = True
        settings = item.stash[SETTINGS]
        worker, spec = _worker_of(item), item.stash[SPEC]
        worker.start()  # the environment's changes are counted from its last call
        context = _call_context(worker)
        code = _code_for(worker, spec)
        call: tuple[Any, ...] = (_runbody.run_body, (spec, code), {})
        reply = worker.request(Kind.CALL, call, timeout=settings.timeout, context=context)
        relay_output(reply)
        if isinstance(reply.error, (WorkerCrashed, WorkerTimeout)):
            self.casualties.append((item.nodeid, str(reply.error).partition("\n")[0]))
            # Point the report at the line the worker was on, as for any failure.
            reply.error.__traceback__ = stack_traceback(reply.error.stack, item)
        result: _runbody.BodyResult = reply.unwrap()
        replay(result)
        if result.returned is not None:
            _warn_return(item, result.returned)
        if result.error is not None:
            raise _errors.load_exception(result.error)


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


def _code_for(worker: Worker, spec: _runbody.BodySpec) -> Optional[bytes]:
    """The test module's rewritten code, unless this worker has had it."""
    if not worker.alive:
        worker.modules.clear()  # a fresh worker is on its way
    if spec.module_path in worker.modules or spec.module_path in worker.preloaded:
        return None  # it has the module already
    worker.modules.add(spec.module_path)
    return _compat.rewritten_code(spec.module_path)


def _call_context(worker: Optional[Worker] = None) -> dict[str, Any]:
    """The parent's environment, cwd and sys.path, to apply in the worker for a call.

    A running worker is sent only what changed in the environment since its
    last call: pytest changes one variable per test, and the whole of it
    costs more to build and move than a trivial test takes to run.
    """
    context: dict[str, Any] = {"cwd": os.getcwd(), "path": list(sys.path)}
    raw = getattr(os.environ, "_data", None)
    if worker is None or not isinstance(raw, dict) or not all(type(k) is bytes for k in raw):
        context["env"] = dict(os.environ)
        return context
    sent = worker.sent_env
    changes: dict[str, Optional[str]] = {
        os.fsdecode(k): os.fsdecode(v) for k, v in raw.items() if sent.get(k) != v
    }
    changes.update((os.fsdecode(k), None) for k in sent.keys() - raw.keys())
    worker.sent_env = dict(raw)
    context["env_changes"] = changes
    return context


def _worker_of(item: pytest.Function) -> Worker:
    worker = item.funcargs[worker_fixture(item.stash[SETTINGS].scope)]
    assert isinstance(worker, Worker)
    return worker


def _warn_return(item: pytest.Function, type_name: str) -> None:
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


def _pickled(item: pytest.Function, name: str) -> bytes:
    try:
        return pickle.dumps(item.funcargs[name], protocol=PICKLE_PROTOCOL)
    except Exception as exc:
        why = f"cannot be sent to the subprocess worker: {type(exc).__name__}: {exc}"
        _unsendable(item, name, why)


def _unsendable(item: pytest.Function, name: str, why: str) -> NoReturn:
    # An error at setup whose message says it all: the plugin's frames would hide it.
    pytest.fail(f"fixture {name!r} of {item.nodeid} {why}", pytrace=False)


def _picklable_options(config: pytest.Config) -> dict[str, Any]:
    options = {}
    for name, value in vars(config.option).items():
        try:
            pickle.dumps(value)
        except Exception:
            continue
        options[name] = value
    return options


def _request_facts(item: pytest.Function) -> _runbody.RequestFacts:
    callspec = getattr(item, "callspec", None)
    markers = []
    for mark in item.iter_markers():
        try:
            pickle.dumps((mark.args, mark.kwargs))
            markers.append((mark.name, mark.args, dict(mark.kwargs)))
        except Exception:
            markers.append((mark.name, (), {}))
    node = _runbody.NodeFacts(
        name=item.name,
        nodeid=item.nodeid,
        keywords=tuple(item.keywords),
        params=dict(callspec.params) if callspec is not None else {},
        markers=tuple(markers),
    )
    return _runbody.RequestFacts(node, _runbody.ConfigFacts(_picklable_options(item.config)))


def build_spec(item: pytest.Function, verbosity: int) -> _runbody.BodySpec:
    """Collect what the worker needs for this test; fail naming any fixture that cannot cross."""
    argnames = _compat.function_argnames(item)
    builtins = {n: n for n in argnames if n in _compat.COUNTERPARTS}
    values = {n: _pickled(item, n) for n in argnames if n not in builtins}
    cls = item.cls
    qualname = getattr(item, "originalname", item.name)
    if cls is not None:
        qualname = f"{cls.__qualname__}.{qualname}"
    module = item.module
    return _runbody.BodySpec(
        module_name=module.__name__,
        module_path=str(getattr(module, "__file__", None) or item.path),
        qualname=qualname,
        values=values,
        builtins=builtins,
        request=_request_facts(item) if "request" in builtins else None,
        verbosity=verbosity,
        instance=_instance(item),
        log_level=logging.getLogger().getEffectiveLevel(),
    )


def _instance(item: pytest.Function) -> Optional[bytes]:
    """The test's class instance, pickled, or None (the worker makes a fresh one)."""
    instance = getattr(item, "instance", None)
    if instance is None:
        return None
    try:
        return pickle.dumps(instance, protocol=PICKLE_PROTOCOL)
    except Exception as exc:
        if vars(instance):  # a fresh instance would miss what setup put there
            warnings.warn(
                SubprocessWarning(
                    f"the {type(instance).__name__} instance of {item.nodeid} cannot be sent to "
                    f"its subprocess worker ({type(exc).__name__}: {exc}); the body runs on a "
                    f"fresh instance, without the attributes {sorted(vars(instance))}"
                ),
                stacklevel=2,
            )
        return None


def warn_parent_patches(item: pytest.Function) -> None:
    """Warn about parent-side monkeypatches the worker cannot see."""
    mp: Optional[pytest.MonkeyPatch] = item.funcargs.get("monkeypatch")  # type: ignore[assignment]
    targets = _compat.monkeypatch_targets(mp) if mp is not None else []
    if targets:
        warnings.warn(
            SubprocessWarning(
                f"{item.nodeid} runs in a subprocess worker, but monkeypatch changed "
                f"{', '.join(targets)} in the parent only; the test body will not see it. "
                "Patch inside the test body instead."
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


def has_worker_frames(exc: BaseException) -> bool:
    """Whether exc's traceback runs through frames rebuilt from the worker's."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__") == _errors.WORKER_FRAME_MODULE:
            return True
        tb = tb.tb_next
    return False
