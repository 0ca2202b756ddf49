"""The suite's guards (conftest.py).

The process leak guard ends what a test leaked, and nothing else. A
stranger's process here is a ``sleep`` orphaned through a shell that exits:
outside this process's tree, and started without the session's token.

The state check fails a test that leaves os.environ, the cwd or sys.path
changed, and puts them back for the tests after it.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import _inner
import conftest
import psutil
import pytest

PIDFD = hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")
# Without pidfds a test does not signal what it started: it waits for it to end.
SLEEP = 30 if PIDFD else 1
# How long the guard waits for a leaked process to exit by itself.
GRACE = 0.2


class Pinned:
    """A process a test started, held so that ending it can reach no other.

    Made while the process is provably the test's: its child, or the child of
    a child not yet reaped. A pidfd names the process, not its pid. Without
    pidfds the process is never signalled, only waited for.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.proc = psutil.Process(pid)
        self.fd = os.pidfd_open(pid) if PIDFD else None

    def holds_pid(self) -> bool:
        """Whether the process has not been reaped (its pid is still its own)."""
        if self.fd is None:
            return self.proc.is_running()
        try:
            signal.pidfd_send_signal(self.fd, 0)
        except ProcessLookupError:
            return False
        return True

    def running(self) -> bool:
        """Whether the process has not exited (a zombie has)."""
        if self.fd is not None:
            poll = select.poll()
            poll.register(self.fd, select.POLLIN)
            return not poll.poll(0)
        try:
            return self.proc.is_running() and self.proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def wait(self, timeout: float) -> bool:
        """Wait until the process has exited; False if it still runs after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def end(self) -> None:
        """Kill the process if it runs (through the pidfd only), wait for it, reap it if ours."""
        try:
            if self.fd is not None and self.running():
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self.fd, signal.SIGKILL)
            assert self.wait(SLEEP + 5), f"pid {self.pid} did not end"
            self.reap()
        finally:
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def reap(self) -> bool:
        """Reap the process if it is our child and exited; False if it was reaped already."""
        try:
            if self.fd is not None and hasattr(os, "P_PIDFD"):
                os.waitid(os.P_PIDFD, self.fd, os.WEXITED | os.WNOHANG)
            elif self.holds_pid() and self.proc.ppid() == os.getpid():
                os.waitpid(self.pid, os.WNOHANG)
            else:
                return False
        except ChildProcessError:
            return False
        return True


@contextlib.contextmanager
def spawned(*argv: str) -> Iterator[Pinned]:
    """A child of ours running ``argv``, ended and reaped afterwards."""
    pid = os.posix_spawnp(argv[0], argv, dict(os.environ))
    child = Pinned(pid)  # not reaped yet: the pid is still our child's
    try:
        yield child
    finally:
        child.end()


def execed(process: Pinned, name: str, timeout: float = 10) -> None:
    """Wait until ``process`` runs the program ``name``."""
    deadline = time.monotonic() + timeout
    while process.proc.cmdline()[:1] != [name]:
        assert time.monotonic() < deadline, f"pid {process.pid} never became {name}"
        time.sleep(0.005)


@contextlib.contextmanager
def orphaned_sleep(env: dict[str, str]) -> Iterator[Pinned]:
    """A ``sleep`` whose parent, a shell of ours, has exited; ended afterwards."""
    script = f"sleep {SLEEP} </dev/null >/dev/null 2>&1 & echo $!; read line"
    shell = subprocess.Popen(
        ["sh", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
    )
    with shell:
        assert shell.stdout is not None
        assert shell.stdin is not None
        sleeper = Pinned(int(shell.stdout.readline()))
        try:
            # The shell is not reaped yet, so its pid is its own: held while
            # its child, the sleep is the one it started.
            ours = sleeper.proc.ppid() == shell.pid and sleeper.holds_pid()
        except psutil.Error:
            ours = False
        shell.stdin.close()  # `read` ends, and with it the shell
    if not ours:  # not proved the one we started: leave it be
        sleeper.close()
        pytest.fail(f"could not hold the sleep the shell started (pid {sleeper.pid})")
    try:
        # `$!` is known once the shell has forked, maybe before its child
        # has become `sleep`: until then the guard would name it `sh -c ...`.
        execed(sleeper, "sleep")
        assert shell.returncode is not None
        assert os.getpid() not in [p.pid for p in sleeper.proc.parents()]
        yield sleeper
    finally:
        sleeper.end()


@contextlib.contextmanager
def environ_emptied(empty: bool) -> Iterator[None]:
    """Optionally empty os.environ for a while, as a test that runs Mirror() here could."""
    saved = dict(os.environ)
    if empty:
        os.environ.clear()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def without_token() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != conftest.TOKEN_VAR}


@pytest.fixture
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard waits ``GRACE`` seconds, not its usual two, for a leak to exit by itself."""
    monkeypatch.setattr(conftest, "CHILD_GRACE", GRACE)


pytestmark = pytest.mark.usefixtures("short_grace")
environ_states = pytest.mark.parametrize("empty", [False, True], ids=["environ", "emptied"])


@environ_states
def test_the_guard_leaves_a_strangers_process_alone(
    request: pytest.FixtureRequest, empty: bool
) -> None:
    existing = set(psutil.pids())
    with orphaned_sleep(without_token()) as stranger:
        assert conftest.TOKEN_VAR not in stranger.proc.environ()
        assert stranger.pid not in existing  # the guard looks at it
        with environ_emptied(empty):
            report = conftest._check_processes(request.node, existing)
        assert report == []
        assert stranger.running()


def test_the_guard_signals_nothing_it_cannot_prove_its_own(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if a leaked process had exited and a stranger's taken its pid
    # between the moment the guard found it and the moment it kills.
    with orphaned_sleep(without_token()) as stranger:
        monkeypatch.setattr(conftest, "_new_processes", lambda existing: [stranger.proc])
        assert conftest._check_processes(request.node, set()) == []
        assert stranger.running()


@environ_states
def test_the_guard_kills_reaps_and_reports_a_child_left_running(
    request: pytest.FixtureRequest, empty: bool
) -> None:
    existing = set(psutil.pids())
    with spawned("sleep", str(SLEEP)) as child:
        with environ_emptied(empty):
            report = conftest._check_processes(request.node, existing)
        assert report == [f"pid {child.pid}: sleep {SLEEP}"]
        assert not child.running()
        assert not child.reap()  # the guard reaped it


@environ_states
def test_the_guard_kills_and_reports_an_orphan_with_our_token(
    request: pytest.FixtureRequest, empty: bool
) -> None:
    existing = set(psutil.pids())
    with orphaned_sleep(dict(os.environ)) as orphan:
        with environ_emptied(empty):
            report = conftest._check_processes(request.node, existing)
        assert report == [f"pid {orphan.pid}: sleep {SLEEP}"]
        assert orphan.wait(5)


STATE_TESTS = """
import os
import sys

import pytest

START = os.getcwd()


def test_sets_a_variable():
    os.environ["LEFT_BEHIND"] = "1"


def test_after_it_the_variable_is_gone():
    assert "LEFT_BEHIND" not in os.environ


def test_moves_the_cwd(tmp_path):
    os.chdir(tmp_path)


def test_after_it_the_cwd_is_back():
    assert os.getcwd() == START


def test_adds_to_sys_path():
    sys.path.append("elsewhere")


def test_after_it_sys_path_is_back():
    assert "elsewhere" not in sys.path


def test_changes_put_back_by_monkeypatch_pass(monkeypatch, tmp_path):
    monkeypatch.setenv("SET_FOR_A_WHILE", "1")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.fixture
def moved(tmp_path):
    os.chdir(tmp_path)
    yield
    os.chdir(START)


def test_changes_put_back_by_a_fixture_pass(moved):
    pass
"""


@pytest.mark.usefixtures("no_plugin_autoload")
def test_a_test_that_leaves_the_process_changed_fails_and_the_next_is_unharmed(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(Path(conftest.__file__).read_text())
    pytester.makepyfile(_inner=Path(_inner.__file__).read_text(), test_state=STATE_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=8, errors=3)
    result.stdout.fnmatch_lines_random(
        [
            "*ERROR at teardown of test_sets_a_variable*",
            "*set $LEFT_BEHIND",
            "*ERROR at teardown of test_moves_the_cwd*",
            "*moved the cwd from*",
            "*ERROR at teardown of test_adds_to_sys_path*",
            "*changed sys.path: added ?'elsewhere'?, removed ??",
        ]
    )
