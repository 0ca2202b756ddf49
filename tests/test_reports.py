"""Acceptance tests: how a marked test's failures, output, crashes and timeouts are reported.

A failure in a worker must read as it would in-process: the test's own source
with ``>`` and ``E`` lines and assertion introspection in every ``--tb`` style,
no plugin frames, the right exception type for ``xfail(raises=...)``, ``-x``,
``--lf``, junitxml and pytest-rerunfailures. Output is captured per call, kept
up to a crash, and streams with ``-s``. A crash or a timeout fails only its own
test, says what happened and where, and the next test gets a fresh worker.

Inner runs start with plugin autoloading off and ``-p pytest_subproc.plugin``:
the other installed plugins only slow the runs down.
"""

from __future__ import annotations

import json
import os
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from _inner import assert_gone, read_pids
from _inner import run_inner as run

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")


pytestmark = pytest.mark.usefixtures("no_plugin_autoload")


def section(result: pytest.RunResult, start: str, end: str) -> str:
    """The stdout lines from the first one containing ``start`` up to one containing ``end``."""
    lines = result.stdout.lines
    first = next(i for i, line in enumerate(lines) if start in line)
    last = next((i for i in range(first + 1, len(lines)) if end in lines[i]), len(lines))
    return "\n".join(lines[first:last])


def line_of(source: str, text: str) -> int:
    """The line number of the first line of ``source`` (as pytester writes it) holding ``text``."""
    lines = textwrap.dedent(source).strip().splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)


def failures(result: pytest.RunResult) -> str:
    """The FAILURES section of the report."""
    return section(result, "= FAILURES =", "short test summary info")


# --------------------------------------------------------------------------
# Tracebacks read natively
# --------------------------------------------------------------------------

FAILING = """
import pytest


def f():
    return 1


def helper(value):
    raise ValueError(f"bad value {value}")


@pytest.mark.subprocess
def test_assert():
    x = 1
    assert f() == 2


@pytest.mark.subprocess
def test_in_helper():
    helper(3)
"""
ASSERT_LINE = line_of(FAILING, "assert f() == 2")
CALL_LINE = line_of(FAILING, "helper(3)")
RAISE_LINE = line_of(FAILING, "raise ValueError")


def test_tb_long(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_failing=FAILING)
    result = run(pytester, "--tb=long")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*_ test_assert _*",
            "    @pytest.mark.subprocess",
            "    def test_assert():",
            "        x = 1",
            ">       assert f() == 2",
            "E       assert 1 == 2",
            "E        +  where 1 = f()",
            "",
            f"test_failing.py:{ASSERT_LINE}: AssertionError",
            "*_ test_in_helper _*",
            "    @pytest.mark.subprocess",
            "    def test_in_helper():",
            ">       helper(3)",
            "",
            f"test_failing.py:{CALL_LINE}: ",
            "*",
            "",
            "value = 3",
            "",
            "    def helper(value):",
            '>       raise ValueError(f"bad value {value}")',
            "E       ValueError: bad value 3",
            "",
            f"test_failing.py:{RAISE_LINE}: ValueError",
        ]
    )
    assert "pytest_subproc" not in failures(result)


def test_tb_short_hides_plugin_frames(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_failing=FAILING)
    result = run(pytester, "--tb=short")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*_ test_assert _*",
            f"test_failing.py:{ASSERT_LINE}: in test_assert",
            "    assert f() == 2",
            "E   assert 1 == 2",
            "E    +  where 1 = f()",
            "*_ test_in_helper _*",
            f"test_failing.py:{CALL_LINE}: in test_in_helper",
            "    helper(3)",
            f"test_failing.py:{RAISE_LINE}: in helper",
            '    raise ValueError(f"bad value {value}")',
            "E   ValueError: bad value 3",
        ]
    )
    assert "pytest_subproc" not in failures(result)
    # Neither the worker's own frames nor pytest's, on the way to the test.
    assert "_worker_items" not in result.stdout.str()
    assert "_pytest" not in failures(result)


def test_tb_line(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_failing=FAILING)
    result = run(pytester, "--tb=line")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            f"*test_failing.py:{ASSERT_LINE}: assert 1 == 2",
            f"*test_failing.py:{RAISE_LINE}: ValueError: bad value 3",
        ]
    )


def test_tb_native(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_failing=FAILING)
    result = run(pytester, "--tb=native")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*_ test_assert _*",
            "Traceback (most recent call last):",
            f'  File "*test_failing.py", line {ASSERT_LINE}, in test_assert',
            "    assert f() == 2",
            "*AssertionError: assert 1 == 2",
            "*_ test_in_helper _*",
            "Traceback (most recent call last):",
            f'  File "*test_failing.py", line {CALL_LINE}, in test_in_helper',
            "    helper(3)",
            f'  File "*test_failing.py", line {RAISE_LINE}, in helper',
            '    raise ValueError(f"bad value {value}")',
            "ValueError: bad value 3",
        ]
    )


def test_tb_no(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_failing=FAILING)
    result = run(pytester, "--tb=no", "-rf")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "FAILED test_failing.py::test_assert - assert 1 == 2",
            "FAILED test_failing.py::test_in_helper - ValueError: bad value 3",
        ]
    )
    result.stdout.no_fnmatch_line("*= FAILURES =*")


def test_assertion_introspection(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_asserts="""
        import pytest

        pytestmark = pytest.mark.subprocess

        def test_ints():
            assert 1 == 2

        def test_lists():
            assert [1, 2, 3] == [1, 2, 4]

        def test_dicts():
            assert {"a": 1, "b": 2} == {"a": 1, "b": 3}

        def test_message():
            value = 5
            assert value < 3, "value too big"
        """
    )
    result = run(pytester, "--tb=short")
    result.assert_outcomes(failed=4)
    result.stdout.fnmatch_lines(
        [
            "E   assert 1 == 2",
            "E   assert [1, 2, 3] == [1, 2, 4]",
            "E*At index 2 diff: 3 != 4",
            "E   AssertionError: assert {'a': 1, 'b': 2} == {'a': 1, 'b': 3}",
            "E*Differing items:",
            "E*{'b': 2} != {'b': 3}",
            "E   AssertionError: value too big",
            "E   assert 5 < 3",
        ]
    )
    # -v gives the full diff, as in-process.
    result = run(pytester, "--tb=short", "-v", "-k", "lists")
    result.stdout.fnmatch_lines(["E*Full diff:*"])


# --------------------------------------------------------------------------
# Outcomes and the tools that read them
# --------------------------------------------------------------------------


OUTCOMES = """
import sys
import pytest

pytestmark = pytest.mark.subprocess

@pytest.mark.xfail(raises=ZeroDivisionError, strict=True)
def test_xfail_raises_matches():
    1 / 0

@pytest.mark.xfail(raises=TypeError, strict=True)
def test_xfail_raises_other_type_fails():
    1 / 0

def test_skip():
    pytest.skip("skipped in the body")

def test_xfail_call():
    pytest.xfail("xfailed in the body")

def test_fail():
    pytest.fail("failed in the body")

def test_importorskip():
    pytest.importorskip("no_such_module_anywhere")

def test_did_not_raise():
    with pytest.raises(ValueError):
        pass

def test_sys_exit():
    sys.exit(2)
"""


def test_outcomes_raised_in_the_body(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_outcomes=OUTCOMES)
    result = run(pytester, "-rsxX", "--junitxml=junit.xml")
    result.assert_outcomes(failed=4, skipped=2, xfailed=2)
    skip_line = line_of(OUTCOMES, "pytest.skip(")
    result.stdout.fnmatch_lines_random(
        [
            f"SKIPPED [[]1[]] test_outcomes.py:{skip_line}: skipped in the body",
            "SKIPPED [[]1[]] test_outcomes.py:*: *no_such_module_anywhere*",
            "XFAIL test_outcomes.py::test_xfail_raises_matches",
            "XFAIL test_outcomes.py::test_xfail_call - *xfailed in the body",
        ]
    )
    result.stdout.fnmatch_lines_random(
        [
            "E *ZeroDivisionError: division by zero",
            "E *Failed: failed in the body",
            "E *Failed: DID NOT RAISE *ValueError*",  # pytest 9.2 dropped the <class ...>
            "E *SystemExit: 2",
        ]
    )
    cases = {
        case.get("name"): case for case in ET.parse(pytester.path / "junit.xml").iter("testcase")
    }
    failure = cases["test_fail"].find("failure")
    assert failure is not None
    assert "failed in the body" in failure.get("message", "")
    failure = cases["test_did_not_raise"].find("failure")
    assert failure is not None
    assert "DID NOT RAISE" in failure.get("message", "")


def test_exitfirst_and_last_failed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_order="""
        import pytest

        pytestmark = pytest.mark.subprocess

        def test_first():
            pass

        def test_second():
            assert 0

        def test_third():
            pass

        def test_fourth():
            assert 0
        """
    )
    result = run(pytester, "-x", cache=True)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*stopping after 1 failures*"])
    result = run(pytester, "--lf", "-v", cache=True)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*rerun previous 1 failure*", "*test_second FAILED*"])
    result.stdout.no_fnmatch_line("*test_first*")


def test_rerunfailures_reruns_a_flaky_marked_test(pytester: pytest.Pytester) -> None:
    pytest.importorskip("pytest_rerunfailures")
    pytester.makepyfile(
        test_flaky="""
        import os
        import pytest

        def _first_time(name):
            path = os.path.join(os.environ["FLAKY_DIR"], name)
            if os.path.exists(path):
                return False
            open(path, "w").close()
            return True

        @pytest.mark.subprocess
        def test_flaky():
            assert not _first_time("flaky")

        @pytest.mark.subprocess
        def test_crashes_once():
            if _first_time("crash"):
                os._exit(3)
        """
    )
    os.environ["FLAKY_DIR"] = str(pytester.path)
    try:
        result = run(
            pytester, "-p", "pytest_rerunfailures", "-p", "no:cacheprovider", "--reruns", "1"
        )
    finally:
        del os.environ["FLAKY_DIR"]
    assert result.parseoutcomes() == {"passed": 2, "rerun": 2}


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------

OUTPUT = """
import os
import sys
import pytest

pytestmark = pytest.mark.subprocess


def test_prints_and_fails():
    print("OUT-OF-FAILING")
    print("ERR-OF-FAILING", file=sys.stderr)
    assert 0


def test_big_output():
    sys.stdout.write("x" * (20 * 1024 * 1024))
    sys.stdout.write("\\nEND-OF-BIG\\n")


def test_undecodable_bytes():
    os.write(1, b"before \\xff\\xfe\\x80 after\\n")


def test_closes_fds():
    sys.stdout.flush()
    sys.stderr.flush()
    os.close(1)
    os.close(2)


def test_output_after_closed_fds():
    print("OUT-AFTER-CLOSE")
    os.write(2, b"ERR-AFTER-CLOSE\\n")
    assert 0


def test_output_before_crash():
    print("OUT-BEFORE-CRASH")
    os.write(2, b"ERR-BEFORE-CRASH\\n")
    os._exit(3)


def test_passes_after():
    print("OUT-OF-PASSING")
"""


def test_output_is_captured_per_call(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_output=OUTPUT)
    result = run(pytester, "-p", "no:cacheprovider", "-rP")
    result.assert_outcomes(passed=4, failed=3)
    result.stdout.fnmatch_lines(
        [
            "*_ test_prints_and_fails _*",
            "*- Captured stdout call -*",
            "OUT-OF-FAILING",
            "*- Captured stderr call -*",
            "ERR-OF-FAILING",
            "*_ test_output_after_closed_fds _*",
            "*- Captured stdout call -*",
            "OUT-AFTER-CLOSE",
            "*- Captured stderr call -*",
            "ERR-AFTER-CLOSE",
            "*_ test_output_before_crash _*",
            "*worker crashed: exit code 3*",
            "*- Captured stdout call -*",
            "OUT-BEFORE-CRASH",
            "*- Captured stderr call -*",
            "ERR-BEFORE-CRASH",
        ]
    )
    result.stdout.fnmatch_lines(
        ["*_ test_big_output _*", "*- Captured stdout call -*", "END-OF-BIG"]
    )
    result.stdout.fnmatch_lines(["*_ test_undecodable_bytes _*", "before * after"])
    result.stdout.fnmatch_lines(
        ["*_ test_passes_after _*", "*- Captured stdout call -*", "OUT-OF-PASSING"]
    )
    # Each call's output is its own: nothing of the failing test's in another report.
    assert result.stdout.lines.count("OUT-OF-FAILING") == 1


def test_output_streams_with_capture_off(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_streams="""
        import os
        import sys
        import pytest

        @pytest.mark.subprocess
        def test_passes():
            print("STREAMED-OUT")
            print("STREAMED-ERR", file=sys.stderr)

        @pytest.mark.subprocess
        def test_crashes():
            print("STREAMED-BEFORE-CRASH")
            os._exit(3)
        """
    )
    result = run(pytester, "-p", "no:cacheprovider", "-s")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*STREAMED-OUT*"])
    result.stdout.fnmatch_lines(["*STREAMED-BEFORE-CRASH*"])
    result.stderr.fnmatch_lines(["*STREAMED-ERR*"])


# --------------------------------------------------------------------------
# Crashes and timeouts
# --------------------------------------------------------------------------

CRASHES = """
import ctypes
import os
import signal
import time

import pytest
import pytest_subproc
from pidlog import log

pytestmark = pytest.mark.subprocess


def test_segfault():
    log("segfault")
    ctypes.string_at(0)


def test_after_segfault():
    log("after_segfault")


def test_sigsegv():
    log("sigsegv")
    os.kill(os.getpid(), signal.SIGSEGV)


def test_exit_code():
    log("exit_code")
    os._exit(3)


def test_after_exit_code():
    log("after_exit_code")


def hang_here():
    time.sleep(300)


@pytest.mark.subprocess(timeout=1)
def test_hangs():
    log("hangs")
    print("OUT-BEFORE-HANG")
    hang_here()


def test_after_hang():
    log("after_hang")


@pytest.mark.xfail(raises=pytest_subproc.WorkerCrashed, strict=True)
def test_expected_crash():
    os._exit(4)
"""


@posix_only
def test_crashes_and_timeouts_fail_only_their_test(pytester: pytest.Pytester, pidlog: Path) -> None:
    pytester.makepyfile(test_crashes=CRASHES)
    result = run(pytester, "-p", "no:cacheprovider", "--junitxml=junit.xml", "--tb=short")
    result.assert_outcomes(passed=3, failed=4, xfailed=1)
    pids = read_pids(pidlog)
    text = failures(result)
    segfault_line = line_of(CRASHES, "string_at(0)")
    sigsegv_line = line_of(CRASHES, "signal.SIGSEGV)")
    result.stdout.fnmatch_lines(
        [
            "*_ test_segfault _*",
            f"*worker crashed: signal SIGSEGV (pid {pids['segfault']})*",
            f'*File "*test_crashes.py", line {segfault_line} in test_segfault*',
            "*_ test_sigsegv _*",
            f"*worker crashed: signal SIGSEGV (pid {pids['sigsegv']})*",
            f'*File "*test_crashes.py", line {sigsegv_line} in test_sigsegv*',
            "*_ test_exit_code _*",
            f"*worker crashed: exit code 3 (pid {pids['exit_code']})*",
            "*_ test_hangs _*",
            "*WorkerTimeout*",
        ]
    )
    assert "WorkerCrashed" in text
    # The worker's own frames are cut from the stacks; the plugin's do not show.
    for name in ("test_segfault", "test_sigsegv", "test_hangs"):
        assert f"pytest_subproc{os.sep}" not in section(result, f"_ {name} _", "_ test_"), name
    hang = section(result, "_ test_hangs _", "_ test_")
    assert "1.0 s" in hang or "1 s" in hang, hang
    assert f"pid {pids['hangs']}" in hang
    assert "in hang_here" in hang
    assert "OUT-BEFORE-HANG" in hang.splitlines()
    # Each test after a crash or timeout runs in a fresh worker.
    assert pids["after_segfault"] != pids["segfault"]
    assert pids["sigsegv"] == pids["after_segfault"]
    assert pids["after_exit_code"] != pids["exit_code"]
    assert pids["hangs"] == pids["after_exit_code"]
    assert pids["after_hang"] != pids["hangs"]
    # The summary lists the casualties and counts the workers.
    result.stdout.fnmatch_lines(
        [
            "*- subprocess workers -*",
            "test_crashes.py::test_segfault: worker crashed: signal SIGSEGV*",
            "test_crashes.py::test_sigsegv: worker crashed: signal SIGSEGV*",
            "test_crashes.py::test_exit_code: worker crashed: exit code 3*",
            "test_crashes.py::test_hangs: *timed out after 1*",
            "test_crashes.py::test_expected_crash: worker crashed: exit code 4*",
            "workers started: 5*",
        ]
    )
    cases = {
        case.get("name"): case for case in ET.parse(pytester.path / "junit.xml").iter("testcase")
    }
    for name, expected in [
        ("test_segfault", "worker crashed: signal SIGSEGV"),
        ("test_exit_code", "worker crashed: exit code 3"),
        ("test_hangs", "WorkerTimeout"),
    ]:
        failure = cases[name].find("failure")
        assert failure is not None, name
        assert expected in failure.get("message", "") + (failure.text or ""), name
    assert_gone(pids.values())


def test_crash_without_a_stack_shows_no_plugin_frames(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_exit="""
        import os
        import pytest

        @pytest.mark.subprocess
        def test_exit_code():
            os._exit(3)
        """
    )
    result = run(pytester, "-p", "no:cacheprovider", "--tb=short")
    result.assert_outcomes(failed=1)
    text = failures(result)
    assert "worker crashed: exit code 3" in text
    assert f"pytest_subproc{os.sep}" not in text


LOGS_AND_WARNINGS = """
import logging, warnings, pytest

class HomeGrownWarning(UserWarning):
    pass

pytestmark = pytest.mark.subprocess

def test_logs_and_warns():
    logging.getLogger("app").warning("disk %s is full", "sda")
    logging.getLogger("app").info("detail only at INFO")
    warnings.warn("plain warning from the body")
    warnings.warn(HomeGrownWarning("home-grown warning"))

def test_fails_after_logging():
    logging.getLogger("app").error("logged before the failure")
    assert False
"""


def test_logs_and_warnings_of_the_body_reach_the_report(pytester: pytest.Pytester) -> None:
    """Records land in "Captured log call" and warnings in the summary, as in-process."""
    pytester.makepyfile(test_lw=LOGS_AND_WARNINGS)
    result = run(pytester, "--log-level=INFO", "-rA")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*Captured log call*",
            "ERROR *app*logged before the failure*",
            "*warnings summary*",
            "*test_lw.py:11: UserWarning: plain warning from the body",
            "*test_lw.py:12: HomeGrownWarning: home-grown warning",
            "*Captured log call*",
            "WARNING *app*disk sda is full*",
            "INFO *app*detail only at INFO*",
        ]
    )
    # Nothing leaks to stderr through logging's last-resort handler.
    assert "Captured stderr call" not in result.stdout.str()


def test_a_warning_the_filters_make_an_error_fails_the_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_lw=LOGS_AND_WARNINGS)
    result = run(pytester, "-W", "error::UserWarning", "-k", "logs_and_warns")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*UserWarning: plain warning from the body*"])


REPORT_ATTRS_CONFTEST = """
import json
import pytest

@pytest.fixture
def browser(request):
    # Lives where the test runs: pytest's process never sees it.
    request.node.screenshots = ["shot of " + request.node.name]
    return request.node.screenshots

@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        # The plugin idiom: attach what the test's fixtures hold to its report.
        report.extras = list(getattr(item, "screenshots", []))
        if not item.config.getoption("subprocess_in_worker", False):
            report.extras.append("seen by pytest")
        report.verdict = "from " + ("a fixture" if hasattr(item, "screenshots") else "nothing")
        report.handle = open(__file__)  # a live object: nothing a report could carry
        report.handle.close()
    return report

def pytest_runtest_logreport(report):
    if report.when == "call":
        with open("reports.jsonl", "a") as f:
            f.write(json.dumps([report.nodeid, report.extras, report.verdict]) + "\\n")
"""

REPORT_ATTRS_TESTS = """
import pytest

@pytest.mark.subprocess
def test_marked(browser):
    browser.append("after the click")

def test_in_process(browser):
    browser.append("after the click")

@pytest.mark.subprocess
def test_marked_without_fixture():
    pass
"""


def test_what_plugins_set_on_a_worker_s_report_reaches_pytest_s(pytester: pytest.Pytester) -> None:
    """pytest-html's extras, say: pytest's own hooks could not see the fixture, the worker's did."""
    pytester.makeconftest(REPORT_ATTRS_CONFTEST)
    pytester.makepyfile(test_attrs=REPORT_ATTRS_TESTS)
    result = run(pytester)
    result.assert_outcomes(passed=3)
    lines = (pytester.path / "reports.jsonl").read_text().splitlines()
    reports = {nodeid.partition("::")[2]: rest for nodeid, *rest in map(json.loads, lines)}
    shots = ["after the click", "seen by pytest"]
    assert reports == {
        # As in-process: the worker's values, and what only pytest's process added.
        "test_marked": [["shot of test_marked", *shots], "from a fixture"],
        "test_in_process": [["shot of test_in_process", *shots], "from a fixture"],
        "test_marked_without_fixture": [["seen by pytest"], "from nothing"],
    }


def test_hypothesis_statistics_of_a_marked_test_are_shown(pytester: pytest.Pytester) -> None:
    """Hypothesis puts them on the teardown report, as pytest-xdist carries it: so do we."""
    pytest.importorskip("hypothesis")
    pytester.makepyfile(
        """
        import pytest
        from hypothesis import given, settings, strategies as st

        @pytest.mark.subprocess
        @settings(max_examples=5)
        @given(st.integers())
        def test_marked(x):
            pass
        """
    )
    result = run(pytester, "-p", "_hypothesis_pytestplugin", "--hypothesis-show-statistics")
    result.assert_outcomes(passed=1)
    stats = section(result, "Hypothesis Statistics", "passed in")
    assert "test_marked:" in stats, result.stdout.str()
    assert "Stopped because settings.max_examples=5" in stats, stats
