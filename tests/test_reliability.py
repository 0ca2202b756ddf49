"""Acceptance tests: faults from outside a test body must not break the run.

Each fault is one a user's suite can bring about: a module in the run folder
named like a standard one, a test module that starts a thread at import, a
worker that dies while a process it forked holds its pipe, a template that
dies or cannot fork, pytest holding more than 1,024 fds, a worker killed
between two tests, a run that never needs a worker. Each test writes a small
suite, runs it in an inner pytest in a subprocess, bounded by a timeout, and
checks its outcomes and what the user reads.

A process one of these tests looks at after the inner run is named by its pid
and start time, recorded by the inner suite. It is signalled only if it is
still that process and is ours: a descendant of this process, or carrying a
token this test put in the inner run's environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from _inner import PLUGIN, assert_gone, read_pids, wait_for
from _inner import run_inner as run

from pytest_subproc._template import fork_supported

pytestmark = pytest.mark.usefixtures("no_plugin_autoload")

needs_fork = pytest.mark.skipif(not fork_supported(), reason="forking needs POSIX")
needs_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="child subreapers are Linux's"
)
START_METHODS = ["spawn", pytest.param("fork", marks=needs_fork)]

# Long enough for a slow machine; a regression that hangs ends here.
INNER_TIMEOUT = 60

# What must never reach the user from the plugin's own machinery.
NEVER_SHOWN = (
    "*INTERNALERROR*",
    "*Traceback*",
    "*BrokenPipeError*",
    "*assert None is not None*",
    "*Exception ignored*",
)

# The variable a test puts its token in, for the inner run's processes to inherit.
TOKEN_VAR = "PYTEST_SUBPROC_RELIABILITY_TOKEN"


def assert_nothing_internal(result: pytest.RunResult, *also: str) -> None:
    """Neither stream shows a trace of the plugin's machinery (nor any of ``also``)."""
    for stream in (result.stdout, result.stderr):
        for pattern in (*NEVER_SHOWN, *also):
            stream.no_fnmatch_line(pattern)


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    """A token every process of the inner run inherits in its environment."""
    value = uuid.uuid4().hex
    monkeypatch.setenv(TOKEN_VAR, value)
    return value


def _still(pid: int, created: float) -> psutil.Process | None:
    """The process ``pid`` if it is still the one started at ``created`` and running."""
    try:
        proc = psutil.Process(pid)
        if proc.create_time() != created or proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.Error:
        return None
    return proc


def gone(pid: int, created: float) -> bool:
    """Whether the process recorded as (pid, start time) has exited."""
    return _still(pid, created) is None


def kill_if_ours(pid: int, created: float, token: str) -> None:
    """SIGKILL the recorded process, only if it still is that process and is ours.

    Held first by a pidfd (Linux), so the signal reaches the process the checks
    were about or none; without pidfds psutil compares the start time again
    before it signals.
    """
    fd = -1
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        except OSError:  # pidfds refused here: psutil's check of the start time stands in
            fd = -1
    try:
        proc = _still(pid, created)
        if proc is None:
            return
        try:
            ours = any(p.pid == os.getpid() for p in proc.parents())
            ours = ours or proc.environ().get(TOKEN_VAR) == token
        except psutil.Error:
            return
        if not ours:
            return
        with contextlib.suppress(OSError, psutil.Error):
            if fd >= 0:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            else:
                proc.kill()
    finally:
        if fd >= 0:
            os.close(fd)


def read_record(path: Path) -> tuple[int, float]:
    """The (pid, start time) an inner test body wrote to ``path``."""
    pid, created = json.loads(path.read_text())
    return int(pid), float(created)


# --------------------------------------------------------------------------
# The user's folder and modules
# --------------------------------------------------------------------------


# pytest as its console script starts it: sys.path[0] is the script's folder, not the cwd.
LAUNCHER = "import sys, pytest\nsys.exit(pytest.main())\n"


def run_from_folder(pytester: pytest.Pytester, *args: str, timeout: float) -> pytest.RunResult:
    """Run pytest from ``pytester.path`` with nothing of that folder on sys.path.

    ``runpytest_subprocess`` runs ``python -m pytest`` with the cwd on
    PYTHONPATH, where a user's ``random.py`` breaks pytest itself.
    """
    launcher = pytester.path / "launcher"
    launcher.mkdir(exist_ok=True)
    (launcher / "run_pytest.py").write_text(LAUNCHER)
    cmd = [sys.executable, str(launcher / "run_pytest.py"), *PLUGIN, "-p", "no:cacheprovider"]
    cmd.append(f"--basetemp={pytester.path / 'basetemp'}")
    started = time.monotonic()
    done = subprocess.run(
        [*cmd, *args],
        cwd=pytester.path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    result = pytest.RunResult(
        done.returncode,
        done.stdout.splitlines(),
        done.stderr.splitlines(),
        time.monotonic() - started,
    )
    assert "ResourceWarning" not in done.stderr, done.stderr
    return result


# One marked test per scope kind (shared and alone) and a plain one.
SHADOWED_SUITE = """
import pytest

@pytest.mark.subprocess
def test_marked():
    pass

@pytest.mark.subprocess(scope="function")
def test_marked_alone():
    pass

def test_plain():
    pass
"""


@pytest.mark.parametrize("start", START_METHODS)
def test_a_stdlib_named_module_in_the_run_folder_breaks_no_marked_test(
    pytester: pytest.Pytester, start: str
) -> None:
    """pytest never puts the cwd on sys.path; the template and the workers must not either,
    before they have imported what they need."""
    pytester.makepyfile(
        random="def roll():\n    return 4\n",
        json="def dumps(obj):\n    return 'not json'\n",
        test_shadowed=SHADOWED_SUITE,
    )
    # In-process, the same suite passes: the folder is put on sys.path only to
    # import the test module, after pytest's own imports.
    alone = run_from_folder(pytester, "-p", "no:pytest_subproc.plugin", timeout=INNER_TIMEOUT)
    alone.assert_outcomes(passed=3)
    result = run_from_folder(pytester, f"--subprocess-start={start}", "-rA", timeout=INNER_TIMEOUT)
    result.assert_outcomes(passed=3)
    assert_nothing_internal(result, "*ImportError*", "*WorkerStartError*", "*_zygote*")


THREAD_AT_IMPORT = """
import threading, time, pytest

LOCK = threading.Lock()

def _refresher():
    while True:
        with LOCK:
            time.sleep(0.05)
        time.sleep(0.001)

threading.Thread(target=_refresher, daemon=True).start()

@pytest.mark.subprocess(timeout=5)
def test_uses_lock():
    with LOCK:
        pass

@pytest.mark.subprocess(timeout=5)
def test_uses_lock_again():
    with LOCK:
        pass

@pytest.mark.subprocess(timeout=5, scope="function")
@pytest.mark.parametrize("n", range(2))
def test_uses_lock_alone(n):
    with LOCK:
        pass
"""


@pytest.mark.parametrize("start", START_METHODS)
def test_a_module_that_starts_a_thread_at_import_runs_without_deadlock(
    pytester: pytest.Pytester, start: str
) -> None:
    """A fork copies one thread: a lock another thread held stays locked in the worker.

    The template must not fork with such a thread in it; the next module still
    gets its worker.
    """
    pytester.makepyfile(
        test_1_thread=THREAD_AT_IMPORT,
        test_2_next="""
        import pytest

        @pytest.mark.subprocess
        def test_next_module():
            pass

        @pytest.mark.subprocess(scope="function")
        def test_next_module_alone():
            pass
        """,
    )
    # Lists every test phase that took 4 s or more: a deadlock would take the 5 s timeout.
    durations = ("--durations=0", "--durations-min=4")
    result = run(pytester, f"--subprocess-start={start}", "-rA", *durations, timeout=INNER_TIMEOUT)
    result.assert_outcomes(passed=6)
    assert_nothing_internal(result, "*WorkerTimeout*", "*timed out*")
    for phase in ("setup", "call", "teardown"):
        result.stdout.no_fnmatch_line(f"*[0-9]s {phase} *")


# --------------------------------------------------------------------------
# Deaths the parent must notice at once
# --------------------------------------------------------------------------

# The grandchild sleeps this long at most, so that nothing waits on it for long.
GRANDCHILD_SLEEP = 8


@needs_linux
def test_a_worker_that_dies_while_its_c_forked_child_holds_the_pipe_is_reported_at_once(
    pytester: pytest.Pytester, token: str
) -> None:
    """A fork() from C runs no at-fork hook: the grandchild keeps the reply pipe open.

    The worker's death must be noticed from the process, not the pipe's end.
    """
    record = pytester.path / "grandchild.json"
    pytester.makepyfile(
        test_c_fork=f"""
        import ctypes, json, os, time
        import psutil, pytest

        @pytest.mark.subprocess
        def test_worker_dies_while_a_c_forked_child_lives():
            pid = ctypes.CDLL(None).fork()
            if pid == 0:
                time.sleep({GRANDCHILD_SLEEP})
                os._exit(0)
            with open({str(record)!r}, "w") as f:
                json.dump([pid, psutil.Process(pid).create_time()], f)
            os._exit(3)

        def test_plain_after():
            pass
        """
    )
    try:
        result = run(pytester, "-rA", timeout=INNER_TIMEOUT)
        # The session's own time: starting the interpreter is no part of it.
        took = float(re.findall(r" in ([0-9.]+)s", result.stdout.str())[-1])
        result.assert_outcomes(passed=1, failed=1)
        result.stdout.fnmatch_lines(
            [
                "*_ test_worker_dies_while_a_c_forked_child_lives _*",
                "*WorkerCrashed: worker crashed: exit code 3*",
            ]
        )
        result.stdout.no_fnmatch_line("*WorkerTimeout*")
        assert_nothing_internal(result)
        # Not when the grandchild exits, GRANDCHILD_SLEEP seconds after the worker died.
        assert took < GRANDCHILD_SLEEP / 2, f"the crash was reported after {took:.1f} s"
        pid, created = read_record(record)
        assert wait_for(lambda: gone(pid, created), timeout=5), "the grandchild outlived the run"
    finally:
        if record.exists():
            kill_if_ours(*read_record(record), token)


TEMPLATE_DIES_AT_IMPORT = """
import os, sys, pytest

if sys.argv[0].endswith("_zygote.py"):  # only true in the worker template
    os.kill(os.getpid(), 9)             # stands for an import that crashes that process

@pytest.mark.subprocess
def test_a():
    pass

def test_plain():
    pass
"""


@needs_fork
def test_a_template_that_dies_importing_a_module_fails_no_innocent_test(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        test_r4a=TEMPLATE_DIES_AT_IMPORT,
        test_r4b="""
        import pytest

        @pytest.mark.subprocess
        def test_innocent_next_module():
            pass
        """,
    )
    started = time.monotonic()
    result = run(pytester, "-rA", "--tb=short", timeout=INNER_TIMEOUT)
    took = time.monotonic() - started
    # test_a's own module kills every process that imports it, its worker too,
    # which collects the module at the test's setup.
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*_ ERROR at setup of test_a _*",
            "*pytest_subproc.*Worker*",
            "*PASSED test_r4a.py::test_plain*",
            "*PASSED test_r4b.py::test_innocent_next_module*",
        ]
    )
    assert_nothing_internal(result, "*did not answer in time*")
    assert took < 20, f"the run took {took:.1f} s"


FORK_FAILS_IN_THE_TEMPLATE = """
import os, sys, pytest

if sys.argv[0].endswith("_zygote.py"):  # only true in the worker template
    def _fork():
        raise BlockingIOError(11, "Resource temporarily unavailable")

    os.fork = _fork

@pytest.mark.subprocess(scope="function")
def test_needs_a_fork():
    pass

def test_plain():
    pass
"""


@needs_fork
def test_a_fork_that_fails_is_a_clear_error_of_the_test_that_needed_it(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        test_1_nofork=FORK_FAILS_IN_THE_TEMPLATE,
        test_2_after="""
        def test_plain_after():
            pass
        """,
    )
    started = time.monotonic()
    result = run(pytester, "-rA", "--tb=short", timeout=INNER_TIMEOUT)
    took = time.monotonic() - started
    outcomes = result.parseoutcomes()
    # The marked test fails (in setup or call); nothing else does.
    failed = outcomes.get("failed", 0) + outcomes.get("errors", 0) + outcomes.get("error", 0)
    assert (outcomes.get("passed", 0), failed) == (2, 1), result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*_ ERROR at setup of test_needs_a_fork _*",
            "*WorkerStartError: *could not be forked*Resource temporarily unavailable*",
            "*PASSED test_1_nofork.py::test_plain*",
            "*PASSED test_2_after.py::test_plain_after*",
        ],
        consecutive=False,
    )
    assert_nothing_internal(result, "*did not answer in time*", "*template exited*")
    assert took < 20, f"the run took {took:.1f} s"


# --------------------------------------------------------------------------
# Resources of the pytest process
# --------------------------------------------------------------------------

MANY_FDS = 1100

MANY_FDS_CONFTEST = f"""
import os, resource

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft != resource.RLIM_INFINITY and soft < 2048:
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
_KEEP = [os.open(os.devnull, os.O_RDONLY) for _ in range({MANY_FDS})]
"""


@pytest.mark.parametrize("start", START_METHODS)
def test_pytest_holding_more_than_1024_fds_runs_marked_tests(
    pytester: pytest.Pytester, start: str
) -> None:
    """select() rejects fds of 1024 or more: nothing of the plugin's may use it."""
    resource = pytest.importorskip("resource")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the hard limit on open files is {hard}")
    pytester.makeconftest(MANY_FDS_CONFTEST)
    pytester.makepyfile(test_fds=SHADOWED_SUITE)
    result = run(pytester, f"--subprocess-start={start}", "-rA", timeout=INNER_TIMEOUT)
    result.assert_outcomes(passed=3)
    assert_nothing_internal(result, "*ValueError*", "*out of range*")


# --------------------------------------------------------------------------
# A worker lost between tests
# --------------------------------------------------------------------------

ROUNDS = 3


def _killed_between_tests_suite(record: Path) -> str:
    """ROUNDS rounds of: a marked test records its worker, a plain test kills it, a marked
    test runs next."""
    head = f"""
import json, os, signal
import psutil, pytest
from pidlog import log

RECORD = {str(record)!r}


def record_worker():
    with open(RECORD, "w") as f:
        json.dump([os.getpid(), psutil.Process().create_time()], f)


def kill_recorded_worker():
    # Only the worker recorded: same pid, same start time, still our descendant.
    with open(RECORD) as f:
        pid, created = json.load(f)
    fd = os.pidfd_open(pid)
    try:
        proc = psutil.Process(pid)
        assert proc.create_time() == created, "not the recorded worker"
        assert any(p.pid == os.getpid() for p in proc.parents()), "not our descendant"
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        os.close(fd)
    log("killed", pid)
"""
    rounds = [
        f"""

@pytest.mark.subprocess
def test_{n}_1_records_its_worker():
    record_worker()


def test_{n}_2_worker_is_killed_between_tests():
    kill_recorded_worker()


@pytest.mark.subprocess
def test_{n}_3_innocent():
    log("innocent{n}")
"""
        for n in range(ROUNDS)
    ]
    return head + "".join(rounds)


@needs_linux
def test_a_worker_killed_between_tests_does_not_fail_the_next_marked_test(
    pytester: pytest.Pytester, pidlog: Path
) -> None:
    record = pytester.path / "worker.json"
    pytester.makepyfile(test_killed=_killed_between_tests_suite(record))
    for attempt in range(3):  # the kill races the next request: try it more than once
        pidlog.write_text("")
        result = run(pytester, "-rA", "--tb=short", timeout=INNER_TIMEOUT)
        result.assert_outcomes(passed=3 * ROUNDS)
        result.stdout.no_fnmatch_line("*WorkerCrashed*")
        assert_nothing_internal(result)
        lines = pidlog.read_text().split()
        assert lines.count("killed") == ROUNDS, f"attempt {attempt}: {lines}"
        assert_gone(read_pids(pidlog).values())


# --------------------------------------------------------------------------
# Quiet when unused
# --------------------------------------------------------------------------

QUIET_SUITE = """
import pytest

print("IMPORT-TIME-OUTPUT")

def test_1_plain():
    assert FAIL_PLAIN is False

@pytest.mark.subprocess
def test_2_marked():
    pass

@pytest.mark.subprocess(scope="function")
def test_3_marked_alone():
    pass
"""

QUIET_CASES = {
    # case: (extra files, args, (exit code, outcomes or None), whether test_1_plain fails)
    "collect-only": ({}, ("--co",), (0, None), False),
    "deselected": ({}, ("-k", "plain"), (0, {"passed": 1, "deselected": 2}), False),
    "stopped-first": ({}, ("-x",), (1, {"failed": 1}), True),
    "collection-error": (
        {"test_4_broken": "raise RuntimeError('broken at import')\n"},
        (),
        (2, {"errors": 1}),
        False,
    ),
    "usage-error": ({}, ("--subprocess-scope=bogus",), (4, None), False),
    "full-run": ({}, (), (0, {"passed": 3}), False),
}


@needs_fork
@pytest.mark.parametrize("case", list(QUIET_CASES))
def test_a_run_that_needs_no_worker_shows_nothing_of_the_plugin(
    pytester: pytest.Pytester, case: str
) -> None:
    """Nor, in a run that uses one, does a test module's import-time output (captured
    in-process too).

    The template is started while pytest collects, so it may be cut short at
    any point: whatever it then says, the user must not read it.
    """
    files, args, (code, outcomes), fails = QUIET_CASES[case]
    pytester.makepyfile(test_quiet=f"FAIL_PLAIN = {fails}\n" + QUIET_SUITE.lstrip(), **files)
    result = run(pytester, "--subprocess-start=fork", *args, timeout=INNER_TIMEOUT)
    assert result.ret == code, result.stdout.str() + result.stderr.str()
    if outcomes is not None:
        result.assert_outcomes(**outcomes)
    if case == "collect-only":
        result.stdout.fnmatch_lines(["*3 tests collected*"])
    if case == "usage-error":
        result.stderr.fnmatch_lines(["*bogus*"])
    assert_nothing_internal(result, "*_zygote*", "*IMPORT-TIME-OUTPUT*")
    if case != "full-run":  # the plugin's summary, only for a run that used it
        result.stdout.no_fnmatch_line("*subprocess workers*")


# --------------------------------------------------------------------------
# Nothing outlives a crash
# --------------------------------------------------------------------------


@needs_linux
def test_a_process_that_left_the_workers_session_dies_with_the_crashed_worker(
    pytester: pytest.Pytester, token: str
) -> None:
    """Out of the worker's process group, it is still the (subreaper) worker's descendant,
    and the template's orphan once the worker has died."""
    record = pytester.path / "sleep.json"
    pytester.makepyfile(
        test_server=f"""
        import json, os, subprocess
        import psutil, pytest

        @pytest.mark.subprocess
        def test_crash_after_starting_a_server():
            child = subprocess.Popen(["sleep", "30"], start_new_session=True)
            with open({str(record)!r}, "w") as f:
                json.dump([child.pid, psutil.Process(child.pid).create_time()], f)
            os._exit(1)

        def test_plain_after():
            pass
        """
    )
    try:
        result = run(pytester, "-rA", "--tb=short", timeout=INNER_TIMEOUT)
        result.assert_outcomes(passed=1, failed=1)
        result.stdout.fnmatch_lines(
            [
                "*_ test_crash_after_starting_a_server _*",
                "*WorkerCrashed: worker crashed: exit code 1*",
            ]
        )
        assert_nothing_internal(result)
        pid, created = read_record(record)
        assert wait_for(lambda: gone(pid, created), timeout=5), "the sleep outlived its worker"
    finally:
        if record.exists():
            kill_if_ours(*read_record(record), token)
