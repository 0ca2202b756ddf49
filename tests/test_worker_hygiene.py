"""Acceptance tests: what a body leaves behind harms no test but its own.

A body may replace the functions the worker's own machinery calls (the
framing's ``os.write``, ``select.poll``, ``pickle``), or the streams it puts
back before each test, and leave them so; the next test in the same worker
must run and report as if nothing had happened.

Each test runs an inner pytest (``pytester.runpytest_subprocess``, so a hang
stays there, bounded by a timeout), as in test_marker.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from _inner import PARENT_CONFTEST, assert_gone, read_pids
from _inner import run_inner as run

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
