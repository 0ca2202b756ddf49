"""Acceptance tests: debuggers, Ctrl-C and pytest-timeout reach into the worker.

The debugger tests run pytest in a pseudo-terminal of its own, as a user
at a terminal would (job control included); every read from it has a
deadline, and an inner pytest that overruns is killed by its pid, which this
process holds unreaped.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
from _inner import PLUGIN, Terminal, assert_gone, read_pids, run_inner

pytestmark = [
    pytest.mark.usefixtures("no_plugin_autoload"),
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="a pseudo-terminal with job control"
    ),
]

# Options of every inner run: only this plugin, no cache, no colours to match around.
INNER = (*PLUGIN, "-p", "no:cacheprovider", "--color=no")
TIMEOUT = ("-p", "pytest_timeout")


@pytest.fixture
def terminal(pytester: pytest.Pytester) -> Iterator[Callable[..., Terminal]]:
    """Start pytest at a terminal of its own with these arguments; killed at teardown if alive."""
    started: list[Terminal] = []

    def start(*args: str) -> Terminal:
        started.append(Terminal(pytester, *INNER, *args))
        return started[-1]

    yield start
    for term in started:
        term.close()


FAILING = """
import os
import pytest

@pytest.mark.subprocess
def test_fails():
    local_value = 1234
    print("printed before the failure")
    assert local_value == 0

@pytest.mark.subprocess
def test_after():
    pass
"""


def test_pdb_post_mortem_runs_in_the_worker_on_its_frames(
    pytester: pytest.Pytester, terminal: Callable[..., Terminal]
) -> None:
    pytester.makepyfile(test_pm=FAILING)
    term = terminal("--pdb")
    term.expect(">>> entering PDB >>>")
    term.expect("(Pdb) ")
    term.send("p local_value")
    assert "1234" in term.expect("(Pdb) ")
    term.send("p os.getpid()")
    pid = int(re.findall(r"^(\d+)\s*$", term.expect("(Pdb) "), re.MULTILINE)[-1])
    term.send("c")
    code, text = term.finish()
    assert code == pytest.ExitCode.TESTS_FAILED, text
    assert pid != term.proc.pid  # the debugger ran in the worker, not in pytest
    assert "NameError" not in text
    lines = pytest.LineMatcher(text.splitlines())
    lines.fnmatch_lines(["*captured stdout*", "printed before the failure", "*traceback*"])
    lines.fnmatch_lines(["*PDB post_mortem (IO-capturing turned off)*", "*PDB continue*"])
    lines.fnmatch_lines(
        ["FAILED test_pm.py::test_fails - assert 1234 == 0", "*1 failed, 1 passed*"]
    )


def test_pdbcls_names_the_workers_debugger_with_spawned_workers(
    pytester: pytest.Pytester, terminal: Callable[..., Terminal]
) -> None:
    pytester.makepyfile(
        test_pm=FAILING,
        mypdb="""
        import pdb

        class MyPdb(pdb.Pdb):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.prompt = "(MyPdb) "
        """,
    )
    term = terminal("--subprocess-start=spawn", "--pdb", "--pdbcls=mypdb:MyPdb")
    term.expect("(MyPdb) ")
    term.send("p local_value")
    assert "1234" in term.expect("(MyPdb) ")
    term.send("c")
    code, text = term.finish()
    assert code == pytest.ExitCode.TESTS_FAILED, text
    assert "1 failed, 1 passed" in text


def test_quitting_the_post_mortem_ends_the_run(
    pytester: pytest.Pytester, terminal: Callable[..., Terminal]
) -> None:
    pytester.makepyfile(test_pm=FAILING)
    term = terminal("--pdb")
    term.expect("(Pdb) ")
    term.send("q")
    code, text = term.finish()
    assert code == pytest.ExitCode.INTERRUPTED, text
    assert "Exit: Quitting debugger" in text
    assert "test_after" not in text


BREAKPOINT = """
import pytest

@pytest.mark.subprocess
def test_breaks():
    x = 41
    breakpoint()
    print("printed after continue")
    assert x + 1 == 42

@pytest.mark.subprocess
def test_fails_after():
    print("printed by the next test")
    assert False
"""


@pytest.mark.parametrize("capture", ["-s", "--capture=fd"])
def test_breakpoint_gives_a_prompt_in_the_worker(
    pytester: pytest.Pytester, terminal: Callable[..., Terminal], capture: str
) -> None:
    pytester.makepyfile(test_bp=BREAKPOINT)
    term = terminal(capture)
    banner = term.expect("(Pdb) ")
    term.send("p x")
    assert "41" in term.expect("(Pdb) ")
    term.send("c")
    code, text = term.finish()
    assert code == pytest.ExitCode.TESTS_FAILED, text
    lines = pytest.LineMatcher(text.splitlines())
    lines.fnmatch_lines(["*1 failed, 1 passed*"])
    printed = "printed after continue" in (line.strip() for line in text.splitlines())
    if capture == "-s":
        assert "PDB set_trace >>>" in banner
        assert printed
    else:
        # Capture is off while the debugger runs, and on again after, as in pytest.
        assert "PDB set_trace (IO-capturing turned off)" in banner
        assert not printed
        lines.fnmatch_lines(["*Captured stdout call*", "printed by the next test"])


def test_a_breakpoint_set_in_the_debugger_stops_there_again(
    pytester: pytest.Pytester, terminal: Callable[..., Terminal]
) -> None:
    pytester.makepyfile(test_bp=BREAKPOINT)
    term = terminal("test_bp.py::test_breaks")
    term.expect("(Pdb) ")
    term.send("b 8")
    term.expect("(Pdb) ")
    term.send("c")
    term.expect("-> assert x + 1 == 42")
    term.expect("(Pdb) ")
    term.send("p x + 1")
    assert "42" in term.expect("(Pdb) ")
    term.send("c")
    code, text = term.finish()
    assert code == pytest.ExitCode.OK, text


def test_breakpoint_without_a_terminal_does_what_it_does_in_pytest(
    pytester: pytest.Pytester,
) -> None:
    """No terminal (CI): the debugger reads end-of-file, in the worker as in pytest."""
    pytester.makepyfile(
        test_bq="""
        import pytest

        def test_in_pytest():
            breakpoint()

        @pytest.mark.subprocess
        def test_in_the_worker():
            breakpoint()
        """
    )
    result = run_inner(pytester, "--color=no")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "FAILED test_bq.py::test_in_pytest - bdb.BdbQuit",
            "FAILED test_bq.py::test_in_the_worker - bdb.BdbQuit",
        ]
    )


def test_trace_gives_a_prompt_in_the_worker(
    pytester: pytest.Pytester, terminal: Callable[..., Terminal]
) -> None:
    pytester.makepyfile(test_pm=FAILING)
    term = terminal("--trace", "test_pm.py::test_fails")
    assert "-> local_value = 1234" in term.expect("(Pdb) ")
    term.send("n")
    term.expect("(Pdb) ")
    term.send("p local_value, os.getpid()")
    shown = term.expect("(Pdb) ")
    term.send("c")
    code, text = term.finish()
    assert code == pytest.ExitCode.TESTS_FAILED, text
    found = re.search(r"\(1234, (\d+)\)", shown)
    assert found is not None, shown
    assert int(found[1]) != term.proc.pid


def test_no_deadline_runs_while_a_debugger_does(
    pytester: pytest.Pytester, terminal: Callable[..., Terminal]
) -> None:
    """The plugin's timeout and pytest-timeout's stand down, as pytest-timeout does in pytest."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.subprocess(timeout=1)
        def test_debugged_slowly():
            breakpoint()
        """
    )
    term = terminal(*TIMEOUT, "--timeout=2")
    term.expect("(Pdb) ")
    time.sleep(3)  # a user thinking, past both timeouts
    term.send("c")
    code, text = term.finish()
    assert code == pytest.ExitCode.OK, text
    assert "Timeout" not in text


HANGS = """
import os
import time
import pytest
from pidlog import log

def helper_waits_for_ever():
    log("worker")
    time.sleep(300)

@pytest.mark.subprocess
def test_hangs():
    helper_waits_for_ever()

@pytest.mark.subprocess
def test_next():
    pass
"""

# pytest run by hand. SIGINT gets its default handler back first: a shell that
# runs this suite in the background without job control has it ignored.
INNER_MAIN = (
    "import signal, sys, pytest; "
    "signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.exit(pytest.main())"
)


def _wait_for_line(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().endswith("\n")):
        if time.monotonic() > deadline:
            pytest.fail(f"{path.name} got no line within {timeout} s")
        time.sleep(0.05)


def test_ctrl_c_shows_where_the_worker_was(pytester: pytest.Pytester, pidlog: Path) -> None:
    pytester.makepyfile(test_hangs=HANGS)
    cmd = [sys.executable, "-c", INNER_MAIN, *INNER, "test_hangs.py"]
    proc = pytester.popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    try:
        _wait_for_line(pidlog)
        proc.send_signal(signal.SIGINT)  # our own child, not yet reaped
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = out.decode()
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, text
    lines = pytest.LineMatcher(text.splitlines())
    lines.fnmatch_lines(
        [
            "*test_hangs.py::test_hangs: interrupted by KeyboardInterrupt: worker killed*",
            '*File "*test_hangs.py", line 8 in helper_waits_for_ever',
            '*File "*test_hangs.py", line 12 in test_hangs',
            "*! KeyboardInterrupt !*",
            "*test_hangs.py:8: KeyboardInterrupt",
        ]
    )
    assert "_wire.py" not in text
    assert "_process.py" not in text
    assert_gone(read_pids(pidlog).values())


def test_pytest_timeout_shows_the_test_frames_and_the_next_test_passes(
    pytester: pytest.Pytester, pidlog: Path
) -> None:
    pytester.makepyfile(test_hangs=HANGS)
    result = run_inner(pytester, "--color=no", *TIMEOUT, "--timeout=3")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "    def helper_waits_for_ever():",
            "*time.sleep(300)",
            "E       Failed: Timeout (>3.0s) from pytest-timeout.",
            "test_hangs.py:8: Failed",
            "*test_hangs.py::test_hangs: interrupted by Failed: worker killed*",
            "workers started: 2, restarted after a crash or timeout: 1",
        ]
    )
    assert "_wire.py" not in result.stdout.str()
    assert "_process.py" not in result.stdout.str()
    assert_gone(read_pids(pidlog).values())


def test_pytest_timeout_thread_method_writes_the_worker_stacks(
    pytester: pytest.Pytester, pidlog: Path
) -> None:
    """pytest-timeout ends the run (os._exit), as it does in pytest, after the worker's stacks."""
    pytester.makepyfile(test_hangs=HANGS)
    result = run_inner(pytester, "--color=no", *TIMEOUT, "--timeout=2", "--timeout-method=thread")
    assert result.ret == 1
    result.stdout.fnmatch_lines(
        [
            "*Timeout: stacks of the subprocess worker (pid *)*",
            '*File "*test_hangs.py", line 8 in helper_waits_for_ever',
            '*File "*test_hangs.py", line 12 in test_hangs',
            "*+ Timeout +*",
        ]
    )
    assert_gone(read_pids(pidlog).values())
