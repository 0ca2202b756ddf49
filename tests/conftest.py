"""Suite-wide guards: a test that leaks processes or file descriptors fails.

Every test is checked for

* child processes it started that are still running when it ends;
* orphans: processes started during the test, no longer our descendants (an
  inner ``pytester.runpytest_subprocess`` run that exited and left its worker
  behind), recognised by a token this session puts in the environment;
* file descriptors it opened and did not close (POSIX only).

A leaked process is killed and reaped before the test is failed, so one leak
does not cascade into failures of the tests that follow.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
import uuid
from collections.abc import Iterator

import psutil
import pytest
from _inner import no_plugin_autoload, pidlog  # noqa: F401 - fixtures of the acceptance tests

# Exiting children get this long to be reaped before they count as leaked.
CHILD_GRACE = 2.0
# Threads that are shutting down may still be closing descriptors.
FD_GRACE = 0.5

TOKEN_VAR = "PYTEST_SUBPROC_SUITE_TOKEN"
_ME = psutil.Process()


def pytest_configure(config: pytest.Config) -> None:
    # A fresh token per process, so xdist workers do not see each other's
    # descendants as their own orphans.
    os.environ[TOKEN_VAR] = uuid.uuid4().hex


def _new_processes(existing: set[int]) -> list[psutil.Process]:
    """Processes started since ``existing`` was taken that are ours.

    Ours means a descendant of this process, or carrying this session's token
    (an orphan whose parent has exited). Diffing pid lists, rather than
    calling ``children(recursive=True)`` twice, keeps the check at a fraction
    of a millisecond per test: only the few new pids are looked at.
    """
    token = os.environ.get(TOKEN_VAR)
    found = []
    for pid in set(psutil.pids()) - existing:
        try:
            proc = psutil.Process(pid)
            mine = any(p.pid == _ME.pid for p in proc.parents())
            if mine or proc.environ().get(TOKEN_VAR) == token:
                found.append(proc)
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
    return found


def _is_worker(proc: psutil.Process) -> bool:
    try:
        return proc.ppid() == _ME.pid and "pytest_subproc" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def _kill_trees(procs: list[psutil.Process]) -> None:
    """Kill each process with its descendants, children first, and reap them."""
    victims: list[psutil.Process] = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            victims.extend(proc.children(recursive=True))
        victims.append(proc)
    for proc in victims:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(victims, timeout=CHILD_GRACE)


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
    report = [_describe(p) for p in alive]
    _kill_trees(alive)
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
