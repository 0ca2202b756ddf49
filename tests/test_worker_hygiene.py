"""Acceptance tests: what a body leaves behind harms no test but its own.

A body may replace the functions the worker's own machinery calls (the
framing's ``os.write``, ``select.poll``, ``pickle``), or the streams it puts
back before each test, and leave them so; the next test in the same worker
must run and report as if nothing had happened. A body that overruns its
timeout is reported with its own frames, however many threads it started.

Each test runs an inner pytest (``pytester.runpytest_subprocess``, so a hang
stays there, bounded by a timeout), as in test_marker.
"""

from __future__ import annotations

import sys
import textwrap
import threading
from pathlib import Path

import pytest
from _inner import PARENT_CONFTEST, assert_gone, read_pids
from _inner import run_inner as run

from pytest_subproc import _child, _report
from pytest_subproc._process import clean_stack

pytestmark = pytest.mark.usefixtures("no_plugin_autoload")

# Long enough for a slow machine; a regression that hangs ends here.
INNER_TIMEOUT = 60

# The second test of each suite: it must pass in the worker the first one
# damaged, with what it printed captured as usual.
INNOCENT = """

@pytest.mark.subprocess
def test_2_innocent():
    log("innocent")
    print("INNOCENT-OUT")
    sys.stderr.write("INNOCENT-ERR\\n")
"""


def line_of(source: str, text: str) -> int:
    """The line number of the first line of ``source`` (as pytester writes it) holding ``text``."""
    lines = textwrap.dedent(source).strip().splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)


def run_after(pytester: pytest.Pytester, pidlog: Path, damage: str, *args: str) -> pytest.RunResult:
    """Run a body that does ``damage``, then the innocent test, in one worker."""
    pytester.makeconftest(PARENT_CONFTEST)
    body = textwrap.indent(textwrap.dedent(damage).strip(), "    ")
    pytester.makepyfile(
        test_damage=f"""
import io, os, pickle, select, sys
import pytest
from pidlog import log

@pytest.mark.subprocess
def test_1_damages():
    log("damages")
{body}
{INNOCENT}"""
    )
    return run(pytester, "-rP", *args, timeout=INNER_TIMEOUT)


def assert_innocent_unharmed(result: pytest.RunResult, pidlog: Path) -> None:
    result.assert_outcomes(passed=2)
    out = result.stdout.str()
    assert "INNOCENT-OUT" in out.split("Captured stdout call")[-1], out
    assert "INNOCENT-ERR" in out.split("Captured stderr call")[-1], out
    pids = read_pids(pidlog)
    assert pids["damages"] == pids["innocent"], "the two tests ran in different workers"
    assert_gone(pids.values())


@pytest.mark.parametrize(
    "damage",
    [
        "os.write = lambda fd, data: len(data)",
        "os.read = os.readv = lambda *args: b''",
        # Output sent nowhere, and the means to take it back gone with it.
        "os.dup2(os.open(os.devnull, os.O_WRONLY), 1); os.dup2 = lambda *args: None",
    ],
    ids=["write", "read", "dup2"],
)
def test_a_body_that_leaves_os_mocked_harms_only_itself(
    pytester: pytest.Pytester, pidlog: Path, damage: str
) -> None:
    assert_innocent_unharmed(run_after(pytester, pidlog, damage), pidlog)


def test_a_body_that_breaks_select_poll_harms_only_itself(
    pytester: pytest.Pytester, pidlog: Path
) -> None:
    result = run_after(pytester, pidlog, "select.poll = None")
    assert_innocent_unharmed(result, pidlog)


def test_a_body_that_breaks_pickle_harms_only_itself(
    pytester: pytest.Pytester, pidlog: Path
) -> None:
    damage = """
    def broken(*args, **kwargs):
        raise RuntimeError("pickle is broken here")

    pickle.dumps = pickle.loads = pickle.Pickler = pickle.Unpickler = broken
    """
    assert_innocent_unharmed(run_after(pytester, pidlog, damage), pidlog)


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_a_body_that_replaces_the_dunder_streams_does_not_silence_the_next(
    pytester: pytest.Pytester, pidlog: Path, start: str
) -> None:
    damage = """
    sys.__stdout__ = io.StringIO()
    sys.__stderr__ = io.StringIO()
    """
    result = run_after(pytester, pidlog, damage, f"--subprocess-start={start}")
    assert_innocent_unharmed(result, pidlog)


def test_a_body_that_closes_the_streams_does_not_silence_the_next(
    pytester: pytest.Pytester, pidlog: Path
) -> None:
    damage = """
    sys.stdout.close()
    sys.stderr.close()
    """
    assert_innocent_unharmed(run_after(pytester, pidlog, damage), pidlog)


MANY_THREADS = """
import threading
import time
import pytest

THREADS = 150

@pytest.mark.subprocess(timeout=1)
def test_starts_many_threads_then_hangs():
    stop = threading.Event()
    for _ in range(THREADS):
        threading.Thread(target=stop.wait, daemon=True).start()
    time.sleep(300)  # the hang
"""


def test_a_timeout_shows_the_test_s_own_frame_first_among_many_threads(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_threads=MANY_THREADS)
    result = run(pytester, timeout=INNER_TIMEOUT)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "timed out after 1" in out
    line = line_of(MANY_THREADS, "the hang")
    frame = f'test_threads.py", line {line} in test_starts_many_threads_then_hangs'
    assert frame in out
    assert out.index(frame) < out.index("Thread 0x"), "the test's thread is not first"
    assert f"test_threads.py:{line}: WorkerTimeout" in out


HOLDS_THE_GIL = """
import itertools
import pytest

@pytest.mark.subprocess(timeout=1)
def test_holds_the_gil():
    sum(itertools.repeat(1, 10**15))  # C code that never lets go of the GIL
"""


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_a_timeout_of_a_body_that_holds_the_gil_still_shows_its_frame(
    pytester: pytest.Pytester, start: str
) -> None:
    """The watchdog cannot run; faulthandler, which needs no GIL, dumps on a signal instead.

    A spawned worker imports pytest while it decodes its first request: the
    timeout runs from before that, as the parent's does, or the dump would
    come after the parent has killed the worker.
    """
    pytester.makepyfile(test_gil=HOLDS_THE_GIL)
    result = run(pytester, f"--subprocess-start={start}", timeout=INNER_TIMEOUT)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    # faulthandler's dump, from its signal handler in the thread that holds the GIL.
    assert "Current thread 0x" in out
    line = line_of(HOLDS_THE_GIL, "never lets go")
    assert f'test_gil.py", line {line} in test_holds_the_gil' in out
    assert f"test_gil.py:{line}: WorkerTimeout" in out
    assert "<no Python frame>" not in out  # the watchdog, waiting for the GIL, is left out


def test_the_watchdog_s_dump_reads_as_faulthandler_s_with_the_serving_thread_first() -> None:
    stop = threading.Event()
    threads = [threading.Thread(target=stop.wait) for _ in range(150)]
    for thread in threads:
        thread.start()
    try:
        here = sys._getframe().f_lineno + 1
        stacks = _child._stacks(sys._current_frames(), threading.get_ident(), -1)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    dump = _child._timeout_line(1.5) + stacks
    assert dump.startswith("Timeout (0:00:01.500000)!\nCurrent thread 0x")
    dumped = _report._dump_threads(dump)
    assert len(dumped) == _child._MAX_THREADS
    assert dumped[0][-1] == (__file__, here, sys._getframe().f_code.co_name)
    assert dump.endswith("\n\n...\n")  # as faulthandler marks the threads left out
    cleaned = clean_stack(dump)
    assert cleaned.startswith("Timeout (0:00:01.500000)!\n\nCurrent thread 0x")
    assert f"line {here} in test_the_watchdog" in cleaned.splitlines()[3]
