"""Acceptance tests: the plugin's own hooks, and how a run reports its workers.

A conftest implementing ``pytest_subprocess_worker_started``, ``_crashed``
and ``_closed`` logs what it is told to a file; the tests compare that log
with what the inner run did. The account is the "subprocess workers"
section and the short summary lines, under xdist too.

Inner runs start with plugin autoloading off and ``-p pytest_subproc.plugin``:
the other installed plugins only slow the runs down.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest
from _inner import assert_gone
from _inner import run_inner as run

pytestmark = pytest.mark.usefixtures("no_plugin_autoload")

LOGGING_CONFTEST = """
import os


def _log(*words):
    with open(os.environ["HOOKLOG"], "a") as f:
        f.write(" ".join(map(str, words)) + "\\n")


def pytest_subprocess_worker_started(worker):
    _log("started", worker.pid, worker.scope)


def pytest_subprocess_worker_crashed(item, error):
    _log("crashed", item.name, type(error).__name__, error.pid)


def pytest_subprocess_worker_closed(worker):
    _log("closed", worker.pid, worker.scope, worker.exitcode)
"""

CRASHES = """
import os
import time

import pytest


@pytest.mark.subprocess
def test_passes():
    pass


@pytest.mark.subprocess
def test_crashes():
    os._exit(3)


@pytest.mark.subprocess(timeout=0.5)
def test_hangs():
    time.sleep(60)


@pytest.mark.subprocess(scope="function")
def test_own_worker():
    pass


def test_drives_a_worker(subworker):
    subworker.run("import os; os._exit(4)")
"""


@pytest.fixture
def hooklog(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = pytester.path / "hooks.txt"
    monkeypatch.setenv("HOOKLOG", str(path))
    pytester.makeconftest(LOGGING_CONFTEST)
    return path


def read_log(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()]


def test_hooks_tell_each_start_crash_timeout_and_close(
    pytester: pytest.Pytester, hooklog: Path
) -> None:
    pytester.makepyfile(test_crashes=CRASHES)
    result = run(pytester, "-p", "no:randomly")
    result.assert_outcomes(passed=2, failed=3)
    log = read_log(hooklog)
    crashed = [(w[1], w[2]) for w in log if w[0] == "crashed"]
    assert crashed == [
        ("test_crashes", "WorkerCrashed"),
        ("test_hangs", "WorkerTimeout"),
        ("test_drives_a_worker", "WorkerCrashed"),
    ]
    started = [w[1] for w in log if w[0] == "started"]
    closed = {w[1]: w[3] for w in log if w[0] == "closed"}
    assert sorted(started) == sorted(closed), "every worker started is closed once"
    # The module's worker, its two replacements, and the function-scoped one.
    assert len(started) == len(set(started)) == 4
    for line in (w for w in log if w[0] == "crashed"):
        pid = line[3]
        # Started before it crashed, closed after.
        assert log.index(["started", pid, "module"]) < log.index(line)
        assert log.index(line) < next(i for i, w in enumerate(log) if w[:2] == ["closed", pid])
    codes = [closed[w[3]] for w in log if w[0] == "crashed"]
    assert codes == ["3", "-9", "4"]  # the timed-out worker was killed
    assert [w[2] for w in log if w[0] == "started" and w[2] != "module"] == ["function"]
    assert_gone(int(pid) for pid in started)


def test_a_crash_in_a_fixture_is_told(pytester: pytest.Pytester, hooklog: Path) -> None:
    pytester.makepyfile(
        test_setup="""
        import os
        import pytest

        @pytest.fixture
        def exits():
            os._exit(3)

        @pytest.mark.subprocess
        def test_setup_crashes(exits):
            pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(errors=1)
    log = read_log(hooklog)
    assert [w[:3] for w in log if w[0] == "crashed"] == [
        ["crashed", "test_setup_crashes", "WorkerCrashed"]
    ]
    assert [w[3] for w in log if w[0] == "closed"] == ["3"]


def test_a_hook_that_raises_fails_the_test_and_leaves_no_worker(
    pytester: pytest.Pytester, hooklog: Path
) -> None:
    pytester.makeconftest(
        LOGGING_CONFTEST
        + """
def pytest_subprocess_worker_crashed(item, error):
    _log("crashed", item.name, type(error).__name__, error.pid)
    raise RuntimeError("the hook broke")
"""
    )
    pytester.makepyfile(
        test_crash="""
        import os
        import pytest

        @pytest.mark.subprocess
        def test_crashes():
            os._exit(3)

        @pytest.mark.subprocess
        def test_after():
            pass
        """
    )
    result = run(pytester, "-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*RuntimeError: the hook broke*"])
    result.stdout.no_fnmatch_line("*INTERNALERROR*")
    log = read_log(hooklog)
    started = [w[1] for w in log if w[0] == "started"]
    assert len(started) == 2
    assert sorted(started) == sorted(w[1] for w in log if w[0] == "closed")
    assert_gone(int(pid) for pid in started)


def test_reports_name_the_public_class_and_what_happened(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_x="""
        import os
        import signal
        import pytest

        @pytest.mark.subprocess
        def test_segv():
            os.kill(os.getpid(), signal.SIGSEGV)

        @pytest.mark.subprocess(timeout=0.5)
        def test_hangs():
            import time
            time.sleep(60)

        def test_drives_a_worker(subworker):
            subworker.run("import os; os._exit(3)")
        """
    )
    result = run(pytester, "-p", "no:randomly", "-rf")
    result.assert_outcomes(failed=3)
    summary = result.stdout.str().partition("short test summary info")[2].splitlines()[1:4]
    expected = [
        "FAILED test_x.py::test_segv - WorkerCrashed: signal SIGSEGV (pid *)",
        "FAILED test_x.py::test_hangs - WorkerTimeout: timed out after 0.5 s (pid *)",
        "FAILED test_x.py::test_drives_a_worker - WorkerCrashed: exit code 3 (pid *)",
    ]
    assert [fnmatch.fnmatch(line, p) for line, p in zip(summary, expected)] == [True] * 3
    assert all(len(line) <= 80 for line in summary)
    result.stdout.fnmatch_lines(
        ["E*pytest_subproc.WorkerCrashed: worker crashed: signal SIGSEGV (pid *)"]
    )
    assert "pytest_subproc._" not in result.stdout.str()


def test_one_summary_under_xdist_lists_every_casualty(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile(
        test_many="""
        import os
        import pytest

        @pytest.mark.subprocess
        @pytest.mark.parametrize("n", range(6))
        def test_passes(n):
            pass

        @pytest.mark.subprocess
        def test_crashes():
            os._exit(3)

        def test_drives_a_worker(subworker):
            subworker.run("import os; os._exit(5)")
        """
    )
    result = run(pytester, "-p", "xdist.plugin", "-n", "2")
    result.assert_outcomes(passed=6, failed=2)
    assert result.stdout.str().count("subprocess workers") == 1
    section = result.stdout.str().partition("subprocess workers")[2]
    assert "test_many.py::test_crashes: worker crashed: exit code 3 (pid " in section
    result.stdout.fnmatch_lines(
        ["test_many.py::test_drives_a_worker: worker crashed: exit code 5 (pid *), in a subworker*"]
    )
    result.stdout.fnmatch_lines(["workers started: *, restarted after a crash or timeout: *"])


SUBWORKER_MISTAKES = """
import threading


class NoWayBack:
    def __reduce__(self):
        raise TypeError("no way back")


def test_call_of_a_lambda(subworker):
    subworker.call(lambda: 1)


def test_store_of_a_lock(subworker):
    subworker.store("lock", threading.Lock())


def test_load_of_a_missing_name(subworker):
    subworker.load("nope")


def test_run_of_bad_syntax(subworker):
    subworker.run("x = = 1")


def test_call_whose_answer_cannot_come_back(subworker):
    subworker.run("import test_mistakes")
    subworker.call(NoWayBack)
"""


def test_subworker_mistakes_show_the_call_site_and_a_sentence(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_mistakes=SUBWORKER_MISTAKES)
    result = run(pytester, "-p", "no:randomly", "-rf")
    result.assert_outcomes(failed=5)
    result.stdout.fnmatch_lines(
        [
            ">       subworker.call(lambda: 1)",
            "E       AttributeError: subworker.call cannot send "
            "'test_call_of_a_lambda.<locals>.<lambda>' to the worker: a function travels "
            "by reference, so it must be defined at the top level of a module*",
            "test_mistakes.py:*: AttributeError",
            '>       subworker.store("lock", threading.Lock())',
            "E       TypeError: subworker.store cannot send the value to the worker: pickle "
            "cannot pickle it (TypeError: cannot pickle '_thread.lock' object)",
            '>       subworker.load("nope")',
            "E       NameError: name 'nope' is not defined in the worker",
            "test_mistakes.py:*: NameError",
            '>       subworker.run("x = = 1")',
            "E       SyntaxError: the source given to subworker.run does not compile: "
            "invalid syntax (line 1: 'x = = 1')",
            "test_mistakes.py:*: SyntaxError",
        ]
    )
    result.stdout.fnmatch_lines(["FAILED *::test_run_of_bad_syntax - SyntaxError: the source*"])
    out = result.stdout.str()
    assert "_codec.py" not in out
    assert "_child.py" not in out
    assert "pytest_subproc._" not in out
