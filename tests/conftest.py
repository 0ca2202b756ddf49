"""Suite-wide guards: a test that leaks processes or file descriptors, or
changes this process's environment, cwd or sys.path, fails.

Every test is checked for

* child processes it started that are still running when it ends;
* orphans: processes started during the test, no longer our descendants (an
  inner ``pytester.runpytest_subprocess`` run that exited and left its worker
  behind), recognised by a token this session puts in the environment;
* file descriptors it opened and did not close (POSIX only);
* os.environ, the cwd and sys.path left other than it found them.

A leaked process is killed and reaped before the test is failed, and a changed
environment, cwd or sys.path put back, so one leak does not cascade into
failures of the tests that follow.

The machine may be shared: only a process proved ours is ever signalled. It is
held first (on Linux by a pidfd, which names the process, not its pid), then
proved a descendant of this process or started with our token, then signalled
through what holds it, so that the signal can reach no process that took its
pid since.
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import signal
import sys
import time
import uuid
from collections.abc import Iterator, Sequence

import psutil
import pytest
from _inner import ProcessState, no_plugin_autoload, pidlog  # noqa: F401 - fixtures for the tests

# Exiting children get this long to be reaped before they count as leaked.
CHILD_GRACE = 2.0
# Threads that are shutting down may still be closing descriptors.
FD_GRACE = 0.5

TOKEN_VAR = "PYTEST_SUBPROC_SUITE_TOKEN"
# What marks a process as started by this session, fresh in each process so
# that xdist workers do not take each other's descendants for their own
# orphans. Kept here: a test may change or empty os.environ, and a token read
# back from there could be missing, and then match every process without it.
TOKEN = uuid.uuid4().hex
_ME = psutil.Process()
# Whether a process can be held by a pidfd (Linux 5.3 and later).
_PIDFD = hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")


def pytest_configure(config: pytest.Config) -> None:
    # For our descendants to inherit.
    os.environ[TOKEN_VAR] = TOKEN


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        _set_up_state_check_first(item)


def _set_up_state_check_first(item: pytest.Item) -> None:
    """Make ``_state_kept`` the test's first function-scoped fixture.

    Set up first, it is torn down last: after every other fixture of the test
    (monkeypatch and pytester included) has put back what it changed. It comes
    after the fixtures of wider scope, which it must not count as the test's.
    """
    info = getattr(item, "_fixtureinfo", None)
    names = getattr(info, "names_closure", None)
    if names is None or "_state_kept" not in names:
        return
    names.remove("_state_kept")
    defs = info.name2fixturedefs

    def wider(name: str) -> bool:
        return bool(defs.get(name)) and defs[name][-1].scope != "function"

    first = next((i for i, name in enumerate(names) if not wider(name)), len(names))
    names.insert(first, "_state_kept")


def _is_ours(proc: psutil.Process, anchors: Sequence[int] = ()) -> bool:
    """Whether ``proc`` descends from this process (or one of ``anchors``) or carries our token."""
    try:
        if any(p.pid == _ME.pid or p.pid in anchors for p in proc.parents()):
            return True
        return proc.environ().get(TOKEN_VAR) == TOKEN
    except psutil.Error:  # gone meanwhile, or not ours to read
        return False


def _new_processes(existing: set[int]) -> list[psutil.Process]:
    """Processes started since ``existing`` was taken that are ours.

    Ours means a descendant of this process, or carrying this session's token
    (an orphan whose parent has exited). Diffing pid lists, rather than
    calling ``children(recursive=True)`` twice, keeps the check at a fraction
    of a millisecond per test: only the few new pids are looked at. What is
    found here is proved ours again before it is signalled (see ``_hold``).
    """
    found = []
    for pid in set(psutil.pids()) - existing:
        try:
            proc = psutil.Process(pid)
        except psutil.Error:
            continue
        if _is_ours(proc):
            found.append(proc)
    return found


class _Held:
    """A process held so that signals sent through this reach it and no other.

    A pidfd names the process itself: once it is reaped, signalling through
    the pidfd fails instead of reaching whatever took its pid. Without one,
    psutil compares the start time before each signal, which leaves only the
    instant between that comparison and the signal.
    """

    def __init__(self, proc: psutil.Process, fd: int | None) -> None:
        self.proc = proc
        self.fd = fd

    def holds_pid(self) -> bool:
        """Whether the process has not been reaped, and so still owns its pid."""
        if self.fd is None:
            return self.proc.is_running()
        try:
            signal.pidfd_send_signal(self.fd, 0)
        except OSError:
            return False
        return True

    def kill(self) -> None:
        with contextlib.suppress(OSError, psutil.Error):
            if self.fd is None:
                self.proc.kill()  # psutil checks the start time first
            else:
                signal.pidfd_send_signal(self.fd, signal.SIGKILL)

    def exited(self) -> bool:
        """Whether the process has exited (held by a pidfd only)."""
        assert self.fd is not None
        poll = select.poll()
        poll.register(self.fd, select.POLLIN)
        return bool(poll.poll(0))

    def reap(self) -> None:
        """Reap the process if it is our child and has exited."""
        if self.fd is not None and hasattr(os, "P_PIDFD"):
            with contextlib.suppress(OSError):
                os.waitid(os.P_PIDFD, self.fd, os.WEXITED | os.WNOHANG)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _hold(proc: psutil.Process, roots: Sequence[_Held] = ()) -> _Held | None:
    """Hold ``proc`` if it is proved ours, else None.

    Ours: a descendant of this process or of one of ``roots`` (held already),
    or started with our token. The proof is made once the process is held,
    and counts only if it and the roots still own their pids afterwards: the
    pids then named them throughout.
    """
    fd = None
    if _PIDFD:
        try:
            fd = os.pidfd_open(proc.pid)
        except ProcessLookupError:
            return None
        except OSError:  # pidfds refused here: fall back on the start time
            fd = None
    held = _Held(proc, fd)
    anchors = [root.proc.pid for root in roots]
    if (
        proc.is_running()  # not a process that took the pid since ``proc`` was made
        and _is_ours(proc, anchors)
        and held.holds_pid()
        and all(root.holds_pid() for root in roots)
    ):
        return held
    held.close()
    return None


def _is_worker(proc: psutil.Process) -> bool:
    try:
        return proc.ppid() == _ME.pid and "pytest_subproc" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def _kill_trees(roots: list[_Held]) -> None:
    """Kill each held process with its descendants, and reap those that are our children.

    Every descendant is held and proved ours before any process is killed,
    while the roots it descends from still stand.
    """
    victims = list(roots)
    for root in roots:
        try:
            descendants = root.proc.children(recursive=True)
        except psutil.Error:
            continue
        for proc in descendants:
            held = _hold(proc, roots)
            if held is not None:
                victims.append(held)
    try:
        for held in reversed(victims):  # children first
            held.kill()
        deadline = time.monotonic() + CHILD_GRACE
        pending = [held for held in victims if held.fd is not None]
        while pending and time.monotonic() < deadline:
            pending = [held for held in pending if not held.exited()]
            if pending:
                time.sleep(0.005)
        for held in victims:
            held.reap()
        # Without pidfds, psutil reaps our children by pid (checked against
        # reuse by start time).
        psutil.wait_procs([held.proc for held in victims if held.fd is None], timeout=CHILD_GRACE)
    finally:
        for held in victims:
            held.close()


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid}: {' '.join(proc.cmdline())[:200]}"
    except psutil.Error:
        return f"pid {proc.pid}"


def _fd_table() -> dict[int, str] | None:
    """Map each open fd to what it points at, or None where that cannot be read.

    Sockets are left out. pytest_subproc opens none, but pytest-rerunfailures
    (with xdist installed) opens a listening socket in every pytest session it
    configures and never closes it, so each in-process ``pytester`` run would
    look like a leak. Elsewhere than Linux only the count is known, so the
    check there skips tests that use ``pytester`` (see ``_no_leaks``).
    """
    if sys.platform.startswith("linux"):
        table = {}
        for name in os.listdir("/proc/self/fd"):
            # The fd listdir itself used is closed by now: skip it.
            with contextlib.suppress(OSError):
                table[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        return {fd: what for fd, what in table.items() if not what.startswith("socket:")}
    if os.name == "posix":
        try:
            return {i: "?" for i in range(_ME.num_fds())}
        except psutil.Error:
            return None
    return None


def _uses_outer_plugin(item: pytest.Item) -> bool:
    """Whether the test legitimately holds workers (and their pipes) past its end.

    A scoped worker started by this test's marker or ``subworker`` lives until
    its pytest scope ends, which is after this check runs.
    """
    if item.get_closest_marker("subprocess") is not None:
        return True
    if "subworker" in getattr(item, "fixturenames", ()):
        return True
    # `--subprocess` / `subprocess_all`: every test runs in a worker.
    if item.config.getoption("subprocess_all", default=False):
        return True
    try:
        return bool(item.config.getini("subprocess_all"))
    except ValueError:  # the plugin is not loaded
        return False


def _running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes that have not exited; exited ones are left for their owner to reap."""
    alive = []
    for proc in procs:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            pass
    return alive


def _wait_exit(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    alive = _running(procs)
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = _running(alive)
    return alive


def _check_processes(item: pytest.Item, existing: set[int]) -> list[str]:
    new = _new_processes(existing)
    if _uses_outer_plugin(item):
        new = [p for p in new if not _is_worker(p)]
    alive = _wait_exit(new, CHILD_GRACE)
    if not alive:
        return []
    held = [h for h in map(_hold, alive) if h is not None]
    report = [_describe(h.proc) for h in held]
    _kill_trees(held)
    return report


def _check_fds(before: dict[int, str]) -> list[str]:
    # A full collection costs ~10 ms in a pytest process, so it runs only when
    # the count went up: an unreachable file object may be what holds the fd.
    deadline = time.monotonic() + FD_GRACE
    after = _fd_table() or {}
    while len(after) > len(before) and time.monotonic() < deadline:
        gc.collect()
        after = _fd_table() or {}
        if len(after) > len(before):
            time.sleep(0.05)
    if len(after) <= len(before):
        return []
    return [f"fd {fd} -> {what}" for fd, what in sorted(after.items()) if before.get(fd) != what]


@pytest.fixture(autouse=True)
def _no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaves child processes or open file descriptors behind."""
    item = request.node
    # The fd check is skipped where the test holds workers on purpose (their
    # pipes stay open until the scope ends). On Linux, in-process pytester
    # runs are checked like any other test: the inner session must close what
    # it opened.
    check_fds = not _uses_outer_plugin(item) and (
        sys.platform.startswith("linux") or "pytester" not in item.fixturenames
    )
    fds_before = _fd_table() if check_fds else None
    existing = set(psutil.pids())
    yield
    problems = _check_processes(item, existing)
    if problems:
        pytest.fail("test leaked processes (now killed):\n  " + "\n  ".join(problems))
    if fds_before is not None:
        leaked = _check_fds(fds_before)
        if leaked:
            pytest.fail("test leaked file descriptors:\n  " + "\n  ".join(leaked))


@pytest.fixture(autouse=True)
def _state_kept() -> Iterator[None]:
    """Fail the test if it leaves os.environ, the cwd or sys.path changed.

    What changed is put back first. This is set up first among the test's
    function-scoped fixtures (see ``_set_up_state_check_first``), so that the
    check runs once all of them are torn down.
    """
    before = ProcessState()
    yield
    changed = before.restore()
    if changed:
        pytest.fail("test left this process changed (now put back):\n  " + "\n  ".join(changed))
