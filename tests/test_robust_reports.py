"""Acceptance tests: what the plugin does to a test harms that test alone, and says so.

A fixture runs in the worker, under the test's deadline; a crash or a timeout
there is that test's error at setup. An exception comes back as its own type
even when part of it cannot travel; a broken channel to the worker reads as a
sentence, not as the plugin's internals.

Inner runs start with plugin autoloading off and ``-p pytest_subproc.plugin``:
the other installed plugins only slow the runs down.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from _inner import assert_gone, read_pids
from _inner import run_inner as run

pytestmark = pytest.mark.usefixtures("no_plugin_autoload")


def section(result: pytest.RunResult, start: str) -> str:
    """The stdout lines from the first one containing ``start`` up to the next section."""
    lines = result.stdout.lines
    first = next(i for i, line in enumerate(lines) if start in line)
    last = next((i for i in range(first + 1, len(lines)) if lines[i].startswith("_")), len(lines))
    return "\n".join(lines[first:last])


# --------------------------------------------------------------------------
# Fixtures that hang or crash the worker, which runs them
# --------------------------------------------------------------------------

REBUILDING = """
import os
import time

import pytest
from pidlog import log


@pytest.fixture
def sleeps():
    time.sleep(1000)


@pytest.fixture
def exits():
    os._exit(3)


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


def test_a_fixture_that_hangs_or_crashes_the_worker_is_a_setup_error(
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
    assert "WorkerTimeout: worker timed out after 2 s" in hang
    crash = section(result, "ERROR at setup of test_rebuilding_crashes")
    assert "WorkerCrashed: worker crashed: exit code 3" in crash
    for text in (hang, crash):
        assert f"pytest_subproc{os.sep}" not in text
    result.stdout.fnmatch_lines(
        [
            "*- subprocess workers -*",
            "test_rebuilding.py::test_rebuilding_hangs: worker timed out after 2 s *",
            "test_rebuilding.py::test_rebuilding_crashes: worker crashed: exit code 3 *",
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


# --------------------------------------------------------------------------
# A worker that cannot start, a broken channel to the worker
# --------------------------------------------------------------------------

START_FAILS = """
import pytest

@pytest.mark.subprocess
def test_marked():
    pass

def test_plain():
    pass
"""


@pytest.mark.skipif(sys.platform != "linux", reason="Linux's limit on one environment string")
@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_a_worker_that_cannot_start_fails_only_the_tests_that_need_one(
    pytester: pytest.Pytester, start: str
) -> None:
    # Over Linux's 128 KiB for one environment string: no process can be started.
    pytester.makeconftest('import os\nos.environ["BIG_CONFIG"] = "x" * 150_000\n')
    pytester.makepyfile(test_start=START_FAILS)
    result = run(pytester, "--tb=short", f"--subprocess-start={start}")
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    outcomes = result.parseoutcomes()
    # At setup where the worker's fixture starts it, else when the body is sent.
    assert (outcomes["passed"], outcomes.get("errors", 0) + outcomes.get("failed", 0)) == (1, 1)
    error = section(result, " test_marked _")
    assert "WorkerStartError: " in error
    assert "Argument list too long" in error
    assert f"pytest_subproc{os.sep}" not in error
    result.stdout.fnmatch_lines(["*- subprocess workers -*", "test_start.py::test_marked: *"])


# Breaks the parent's side of the channel for the tests marked
# ``breaks("corrupt")`` or ``breaks("reset")``, as a stray write into the
# reply pipe or a reset would.
BREAKING_CONFTEST = """
import pytest

from pytest_subproc import _wire

_real_recv, _real_send = _wire.recv_parts, _wire.send_parts
BREAK = []


def recv_parts(fd, deadline=None):
    # Both ways: a call's result may come as part of its setup's reply.
    if "reset" in BREAK:
        raise ConnectionResetError(104, "Connection reset by peer")
    kind, data = _real_recv(fd, deadline)
    if "corrupt" in BREAK and kind != _wire.Kind.READY:
        raise _wire.WireCorrupt("bad message header b'garbage'")
    return kind, data


def send_parts(fd, kind, parts, deadline=None):
    if "reset" in BREAK:
        raise ConnectionResetError(104, "Connection reset by peer")
    return _real_send(fd, kind, parts, deadline)


def pytest_configure(config):
    config.addinivalue_line("markers", "breaks(how, when): break the channel to the worker")
    # Only pytest's own end of the channel breaks, not the worker's.
    if not getattr(config.option, "subprocess_in_worker", False):
        _wire.recv_parts, _wire.send_parts = recv_parts, send_parts


def _breaking(item, when):
    marker = item.get_closest_marker("breaks")
    BREAK[:] = marker.args[:1] if marker and marker.args[1] == when else ()
    try:
        yield
    finally:
        BREAK.clear()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _breaking(item, "setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _breaking(item, "call"))
"""

BREAKING = """
import pytest
from pidlog import log

pytestmark = pytest.mark.subprocess


@pytest.mark.breaks("corrupt", "call")
def test_reply_corrupt():
    log("corrupt")


def test_next():
    log("next")


@pytest.mark.breaks("reset", "call")
def test_pipe_broken():
    pass


@pytest.mark.breaks("corrupt", "setup")
def test_reply_corrupt_at_setup():
    pass


def test_last():
    log("last")
"""


def test_broken_channel_fails_the_test_with_a_sentence(
    pytester: pytest.Pytester, pidlog: Path
) -> None:
    pytester.makeconftest(BREAKING_CONFTEST)
    pytester.makepyfile(test_breaking=BREAKING)
    result = run(pytester, "--tb=short")
    result.assert_outcomes(passed=2, failed=2, errors=1)
    pids = read_pids(pidlog)
    result.stdout.fnmatch_lines(
        [
            "*_ test_reply_corrupt _*",
            f"E   *WorkerCrashed: *could not be read*pid {pids['corrupt']}*fresh worker*",
            "*_ test_pipe_broken _*",
            "E   *WorkerCrashed: worker lost: its pipe broke (pid *) while it ran "
            "test_breaking.py::test_pipe_broken "
            "(ConnectionResetError: [[]Errno 104] Connection reset by peer); "
            "the next test gets a fresh worker",
        ]
    )
    at_setup = section(result, "ERROR at setup of test_reply_corrupt_at_setup")
    assert "WorkerCrashed" in at_setup
    for name in ("test_reply_corrupt", "test_pipe_broken"):
        text = section(result, f"_ {name} _")
        assert f"pytest_subproc{os.sep}" not in text
        assert "During handling" not in text
    assert f"pytest_subproc{os.sep}" not in at_setup
    assert pids["next"] != pids["corrupt"]
    assert pids["last"] != pids["next"]
    result.stdout.fnmatch_lines(
        [
            "*- subprocess workers -*",
            "test_breaking.py::test_reply_corrupt: *",
            "test_breaking.py::test_pipe_broken: worker lost: its pipe broke*",
            "test_breaking.py::test_reply_corrupt_at_setup: *",
        ]
    )
    assert_gone(pids.values())
