"""Acceptance tests of the ``subworker`` fixture, through an inner pytest process.

Each test writes a small suite with ``pytester`` and runs it with pytest in
its own process, so that a crash, a kill or a Ctrl-C hits the inner run only.
One inner run serves many checks: its test names say which behaviour or which
seed defect (see the seed's notes) each one pins down.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest
from _inner import read_pids, wait_for

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")

INNER_TIMEOUT = 60
# hypothesis' plugin, where installed, adds about a second to a Ctrl-C'd run.
INNER_ARGS = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")

API_TESTS = '''
import datetime
import decimal
import enum
import fractions
import os
import re
import signal
import threading
import time

import pytest
import pytest_subproc
from pytest_subproc import ChildTraceException, WorkerCrashed

STATE = {}


class MyError(Exception):
    """Defined here: the parent has imported it, so it revives as itself."""


class Color(enum.Enum):
    RED = 1


class Level(enum.IntEnum):
    HIGH = 3


class MyInt(int):
    pass


def add(a, b, *, c=0):
    return a + b + c


def raise_my_error(code):
    raise MyError("custom failure", code)


def test_run_store_load_call(subworker):
    subworker.run("import json; x = json.dumps([1])")
    assert subworker.load("x") == "[1]"
    subworker.store("y", {"a": [1, 2]})
    subworker.run(
        """
        z = y["a"][1] * 10
        """
    )
    assert subworker.load("z") == 20
    assert subworker.call(add, 1, 2, c=3) == 6
    assert subworker.call(os.getpid) == subworker.pid != os.getpid()
    assert subworker.alive
    big = bytes(range(256)) * (32 << 12)  # 8 MiB: larger than any pipe buffer
    subworker.store("big", big)
    assert subworker.load("big") == big
    STATE["pid"] = subworker.pid


def test_output_is_relayed(subworker):
    subworker.run("import sys; print('hello from the worker'); print('oops', file=sys.stderr)")
    assert subworker.pid == STATE["pid"]


def test_errors_revive_as_their_own_type(subworker):
    """seed defects 10 and 13: tracebacks were lost, non-builtin types not revived."""
    with pytest.raises(ZeroDivisionError) as info:
        subworker.run("n = 1\\nn / 0  # divide here")
    assert type(info.value) is ZeroDivisionError
    cause = info.value.__cause__
    assert isinstance(cause, ChildTraceException)
    assert "Traceback (most recent call last)" in str(cause)
    assert "n / 0  # divide here" in str(cause)
    with pytest.raises(MyError) as info:
        subworker.call(raise_my_error, 7)
    assert type(info.value) is MyError
    assert info.value.args == ("custom failure", 7)
    assert isinstance(info.value.__cause__, ChildTraceException)
    with pytest.raises(SystemExit) as info:
        subworker.run("import sys; sys.exit(5)")
    assert info.value.code == 5
    # None of these hurt the worker.
    assert subworker.pid == STATE["pid"]


def test_defect_14_source_lines_in_report(subworker):
    """seed defect 14: runs compiled as <subprocess-worker> showed no source lines."""
    subworker.run(
        """
        a = 1
        b = a / 0  # the failing line
        """
    )


def test_a_source_run_again_keeps_its_name_and_its_own_lines(subworker):
    first, second = "x = 1\\nraise ValueError('first')", "y = 2\\nraise KeyError('second')"
    names = []
    for source, line in [(first, "first"), (second, "second"), (first, "first")]:
        with pytest.raises((ValueError, KeyError)) as info:
            subworker.run(source)
        cause = str(info.value.__cause__)
        assert f"raise {type(info.value).__name__}('{line}')" in cause
        names.append(re.search(r"<subworker-run-\\w+>", cause).group())
    assert names[0] == names[2] != names[1]


def test_defect_12_skip_inside_run(subworker):
    """seed defect 12: pytest outcomes escaped the worker's loop and hung the next request."""
    subworker.run("import pytest; pytest.skip('skipped in the worker')")


def test_defect_12_next_request_after_skip(subworker):
    subworker.run("after_skip = 1")
    assert subworker.load("after_skip") == 1
    assert subworker.pid == STATE["pid"]


def test_defect_16_store_rejects_code_in_names(subworker):
    """seed defect 16: store pasted the name into source, so a name could run code."""
    listing = "names = sorted(k for k in globals() if not k.startswith('__') and k != 'names')"
    subworker.run(listing)
    before = subworker.load("names")
    for bad in ["injected = 1; import os", "a b", "1a", "", "x.y", "__import__('os')", 3]:
        with pytest.raises(ValueError, match="identifier"):
            subworker.store(bad, 1)
        with pytest.raises(ValueError, match="identifier"):
            subworker.load(bad)
    subworker.run(listing)
    assert subworker.load("names") == before
    subworker.run("assert 'injected' not in globals()")


VALUES = {
    "when": datetime.datetime(
        2024, 2, 29, 23, 59, 58, 123456, tzinfo=datetime.timezone(datetime.timedelta(hours=5))
    ),
    "day": datetime.date(1999, 12, 31),
    "span": datetime.timedelta(days=-1, microseconds=7),
    "money": decimal.Decimal("1.10"),
    "color": Color.RED,
    "level": Level.HIGH,
    "myint": MyInt(7),
    "truth": True,
    "buf": bytearray(b"\\x00\\xffab"),
    "third": fractions.Fraction(1, 3),
    "nested": {"k": [1, (2, 3)], "s": frozenset({4, 5}), "b": b"\\x00"},
}


@pytest.mark.parametrize("name", sorted(VALUES))
def test_defect_17_values_round_trip(subworker, name):
    """seed defect 17: marshal refused datetime, Decimal, enums, int subclasses.

    And it turned a bytearray into bytes.
    """
    value = VALUES[name]
    subworker.store(name, value)
    subworker.run(f"kind = type({name}).__qualname__; text = repr({name})")
    assert subworker.load("kind") == type(value).__qualname__
    assert subworker.load("text") == repr(value)
    back = subworker.load(name)
    assert type(back) is type(value)
    assert back == value
    assert repr(back) == repr(value)


def test_defect_17_values_work_in_the_worker(subworker):
    subworker.store("buf", bytearray(b"ab"))
    subworker.store("money", decimal.Decimal("1.10"))
    subworker.store("color", Color.RED)
    subworker.run("import decimal; buf.append(0x43); money += decimal.Decimal('0.01')")
    assert subworker.load("buf") == bytearray(b"abC")
    assert str(subworker.load("money")) == "1.11"
    assert subworker.load("color") is Color.RED


def test_crash_then_a_new_worker(subworker):
    subworker.run("x = 1")
    pid = subworker.pid
    with pytest.raises(WorkerCrashed) as info:
        subworker.run("import ctypes; ctypes.string_at(0)")
    assert info.value.signal == "SIGSEGV"
    assert info.value.pid == pid
    assert str(info.value).startswith(f"worker crashed: signal SIGSEGV (pid {pid})")
    assert not subworker.alive
    subworker.run("y = 2")
    assert subworker.alive
    assert subworker.pid != pid
    assert subworker.load("y") == 2
    with pytest.raises(NameError):
        subworker.load("x")  # the namespace died with the old worker


def test_defect_5_sigkill_noticed_quickly(subworker, tmp_path):
    """seed defect 5: death seen by a 1 s polling thread; now end-of-file shows it at once."""
    ready = tmp_path / "ready"
    subworker.run("pass")
    pid = subworker.pid
    killed = []

    def kill_when_busy():
        deadline = time.monotonic() + 10
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        killed.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    try:
        with pytest.raises(WorkerCrashed) as info:
            subworker.run(f"open({str(ready)!r}, 'w').close(); import time; time.sleep(300)")
    finally:
        killer.join()
    assert time.monotonic() - killed[0] < 0.5
    assert info.value.signal == "SIGKILL"
    assert info.value.exitcode == -signal.SIGKILL


def test_defect_8_exit_code_survives(subworker):
    """seed defect 8: the watchdog reaped the child itself and later saw exit code 0."""
    subworker.run("pass")
    assert subworker.alive
    with pytest.raises(WorkerCrashed) as info:
        subworker.run("import os; os._exit(3)")
    assert info.value.exitcode == 3
    assert info.value.signal is None
    assert "worker crashed: exit code 3" in str(info.value)


def test_a_timeout_beyond_any_wait_means_none(subworker):
    subworker.run("x = 1", timeout=1e300)
    subworker.run("x = 2", timeout=10**400)
    assert subworker.load("x") == 2


@pytest.mark.xfail(raises=pytest_subproc.WorkerCrashed, strict=True)
def test_crash_is_an_expected_failure(subworker):
    subworker.run("import os; os.abort()")


def test_timeout_shows_the_stack(subworker):
    subworker.run(
        """
        import time

        def hang_in_helper():
            time.sleep(300)

        hang_in_helper()
        """,
        timeout=0.5,
    )
'''

SCOPE_MODULE = """
import os


def _record(subworker, name):
    subworker.run("pass")
    with open("pids.txt", "a") as f:
        f.write(f"{name} {subworker.pid}\\n")


def test_first(subworker):
    _record(subworker, "{module}-first")


def test_second(subworker):
    _record(subworker, "{module}-second")
"""

STARTUP = """
print("STARTUP-FILE-RAN")
open({marker!r}, "w").close()
"""


def test_subworker_acceptance(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """One inner run: the API, errors, crashes, timeouts, module scope, hygiene.

    seed defect 15: no banner, no TIMER lines, and PYTHONSTARTUP is not run
    even when it is set in the environment.
    """
    marker = pytester.path / "startup-ran"
    startup = pytester.makepyfile(startup_file=STARTUP.format(marker=str(marker)))
    monkeypatch.setenv("PYTHONSTARTUP", str(startup))
    pytester.makepyfile(
        test_api=API_TESTS,
        test_scope_a=SCOPE_MODULE.replace("{module}", "a"),
        test_scope_b=SCOPE_MODULE.replace("{module}", "b"),
    )
    result = pytester.runpytest_subprocess(
        *INNER_ARGS, "-rA", "test_api.py", "test_scope_a.py", "test_scope_b.py",
        timeout=INNER_TIMEOUT,
    )  # fmt: skip
    result.assert_outcomes(passed=26, failed=2, skipped=1, xfailed=1)
    lines = result.stdout.lines
    out = result.stdout.str()

    # Errors read as the user's own: the source line of the run, the type.
    result.stdout.fnmatch_lines(
        [
            "*_ test_defect_14_source_lines_in_report _*",
            "*ChildTraceException: Traceback (most recent call last):",
            '  File "<subworker-run-*>", line 3, in <module>',
            "    b = a / 0  # the failing line",
            "ZeroDivisionError: division by zero",
            "*direct cause of the following exception*",
            ">   b = a / 0  # the failing line",
            "E   ZeroDivisionError: division by zero",
        ]
    )
    # A timeout names the value and shows where the worker hung.
    result.stdout.fnmatch_lines(
        [
            "*_ test_timeout_shows_the_stack _*",
            "E   *WorkerTimeout: worker timed out after 0.5 s (pid *)*",
            'E   *File "<subworker-run-*>", line 5 in hang_in_helper',
        ]
    )
    # pytest.skip inside a run skips the test, with the worker's reason.
    result.stdout.fnmatch_lines(["SKIPPED [[]1] *skipped in the worker"])
    result.stdout.fnmatch_lines(["XFAIL test_api.py::test_crash_is_an_expected_failure*"])
    # Output of a request reaches the test's captured output.
    result.stdout.fnmatch_lines(
        [
            "*- Captured stdout call -*",
            "hello from the worker",
            "*- Captured stderr call -*",
            "oops",
        ]
    )
    # The plugin's own frames are not in the reports.
    assert not any(f"pytest_subproc{os.sep}_" in line for line in lines), out

    # seed defect 15: no banner, no timer lines, no startup file.
    result.stdout.no_fnmatch_line("*STARTUP-FILE-RAN*")
    result.stdout.no_fnmatch_line("*TIMER*")
    result.stdout.no_fnmatch_line('*Type "help"*')
    result.stdout.no_fnmatch_line("*>>>*")
    assert not marker.exists()

    # One worker per module by default.
    pids = read_pids(pytester.path / "pids.txt")
    assert pids["a-first"] == pids["a-second"]
    assert pids["b-first"] == pids["b-second"]
    assert pids["a-first"] != pids["b-first"]

    # test_api: 1 + one after the segfault, SIGKILL, exit 3 and abort each; a, b: 1 each.
    result.stdout.fnmatch_lines(
        ["*- subprocess workers -*", "workers started: 7, restarted after a crash or timeout: 4"]
    )


MARKER_SCOPES = """
import os

import pytest


def _record(subworker, name):
    subworker.run("pass")
    with open("pids.txt", "a") as f:
        f.write(f"{name} {subworker.pid}\\n")
        f.write(f"{name}-body {os.getpid()}\\n")


def test_module_scope(subworker):
    _record(subworker, "{module}-module")


@pytest.mark.subprocess(scope="function")
def test_function_scope_one(subworker):
    _record(subworker, "{module}-function-one")


@pytest.mark.subprocess(scope="function")
def test_function_scope_two(subworker):
    _record(subworker, "{module}-function-two")


@pytest.mark.subprocess(scope="session")
def test_session_scope(subworker):
    _record(subworker, "{module}-session")
"""


def test_marker_scope_picks_the_subworker(pytester: pytest.Pytester) -> None:
    """`subprocess(scope=...)` on a test that uses `subworker` chooses its worker.

    The test body stays in the pytest process, driving that worker by hand.
    """
    pytester.makepyfile(
        test_mark_a=MARKER_SCOPES.replace("{module}", "a"),
        test_mark_b=MARKER_SCOPES.replace("{module}", "b"),
    )
    result = pytester.runpytest_subprocess(*INNER_ARGS, timeout=INNER_TIMEOUT)
    result.assert_outcomes(passed=8)
    pids = read_pids(pytester.path / "pids.txt")
    # The test body drives the worker from the pytest process.
    assert len({pid for name, pid in pids.items() if name.endswith("-body")}) == 1
    workers = {name: pid for name, pid in pids.items() if not name.endswith("-body")}
    assert workers["a-session"] == workers["b-session"]
    assert workers["a-module"] != workers["b-module"]
    for module in "ab":
        one, two = workers[f"{module}-function-one"], workers[f"{module}-function-two"]
        assert one != two
        assert {one, two}.isdisjoint(
            {workers["a-module"], workers["b-module"], workers["a-session"]}
        )


BUSY = """
import os


def test_busy(subworker):
    subworker.run("pass")
    with open("worker.pid.tmp", "w") as f:
        f.write(str(subworker.pid))
    os.replace("worker.pid.tmp", "worker.pid")
    subworker.run("import time; time.sleep(300)")
"""


def is_gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@contextlib.contextmanager
def busy_inner_pytest(
    pytester: pytest.Pytester,
) -> Iterator[tuple[subprocess.Popen[str], psutil.Process]]:
    """Start an inner pytest whose test blocks in a request; yield it and its worker."""
    pytester.makepyfile(test_busy=BUSY)
    pidfile = pytester.path / "worker.pid"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", *INNER_ARGS, "test_busy.py"],
        cwd=pytester.path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    worker = None
    try:
        if not wait_for(lambda: pidfile.exists() or proc.poll() is not None, INNER_TIMEOUT):
            pytest.fail("the inner pytest never reached its busy request")
        if proc.poll() is not None:
            pytest.fail(f"the inner pytest ended early:\n{proc.communicate()[0]}")
        worker = psutil.Process(int(pidfile.read_text()))
        yield proc, worker
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        if worker is not None:
            with contextlib.suppress(psutil.Error):
                worker.kill()


@posix_only
def test_worker_dies_with_a_killed_pytest(pytester: pytest.Pytester) -> None:
    """seed defect 9: a busy child outlived a killed parent indefinitely."""
    with busy_inner_pytest(pytester) as (proc, worker):
        assert not is_gone(worker)
        proc.kill()
        proc.wait()
        assert wait_for(lambda: is_gone(worker), 5.0), "the worker outlived its pytest"


@posix_only
def test_ctrl_c_ends_the_run_and_the_worker(pytester: pytest.Pytester) -> None:
    with busy_inner_pytest(pytester) as (proc, worker):
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=INNER_TIMEOUT)
        assert time.monotonic() - started < 5.0
        assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
        pytest.LineMatcher(out.splitlines()).fnmatch_lines(
            ["*! KeyboardInterrupt !*", "*no tests ran*"]
        )
        # Gone when pytest is: nothing left for the lifeline to clear up.
        assert is_gone(worker)
