"""Acceptance tests: what the plugin does to a test harms that test alone, and says so.

Rebuilding a fixture value in the worker runs the user's code, so it has the
test's deadline; a crash or a timeout there is that test's error at setup.
The plugin's own warnings never abort the run; an exception comes back as its
own type even when part of it cannot travel; a broken channel to the worker
reads as a sentence, not as the plugin's internals.

Inner runs start with plugin autoloading off and ``-p pytest_subproc.plugin``:
the other installed plugins only slow the runs down.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from _inner import read_pids
from _inner import run_inner as run

pytestmark = pytest.mark.usefixtures("no_plugin_autoload")


def section(result: pytest.RunResult, start: str) -> str:
    """The stdout lines from the first one containing ``start`` up to the next section."""
    lines = result.stdout.lines
    first = next(i for i, line in enumerate(lines) if start in line)
    last = next((i for i in range(first + 1, len(lines)) if lines[i].startswith("_")), len(lines))
    return "\n".join(lines[first:last])


# --------------------------------------------------------------------------
# Fixture values that the worker cannot rebuild in time, or at all
# --------------------------------------------------------------------------

REBUILDING = """
import os
import time

import pytest
from pidlog import log


class Sleeps:
    def __reduce__(self):
        return (time.sleep, (1000,))


class Exits:
    def __reduce__(self):
        return (os._exit, (3,))


@pytest.fixture
def sleeps():
    return Sleeps()


@pytest.fixture
def exits():
    return Exits()


@pytest.mark.subprocess(timeout=2)
def test_rebuilding_hangs(sleeps):
    log("hangs")


@pytest.mark.subprocess
def test_rebuilding_crashes(exits):
    log("crashes")


@pytest.mark.subprocess
def test_after():
    log("after")
"""


def test_fixture_value_whose_rebuilding_hangs_or_crashes_is_a_setup_error(
    pytester: pytest.Pytester, pidlog: Path
) -> None:
    pytester.makepyfile(test_rebuilding=REBUILDING)
    started = time.monotonic()
    result = run(pytester, "--tb=short", timeout=60)
    # Bounded by the test's 2 s timeout, not by the value's 1000 s.
    assert time.monotonic() - started < 30
    result.assert_outcomes(passed=1, errors=2)
    assert read_pids(pidlog).keys() == {"after"}  # neither body ran
    hang = section(result, "ERROR at setup of test_rebuilding_hangs")
    assert "WorkerTimeout: worker timed out after 2.0 s" in hang
    assert "(at setup, rebuilding fixture 'sleeps')" in hang
    crash = section(result, "ERROR at setup of test_rebuilding_crashes")
    assert "WorkerCrashed: worker crashed: exit code 3" in crash
    assert "(at setup, rebuilding fixture 'exits')" in crash
    for text in (hang, crash):
        assert f"pytest_subproc{os.sep}" not in text
    result.stdout.fnmatch_lines(
        [
            "*- subprocess workers -*",
            "test_rebuilding.py::test_rebuilding_hangs: worker timed out after 2.0 s *"
            "(at setup, rebuilding fixture 'sleeps')",
            "test_rebuilding.py::test_rebuilding_crashes: worker crashed: exit code 3 *"
            "(at setup, rebuilding fixture 'exits')",
        ]
    )


# --------------------------------------------------------------------------
# The plugin's warnings, made errors by the warning filters
# --------------------------------------------------------------------------

UNSHIPPABLE = """
import unittest

import pytest


@pytest.mark.subprocess
class TestCase(unittest.TestCase):
    def test_method(self):
        pass


@pytest.mark.subprocess
async def test_coroutine():
    pass


def test_plain():
    pass


@pytest.mark.subprocess
def test_marked():
    pass
"""


@pytest.mark.parametrize("how", ["-W", "ini"])
def test_warning_that_a_marked_test_cannot_be_shipped_is_that_test_s_error(
    pytester: pytest.Pytester, how: str
) -> None:
    pytester.makepyfile(test_unshippable=UNSHIPPABLE)
    if how == "ini":
        pytester.makeini("[pytest]\nfilterwarnings = error\n")
    result = run(pytester, "--tb=short", *(["-W", "error"] if how == "-W" else []))
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=2, errors=2)
    for name in ("TestCase.test_method", "test_coroutine"):
        error = section(result, f"ERROR at setup of {name}")
        assert "SubprocessWarning" in error
        assert "cannot ship it" in error
        assert f"pytest_subproc{os.sep}" not in error


def test_warning_that_a_marked_test_cannot_be_shipped_names_the_test(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_unshippable=UNSHIPPABLE)
    result = run(pytester, "-k", "TestCase or plain or marked")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "*warnings summary*",
            "test_unshippable.py::TestCase::test_method",
            "*SubprocessWarning: *TestCase::test_method is marked subprocess*",
        ]
    )


# --------------------------------------------------------------------------
# Exceptions that do not pickle whole
# --------------------------------------------------------------------------

PARTLY_PICKLABLE = """
import threading

import pytest

pytestmark = pytest.mark.subprocess


class FrozenError(AttributeError):
    def __init__(self):
        super().__init__("can't set attribute")


@pytest.mark.xfail(raises=ValueError, strict=True)
def test_attribute_that_does_not_pickle():
    exc = ValueError("x")
    exc.lock = threading.Lock()
    raise exc


@pytest.mark.xfail(raises=FrozenError, strict=True)
def test_init_that_does_not_take_its_args():
    raise FrozenError()


def test_frozen_error_reads_as_itself():
    raise FrozenError()
"""


def test_exceptions_that_do_not_pickle_whole_keep_their_type(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_partly=PARTLY_PICKLABLE)
    result = run(pytester, "--tb=short")
    result.assert_outcomes(xfailed=2, failed=1)
    result.stdout.fnmatch_lines(["*E   test_partly.FrozenError: can't set attribute"])
    assert "UnserializableException" not in result.stdout.str()
