"""Every use of pytest's private API, in one place, for pytest 7, 8 and 9.

Most of it runs in the worker: making a config and session from arguments,
collecting one file under the session's collectors, running one phase of an
item inside the wrappers pytest puts around a whole test, and starting
pytest's debugger there. pytest's process uses it for junitxml and to show a
failure before ``--pdb`` debugs it.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import socket
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import pytest


def parsed_config(args: list[str]) -> pytest.Config:
    """Parse arguments, ini file, plugins and initial conftests as ``pytest`` does."""
    from _pytest.config import _prepareconfig

    return _prepareconfig(args)


def quiet_plugins(config: pytest.Config) -> None:
    """Stop what plugins started that a worker has no use for, and that forbids forking.

    pytest-rerunfailures serves its xdist status database from a thread in
    every run that has xdist installed; a worker never reruns anything.
    pytest-cov is turned off by ``--no-cov`` in a worker, which measures as
    the pytest process says instead; its plugin, left disabled, would fail
    every ``no_cover`` test.
    """
    if getattr(config.option, "no_cov", False) and config.pluginmanager.has_plugin("_cov"):
        config.pluginmanager.unregister(name="_cov")
    db = getattr(config, "failures_db", None)
    sock = getattr(db, "sock", None)
    if not isinstance(sock, socket.socket):
        return
    # The plugin's own no-op database, the one it uses where xdist is absent.
    config.failures_db = importlib.import_module(type(db).__module__).StatusDB()  # type: ignore[attr-defined]
    server = [t for t in threading.enumerate() if t.daemon and t is not threading.current_thread()]
    hook = threading.excepthook
    threading.excepthook = lambda args: None  # its accept() fails: that is the point
    try:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        sock.close()
        for thread in server:
            thread.join(1.0)
    finally:
        threading.excepthook = hook


def xdist_controller(config: pytest.Config, options: Any) -> bool:
    """Whether this process is pytest-xdist's controller (xdist's workers run the tests).

    ``options`` is ``config.option``, or before pytest has configured itself
    the options parsed so far (an xdist worker is told then by the variable
    xdist sets before it parses them).
    """
    if os.environ.get("PYTEST_XDIST_WORKER") or hasattr(config, "workerinput"):
        return False
    processes = getattr(options, "numprocesses", None)
    if processes in ("auto", "logical"):
        return not getattr(options, "usepdb", False)  # xdist runs in-process under --pdb
    if processes is not None:
        return bool(processes)
    return getattr(options, "dist", "no") != "no" and bool(getattr(options, "tx", None))


def share_dirs(config: pytest.Config, basetemp: Optional[str], cachedir: Optional[str]) -> None:
    """Point ``tmp_path`` and ``cache`` at the parent's directories."""
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is not None and basetemp is not None:
        # Set directly: a --basetemp would be emptied first, and it is the parent's.
        factory._basetemp = Path(basetemp)
    cache = getattr(config, "cache", None)
    if cache is not None and cachedir is not None:
        cache._cachedir = Path(cachedir)


def set_junitxml(config: pytest.Config, report: Any) -> None:
    """Give the record_xml_attribute and record_testsuite_property fixtures a report to use."""
    from _pytest.junitxml import xml_key

    config.stash[xml_key] = report


def junitxml(config: pytest.Config) -> Any:
    """The junitxml report this run writes, or None."""
    from _pytest.junitxml import xml_key

    return config.stash.get(xml_key, None)


class _Nowhere(io.StringIO):
    """A file that keeps nothing written to it."""

    def write(self, text: str) -> int:
        return len(text)


def start_session(config: pytest.Config) -> pytest.Session:
    """Make the session and start it, its terminal reporter writing nowhere.

    The reporter stays registered: pytest 8 asks it for its writer to
    explain a failed assertion. A worker has no terminal of its own.
    """
    from _pytest._io import TerminalWriter

    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        writer = TerminalWriter(_Nowhere())
        writer.hasmarkup = False
        reporter._tw = writer
    session = pytest.Session.from_config(config)
    _set_initial_paths(session)
    config.hook.pytest_sessionstart(session=session)
    return session


def _set_initial_paths(session: pytest.Session) -> None:
    """Name the paths given on the command line, as pytest's collection does.

    A file named there is collected whatever its name (``pytest checks.py``),
    and so must be in the worker, which never runs pytest's collection.
    """
    import os

    paths = set()
    for arg in session.config.args:
        path = Path(os.path.abspath(session.config.invocation_params.dir / arg.split("::")[0]))
        if path.exists():  # not a --pyargs module name
            paths.add(path)
    session._initialpaths = frozenset(paths)
    if hasattr(session, "_initialpaths_with_parents"):  # pytest 8
        session._initialpaths_with_parents = frozenset(
            {*paths, *(parent for path in paths for parent in path.parents)}
        )


def collect_file(session: pytest.Session, path: Path) -> tuple[list[pytest.Item], list[str]]:
    """Collect the items of one file, and the errors met on the way.

    The directories above it are collected once per session, as in a run of
    the whole suite, so package fixtures live across the files of a worker.
    """
    if not hasattr(session, "_collect_path"):  # pytest 7: a fresh tree per file
        return _collected_by_args(session, path)
    paths = [path]
    for parent in path.parents:
        if not session.config.pluginmanager._is_in_confcutdir(parent):
            break
        paths.insert(0, parent)
    cache = session.stash.setdefault(_PATH_CACHE, {})
    nodes: Sequence[Any] = session._collect_path(paths[0], cache)
    errors: list[str] = []
    for part in paths[1:]:
        nodes = [n for node in nodes for n in _children(session, node, errors) if n.path == part]
    items: list[pytest.Item] = []
    for node in nodes:
        items.extend(_items(session, node, errors))
    return items, errors


_PATH_CACHE = pytest.StashKey[dict[Path, Sequence[Any]]]()


def _children(session: pytest.Session, node: Any, errors: list[str]) -> Iterable[Any]:
    if isinstance(node, pytest.Item):
        return ()
    rep, _ = session._collect_one_node(node)
    if rep.failed:
        errors.append(f"{node.nodeid}: {rep.longreprtext}")
    return rep.result if rep.passed else ()


def _items(session: pytest.Session, node: Any, errors: list[str]) -> Iterable[pytest.Item]:
    if isinstance(node, pytest.Item):
        yield node
        return
    for sub in _children(session, node, errors):
        yield from _items(session, sub, errors)


def _collected_by_args(session: pytest.Session, path: Path) -> tuple[list[pytest.Item], list[str]]:
    try:
        return list(session.perform_collect([str(path)])), []
    except pytest.UsageError as exc:
        return [], [str(exc)]


class _Chain:
    """Stands for the next item of this worker where it is not collected here yet.

    Teardown only asks it for its chain of collectors, to keep those set up.
    """

    def __init__(self, chain: list[Any]) -> None:
        self.chain = chain

    def listchain(self) -> list[Any]:
        return self.chain


def next_item(
    session: pytest.Session, after: Optional[tuple[str, ...]], items: dict[str, Any]
) -> Any:
    """The next item this worker runs, as teardown wants it (None: tear down everything)."""
    if after is None:
        return None
    found = items.get(after[-1])
    if found is not None:
        return found
    kept = []
    for node, nodeid in zip(session._setupstate.stack, after):
        if node.nodeid != nodeid:
            break
        kept.append(node)
    return _Chain(kept)


def seed_location(item: pytest.Item, location: tuple[str, Optional[int], str]) -> None:
    """Give an item the location another process worked out for the same item.

    pytest caches ``Item.location`` in the item's ``__dict__``; working it
    out (relative paths from ``reportinfo``) costs more than a small test.
    """
    if "location" not in item.__dict__:
        item.__dict__["location"] = location


def collectors_kept(item: pytest.Item) -> bool:
    """Whether, in the item's teardown, some of its collectors were taken off pytest's stack.

    pytest-rerunfailures does so before a rerun, so that they are not torn down.
    """
    stack = item.session._setupstate.stack
    return any(node not in stack for node in item.listchain()[:-1])


def teardown_all(session: pytest.Session) -> None:
    """Finalize everything still set up (the worker's scope is ending)."""
    session._setupstate.teardown_exact(None)


def run_phase(item: pytest.Item, when: str, nextitem: Any) -> tuple[Optional[Any], Any]:
    """Run one phase as pytest's runner does; return its ExceptionInfo (if it raised) and report.

    The report is made so that hooks reading it (and unittest's recorded
    failures) see it; the worker sends back the exception, and what plugins
    added to the report.
    """
    from _pytest.runner import CallInfo

    def phase() -> None:
        if when == "setup":
            _setup(item)
        elif when == "call":
            item.ihook.pytest_runtest_call(item=item)
        else:
            try:
                item.ihook.pytest_runtest_teardown(item=item, nextitem=nextitem)
            finally:
                if hasattr(item, "_request"):  # as runtestprotocol lets them go
                    item._request = False
                    item.funcargs = None  # type: ignore[attr-defined]

    call = CallInfo.from_call(phase, when=when)  # type: ignore[arg-type]
    report = item.ihook.pytest_runtest_makereport(item=item, call=call)
    return call.excinfo, report  # read after: unittest's hook puts the test's failure there


def _setup(item: pytest.Item) -> None:
    if hasattr(item, "_request") and not item._request:
        item._initrequest()  # type: ignore[attr-defined] # run again here (a rerun)
    state = item.session._setupstate
    chain = item.listchain()
    if any(node not in chain for node in state.stack):
        state.teardown_exact(item)  # left set up by an item that never came
    item.ihook.pytest_runtest_setup(item=item)


class Protocol:
    """The ``pytest_runtest_protocol`` wrappers of one item, entered at setup, left after teardown.

    In pytest they wrap the item's three phases at once: warning filters and
    recording, assertion explanations, plugins' own. The implementations
    that run the protocol itself (pytest's runner, rerun plugins) are left
    out: the parent runs the protocol, the worker its phases.
    """

    def __init__(self, item: pytest.Item) -> None:
        self._open: list[tuple[Any, bool]] = []
        kwargs = {"item": item, "nextitem": None}
        for impl in reversed(item.ihook.pytest_runtest_protocol.get_hookimpls()):
            old = bool(impl.hookwrapper)
            if not (old or getattr(impl, "wrapper", False)):
                continue
            gen: Any = impl.function(*(kwargs[name] for name in impl.argnames))
            try:
                next(gen)
            except BaseException:
                self.close()
                raise
            self._open.append((gen, old))

    def close(self) -> None:
        """Leave the wrappers, innermost first; raise the first error one raised."""
        import pluggy

        errors: list[BaseException] = []
        while self._open:
            gen, old = self._open.pop()
            try:
                gen.send(pluggy.Result(True, None) if old else True)
            except StopIteration:
                pass
            except BaseException as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


# pytest's debugger (_pytest.debugging): the worker's debuggers and post-mortems.


def watch_debuggers(
    start: Callable[[], None],
    aside: Callable[[], None],
    back: Callable[[], None],
    capturing: Callable[[], Any],
) -> None:
    """Be told when pytest's debugger starts here, continues, and stops again after that.

    Every debugger pytest starts (``breakpoint()``, ``pdb.set_trace()``,
    ``--trace``, ``--pdb``) is made by ``pytestPDB._init_pdb``: ``start()``
    runs first. pytest turns capture back on at ``continue``, where
    ``aside()`` runs, and off when that debugger stops again (a breakpoint,
    Ctrl-C), where ``back()`` runs. Its banners say whether capture was
    turned off: in a worker, it is pytest's process that captures, as
    ``capturing()`` tells.
    """
    from _pytest.debugging import pytestPDB

    init = pytestPDB._init_pdb.__func__  # type: ignore[attr-defined]
    is_capturing = pytestPDB._is_capturing.__func__  # type: ignore[attr-defined]
    wrapper_class = pytestPDB._get_pdb_wrapper_class.__func__  # type: ignore[attr-defined]

    def _init_pdb(cls: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        start()
        return init(cls, method, *args, **kwargs)

    def _is_capturing(cls: Any, capman: Any) -> Any:
        return capturing() or is_capturing(cls, capman)

    def _get_pdb_wrapper_class(cls: Any, pdb_cls: Any, capman: Any) -> Any:
        base = wrapper_class(cls, pdb_cls, capman)

        class Wrapper(base):  # type: ignore[misc,valid-type]
            def do_continue(self, arg: str) -> Any:
                result = base.do_continue(self, arg)
                if pytestPDB._recursive_debug == 0:
                    aside()
                return result

            do_continue.__doc__ = base.do_continue.__doc__  # what pdb's help shows
            do_c = do_cont = do_continue

            def setup(self, f: Any, tb: Any) -> Any:
                if self._continued:
                    back()
                return base.setup(self, f, tb)

        Wrapper.__name__ = Wrapper.__qualname__ = base.__name__
        return Wrapper

    setattr(pytestPDB, "_init_pdb", classmethod(_init_pdb))  # noqa: B010 - a method
    setattr(pytestPDB, "_is_capturing", classmethod(_is_capturing))  # noqa: B010
    setattr(pytestPDB, "_get_pdb_wrapper_class", classmethod(_get_pdb_wrapper_class))  # noqa: B010


def post_mortem(excinfo: Any) -> None:
    """Debug a failure on its traceback, as pytest's ``--pdb`` does."""
    from _pytest import debugging

    target = getattr(debugging, "_postmortem_exc_or_tb", None)  # pytest 8.4 and later
    if target is None:
        target = debugging._postmortem_traceback  # type: ignore[attr-defined]
    debugging.post_mortem(target(excinfo))


def show_failure_for_pdb(node: Any, report: Any) -> None:
    """Write what pytest's ``--pdb`` writes before its post-mortem: output, traceback, banner."""
    capman = node.config.pluginmanager.getplugin("capturemanager")
    if capman:
        capman.suspend_global_capture(in_=True)
        out, err = capman.read_global_capture()
        sys.stdout.write(out)
        sys.stdout.write(err)
    tw = node.config.pluginmanager.getplugin("terminalreporter")._tw
    tw.line()
    showcapture = node.config.option.showcapture
    for name, content in (
        ("stdout", report.capstdout),
        ("stderr", report.capstderr),
        ("log", report.caplog),
    ):
        if showcapture in (name, "all") and content:
            tw.sep(">", "captured " + name)
            tw.line(content[:-1] if content.endswith("\n") else content)
    tw.sep(">", "traceback")
    report.toterminal(tw)
    tw.sep(">", "entering PDB")
    report._pdbshown = True  # the summary does not show the failure again
