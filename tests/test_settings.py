"""Acceptance tests: where a marked test's settings come from.

The knobs are the marker's ``scope=``/``timeout=`` (on a function, a class or
a module, the closest winning), ``--subprocess``, ``--subprocess-scope``,
``--subprocess-timeout`` and the ini keys ``subprocess_all``,
``subprocess_scope``, ``subprocess_timeout``. Scopes are observed through the
pids the test bodies log; timeouts through a body that outlives one. A bad
value is a usage error naming where it came from; those runs are in-process
(``runpytest_inprocess``), as the error stops them before any worker starts.

Inner runs start with plugin autoloading off and ``-p pytest_subproc.plugin``:
the other installed plugins only slow the runs down. The runs that check what
a user sees first (``--help``, ``--markers``) load the plugin as installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _inner import PARENT_CONFTEST, PLUGIN, assert_gone, read_pids
from _inner import run_inner as run

from pytest_subproc import _settings

pytestmark = pytest.mark.usefixtures("no_plugin_autoload")


# --------------------------------------------------------------------------
# The marker, at each level
# --------------------------------------------------------------------------


def test_marker_scope_on_function_class_and_module_closest_wins(
    pytester: pytest.Pytester, pidlog: Path
) -> None:
    pytester.makeconftest(PARENT_CONFTEST)
    pytester.makepyfile(
        test_one="""
        import pytest
        from pidlog import log

        pytestmark = pytest.mark.subprocess(scope="function")

        def test_fa():
            log("fa")

        def test_fb():
            log("fb")

        @pytest.mark.subprocess(scope="module")
        class TestClassMarker:
            def test_ca(self):
                log("ca")

            def test_cb(self):
                log("cb")

            @pytest.mark.subprocess(scope="function")
            def test_cc(self):
                log("cc")

        @pytest.mark.subprocess(scope="session")
        def test_s1():
            log("s1")
        """,
        test_two="""
        import pytest
        from pidlog import log

        @pytest.mark.subprocess(scope="session")
        def test_s2():
            log("s2")

        @pytest.mark.subprocess
        def test_da():
            log("da")

        @pytest.mark.subprocess
        def test_db():
            log("db")

        def test_unmarked():
            log("unmarked")
        """,
    )
    result = run(pytester)
    result.assert_outcomes(passed=10)
    pids = read_pids(pidlog)
    parent = pids.pop("parent")
    # The unmarked test runs in the inner pytest itself, every marked one elsewhere.
    assert pids.pop("unmarked") == parent
    assert parent not in pids.values()
    # Module pytestmark scope="function": a process per test.
    assert pids["fa"] != pids["fb"]
    # The class marker wins over the module's: one worker for the class's tests...
    assert pids["ca"] == pids["cb"]
    # ...and the method's own marker over the class's.
    assert pids["cc"] not in (pids["ca"], pids["fa"], pids["fb"])
    # A session worker is shared across modules, and is not a module's worker.
    assert pids["s1"] == pids["s2"]
    assert pids["s1"] not in (pids["fa"], pids["fb"], pids["ca"], pids["cc"], pids["da"])
    # Default scope: one worker per module.
    assert pids["da"] == pids["db"]
    assert pids["da"] not in (pids["fa"], pids["fb"], pids["ca"], pids["cc"])
    assert_gone(pids.values())


def test_marker_timeout_closest_wins_over_module_and_ini(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini(
        """
        [pytest]
        subprocess_timeout = 60
        """
    )
    pytester.makepyfile(
        test_timeouts="""
        import time
        import pytest

        pytestmark = pytest.mark.subprocess(timeout=1)

        def test_module_timeout_applies():
            time.sleep(30)

        @pytest.mark.subprocess(timeout=30)
        def test_own_timeout_wins():
            time.sleep(1.2)

        @pytest.mark.subprocess
        def test_bare_marker_keeps_ini_timeout():
            time.sleep(1.2)
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        ["*_ test_module_timeout_applies _*", "*WorkerTimeout: *timed out after 1*"]
    )


# --------------------------------------------------------------------------
# Command line and ini
# --------------------------------------------------------------------------

CLI_AND_INI_TESTS = """
import time
import pytest
from pidlog import log

@pytest.mark.subprocess
def test_a():
    log("a")

@pytest.mark.subprocess
def test_b():
    log("b")

@pytest.mark.subprocess(scope="module")
def test_ma():
    log("ma")

@pytest.mark.subprocess(scope="module")
def test_mb():
    log("mb")

@pytest.mark.subprocess
def test_slow():
    time.sleep(30)

def test_unmarked():
    log("unmarked")
"""


def test_command_line_scope_and_timeout_override_ini(
    pytester: pytest.Pytester, pidlog: Path
) -> None:
    pytester.makeini(
        """
        [pytest]
        subprocess_scope = session
        subprocess_timeout = 60
        """
    )
    pytester.makeconftest(PARENT_CONFTEST)
    pytester.makepyfile(test_cli=CLI_AND_INI_TESTS)
    result = run(
        pytester, "--strict-markers", "--subprocess-scope=function", "--subprocess-timeout=1"
    )
    result.assert_outcomes(passed=5, failed=1)
    result.stdout.fnmatch_lines(["*_ test_slow _*", "*WorkerTimeout: *timed out after 1*"])
    pids = read_pids(pidlog)
    assert pids["unmarked"] == pids["parent"]
    # --subprocess-scope=function: a process per bare-marked test.
    assert len({pids["parent"], pids["a"], pids["b"], pids["ma"]}) == 4
    # The marker's own scope wins over the command line.
    assert pids["ma"] == pids["mb"]
    assert_gone(pids.values())


def test_ini_all_scope_and_timeout(pytester: pytest.Pytester, pidlog: Path) -> None:
    pytester.makeini(
        """
        [pytest]
        subprocess_all = true
        subprocess_scope = session
        subprocess_timeout = 1
        """
    )
    pytester.makeconftest(PARENT_CONFTEST)
    pytester.makepyfile(
        test_first="""
        from pidlog import log

        def test_one():
            log("one")
        """,
        test_second="""
        import time
        import pytest
        from pidlog import log

        def test_two():
            log("two")

        @pytest.mark.subprocess(timeout=30)
        def test_marker_timeout_wins():
            time.sleep(1.2)
            log("marked")

        def test_slow():
            log("slow")
            time.sleep(30)
        """,
    )
    result = run(pytester)
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*_ test_slow _*", "*WorkerTimeout: *timed out after 1*"])
    pids = read_pids(pidlog)
    parent = pids.pop("parent")
    assert parent not in pids.values()
    # Unmarked tests are isolated, all in one session worker across both modules
    # (the marker's timeout changes nothing of the ini's scope).
    assert pids["one"] == pids["two"] == pids["marked"] == pids["slow"]
    assert_gone(pids.values())


def test_command_line_subprocess_flag_isolates_unmarked_tests(
    pytester: pytest.Pytester, pidlog: Path
) -> None:
    pytester.makeconftest(PARENT_CONFTEST)
    pytester.makepyfile(
        test_flag="""
        from pidlog import log

        def test_a():
            log("a")

        def test_b():
            log("b")
        """
    )
    result = run(pytester, "--subprocess")
    result.assert_outcomes(passed=2)
    pids = read_pids(pidlog)
    assert pids["a"] == pids["b"] != pids["parent"]
    assert_gone(pids.values())


# --------------------------------------------------------------------------
# Timeouts too long to wait for
# --------------------------------------------------------------------------

LONG_TIMEOUTS = """
import time
import pytest

@pytest.mark.subprocess(timeout=2_000_000)  # the longest kept as a limit
def test_longest_timeout():
    time.sleep(0.2)

@pytest.mark.subprocess(timeout=1e7)
def test_months():
    time.sleep(0.2)

@pytest.mark.subprocess(timeout=1e300)
def test_float_beyond_any_clock():
    time.sleep(0.2)

@pytest.mark.subprocess(timeout=10**400)
def test_int_beyond_any_float():
    time.sleep(0.2)

@pytest.mark.subprocess(timeout=float("inf"))
def test_infinite():
    time.sleep(0.2)

@pytest.mark.subprocess
def test_from_the_command_line():
    time.sleep(0.2)
"""


def test_timeouts_too_long_to_wait_for_mean_none(pytester: pytest.Pytester) -> None:
    """Waits are bounded by poll()'s int milliseconds and faulthandler's clock: never overflow."""
    pytester.makepyfile(test_long=LONG_TIMEOUTS)
    result = run(pytester, "--subprocess-timeout=1e300")
    result.assert_outcomes(passed=6)
    assert "OverflowError" not in result.stdout.str() + result.stderr.str()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (2_000_000, 2_000_000.0),
        ("2000000", 2_000_000.0),
        (2_000_001, None),
        ("1e7", None),
        (1e300, None),
        (10**400, None),
        (float("inf"), None),
    ],
)
def test_timeouts_past_the_maximum_parse_as_none(value: object, expected: object) -> None:
    assert _settings.parse_timeout(value, "a test") == expected


# --------------------------------------------------------------------------
# Bad values: usage errors naming where they came from
# --------------------------------------------------------------------------


def assert_usage_error(result: pytest.RunResult, *parts: str) -> None:
    """The run stopped with a usage error whose ``ERROR:`` line holds every part."""
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    errors = [line for line in result.stderr.lines if line.startswith("ERROR:")]
    assert any(all(part in line for part in parts) for line in errors), errors
    result.stdout.no_fnmatch_line("*passed*")


BAD_MARKERS = {
    "unknown-scope": ('subprocess(scope="bogus")', "'bogus'"),
    "negative-timeout": ("subprocess(timeout=-1)", "-1"),
    "zero-timeout": ("subprocess(timeout=0)", "timeout 0"),
    "non-numeric-timeout": ('subprocess(timeout="soon")', "'soon'"),
    "nan-timeout": ('subprocess(timeout=float("nan"))', "nan"),
    "bool-timeout": ("subprocess(timeout=True)", "True"),
    "huge-negative-timeout": ("subprocess(timeout=-(10**400))", "-1000"),
    "minus-infinity-timeout": ('subprocess(timeout=float("-inf"))', "-inf"),
    "positional": ('subprocess("function")', "keyword"),
    "unknown-kwarg": ('subprocess(scop="function")', "scop"),
}


@pytest.mark.parametrize(("mark", "detail"), BAD_MARKERS.values(), ids=BAD_MARKERS.keys())
def test_bad_function_marker_is_a_usage_error(
    pytester: pytest.Pytester, mark: str, detail: str
) -> None:
    pytester.makepyfile(
        test_bad=f"""
        import pytest

        def test_fine():
            pass

        @pytest.mark.{mark}
        def test_it():
            pass
        """
    )
    # In-process: a usage error is raised before any worker starts.
    result = pytester.runpytest_inprocess(*PLUGIN)
    assert_usage_error(result, "subprocess marker of test_bad.py::test_it", detail)


def test_bad_class_marker_names_the_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_bad="""
        import pytest

        @pytest.mark.subprocess(scope="process")
        class TestX:
            def test_it(self):
                pass
        """
    )
    result = pytester.runpytest_inprocess(*PLUGIN)
    assert_usage_error(result, "subprocess marker of test_bad.py::TestX::test_it", "'process'")


def test_bad_module_marker_names_the_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_bad="""
        import pytest

        pytestmark = [pytest.mark.subprocess(timeout=-3)]

        def test_it():
            pass
        """
    )
    result = pytester.runpytest_inprocess(*PLUGIN)
    assert_usage_error(result, "subprocess marker of test_bad.py::test_it", "-3")


BAD_OPTIONS = {
    "scope": (("--subprocess-scope=process",), "--subprocess-scope", "'process'"),
    "timeout-negative": (("--subprocess-timeout=-1",), "--subprocess-timeout", "'-1'"),
    "timeout-zero": (("--subprocess-timeout=0",), "--subprocess-timeout", "'0'"),
    "timeout-text": (("--subprocess-timeout=soon",), "--subprocess-timeout", "'soon'"),
    "ini-scope": (("-o", "subprocess_scope=process"), "ini subprocess_scope", "'process'"),
    "ini-timeout": (("-o", "subprocess_timeout=-5"), "ini subprocess_timeout", "'-5'"),
    "ini-timeout-text": (("-o", "subprocess_timeout=soon"), "ini subprocess_timeout", "'soon'"),
}


@pytest.mark.parametrize(("args", "origin", "value"), BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_bad_option_or_ini_is_a_usage_error(
    pytester: pytest.Pytester, args: tuple[str, ...], origin: str, value: str
) -> None:
    pytester.makepyfile("def test_fine(): pass")
    result = pytester.runpytest_inprocess(*PLUGIN, *args)
    assert_usage_error(result, origin, value)


def test_bad_value_in_ini_file_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        """
        [pytest]
        subprocess_scope = per-test
        """
    )
    pytester.makepyfile("def test_fine(): pass")
    result = pytester.runpytest_inprocess(*PLUGIN)
    assert_usage_error(result, "ini subprocess_scope", "'per-test'")


def test_bad_ini_subprocess_all_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        """
        [pytest]
        subprocess_all = maybe
        """
    )
    pytester.makepyfile("def test_fine(): pass")
    result = run(pytester)
    assert_usage_error(result, "subprocess_all", "'maybe'")


# --------------------------------------------------------------------------
# What a user sees first
# --------------------------------------------------------------------------


def test_markers_lists_the_marker_and_strict_markers_accepts_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD")  # as installed: by entry point
    result = pytester.runpytest_inprocess("--markers")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["@pytest.mark.subprocess(scope=*timeout=*): *"])
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.subprocess
        def test_marked():
            pass
        """
    )
    # Collection only: the marker is registered, so --strict-markers accepts it.
    result = pytester.runpytest_inprocess("--strict-markers", "--collect-only", "-q")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*test_marked*"])


def test_help_shows_options_and_ini_keys(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD")
    result = pytester.runpytest_inprocess("--help")
    assert result.ret == 0
    result.stdout.fnmatch_lines_random(
        [
            "*--subprocess *Run every test in a worker (module-scoped by default:*",
            "*--subprocess-scope=*",
            "*--subprocess-timeout=*",
            "*--subprocess-preload=MODULE*",
            "*subprocess_all (*):*",
            "*Bool (true/false): run every test in a worker*",
            "*subprocess_scope (*):*",
            "*subprocess_timeout (*):*",
            "*subprocess_preload (*):*",
        ]
    )
