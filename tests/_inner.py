"""Helpers shared by the tests, most of them by the acceptance tests that drive an inner pytest."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil
import pytest

# Inner runs load only this plugin: the other installed ones only slow them down.
PLUGIN = ("-p", "pytest_subproc.plugin")

# Imported by inner test bodies: ``log(tag)`` appends ``tag pid`` to $PIDLOG.
PIDLOG = """
import os

def log(tag, pid=None):
    with open(os.environ["PIDLOG"], "a") as f:
        f.write(f"{tag} {pid or os.getpid()}\\n")
"""

# Logs the inner pytest's own pid: fixtures run in the parent, not in a worker.
# The conftest is imported in the workers too, and its fixtures run there:
# only the pytest process runs the test loop.
PARENT_CONFTEST = """
import pidlog
import pytest

def pytest_runtestloop(session):
    pidlog.log("parent")
"""


def run_inner(
    pytester: pytest.Pytester, *args: str, timeout: float = 60, cache: bool = False
) -> pytest.RunResult:
    """Run pytest, with only this plugin, in a subprocess; fail on anything it leaked."""
    no_cache = () if cache else ("-p", "no:cacheprovider")
    result = pytester.runpytest_subprocess(*PLUGIN, *no_cache, *args, timeout=timeout)
    # The pytest process and the worker template say on stderr what they leaked.
    assert "ResourceWarning" not in result.stderr.str(), result.stderr.str()
    return result


def read_pids(path: Path) -> dict[str, int]:
    pids = {}
    for line in path.read_text().splitlines():
        tag, pid = line.split()
        pids[tag] = int(pid)
    return pids


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_gone(pids: Iterable[int], timeout: float = 5.0) -> None:
    """Every pid has exited within ``timeout`` seconds (the run left nothing behind)."""
    deadline = time.monotonic() + timeout
    alive = {pid for pid in pids if pid != os.getpid()}
    while alive:
        alive = {pid for pid in alive if running(pid)}
        if alive and time.monotonic() > deadline:
            pytest.fail(f"processes outlived the inner run: {sorted(alive)}")
        time.sleep(0.05)


@pytest.fixture
def no_plugin_autoload(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inner runs load only the plugins they name (see PLUGIN)."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")


@pytest.fixture
def pidlog(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A file the inner test bodies append ``tag pid`` lines to (``pidlog.log(tag)``)."""
    path = pytester.path / "pids.txt"
    pytester.makepyfile(pidlog=PIDLOG)
    monkeypatch.setenv("PIDLOG", str(path))
    return path


# Set by pytest itself for each phase of a test, and removed after it.
CURRENT_TEST_VAR = "PYTEST_CURRENT_TEST"


def _environ() -> dict[str, str]:
    env = dict(os.environ)
    env.pop(CURRENT_TEST_VAR, None)
    return env


def _getcwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # the directory was removed
        return None


class ProcessState:
    """This process's os.environ, cwd and sys.path, to put back later.

    ``PYTEST_CURRENT_TEST`` is left out: pytest changes it between the phases
    of a test.
    """

    def __init__(self) -> None:
        self.env = _environ()
        self.cwd = _getcwd()
        self.path_list = sys.path
        self.path = list(sys.path)

    def restore(self) -> list[str]:
        """Put back whatever changed since this was taken, and say what that was."""
        changed = []
        env = _environ()
        if env != self.env:
            for name in sorted(env.keys() - self.env.keys()):
                changed.append(f"set ${name}")
                del os.environ[name]
            for name, value in sorted(self.env.items()):
                if env.get(name) != value:
                    changed.append(f"changed ${name}" if name in env else f"unset ${name}")
                    os.environ[name] = value
        cwd = _getcwd()
        if cwd != self.cwd:
            changed.append(f"moved the cwd from {self.cwd} to {cwd}")
            if self.cwd is not None:
                try:
                    os.chdir(self.cwd)
                except OSError as exc:
                    changed.append(f"and it cannot be moved back: {exc}")
        if sys.path is not self.path_list:
            changed.append("replaced the sys.path list")
            sys.path = self.path_list
        if sys.path != self.path:
            added = [p for p in sys.path if p not in self.path]
            removed = [p for p in self.path if p not in sys.path]
            what = f"added {added}, removed {removed}" if added or removed else "reordered it"
            changed.append(f"changed sys.path: {what}")
            sys.path[:] = self.path
        return changed


# pytest in a session of its own whose controlling terminal is the pty named
# first, with ``stty tostop``: a background process group that writes to the
# terminal is stopped, as job control does.
IN_TERMINAL = """
import os, signal, sys, termios
os.setsid()
fd = os.open(sys.argv[1], os.O_RDWR)  # opened by a session leader: its terminal
mode = termios.tcgetattr(fd)
mode[3] |= termios.TOSTOP
termios.tcsetattr(fd, termios.TCSANOW, mode)
for std in (0, 1, 2):
    os.dup2(fd, std)
os.close(fd)
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv = ["pytest", *sys.argv[2:]]
import pytest
sys.exit(pytest.main())
"""


class Terminal:
    """The master side of a pty that an inner pytest, run with ``args``, has as its terminal."""

    def __init__(self, pytester: pytest.Pytester, *args: str) -> None:
        # The slave end stays open here too, so reads never fail before pytest opens it.
        self.master, self.slave = pty.openpty()
        cmd = [sys.executable, "-c", IN_TERMINAL, os.ttyname(self.slave), *args]
        self.proc = pytester.popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.text = ""
        self.seen = 0  # where the next expect() looks from

    def _read(self, until: float) -> bool:
        """Read what the terminal shows within ``until``; False once pytest has exited."""
        if select.select([self.master], [], [], max(0.0, min(0.1, until - time.monotonic())))[0]:
            self.text += os.read(self.master, 1 << 16).decode(errors="replace")
            return True
        return self.proc.poll() is None

    def expect(self, text: str, timeout: float = 30.0) -> str:
        """Wait until the terminal shows ``text`` after what was expected last; the text since."""
        deadline = time.monotonic() + timeout
        while (found := self.text.find(text, self.seen)) < 0:
            if time.monotonic() > deadline or not self._read(deadline):
                pytest.fail(f"the terminal did not show {text!r}; it showed:\n{self.text}")
        since, self.seen = self.text[self.seen : found + len(text)], found + len(text)
        return since

    def send(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def finish(self, timeout: float = 60.0) -> tuple[int, str]:
        """Wait for pytest to exit; its exit code and all the terminal showed."""
        deadline = time.monotonic() + timeout
        while self._read(deadline):
            if time.monotonic() > deadline:
                pytest.fail(f"pytest did not finish; the terminal showed:\n{self.text}")
        while self._read(time.monotonic()) and self.proc.poll() is None:
            pass
        while select.select([self.master], [], [], 0)[0]:  # what is left to read
            self.text += os.read(self.master, 1 << 16).decode(errors="replace")
        return self.proc.wait(timeout=5), self.text

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # our own child, not yet reaped: the pid is still its
        self.proc.wait()
        os.close(self.master)
        os.close(self.slave)
