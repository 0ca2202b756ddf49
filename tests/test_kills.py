"""Who signals whom: never a pid after its reap, and nothing a test started survives.

The first test records, in every process of an inner run (pytest, the
templates, the workers), each signal sent (CPython's ``os.kill`` and
``os.killpg`` audit events, and pidfd signals) and each reap, on one clock
shared by all processes, then checks that no signal ever targeted a pid that
had been reaped. The others check that processes a test body started and that
left its worker's process group or session die with the worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import psutil
import pytest
from _inner import PLUGIN, run_inner, wait_for

pytestmark = [
    pytest.mark.usefixtures("no_plugin_autoload"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="subreapers are Linux's"),
]

# Loaded by every process of the inner run through PYTHONPATH. Each writes
# "<clock ns> <what> <pid>" lines to a file of its own: "signal" for a kill,
# killpg or pidfd signal aimed at a pid, "reap" when a wait collected one,
# "born" when os.fork() made one.
RECORDER = r"""
import os, signal, sys, time

_log_dir = os.environ.get("SIGNAL_LOG_DIR")
if _log_dir:
    _clock = time.monotonic_ns
    _files = {}

    def _write(what, pid):
        me = os.getpid()
        f = _files.get(me)
        if f is None:
            f = _files[me] = open(os.path.join(_log_dir, f"{me}.log"), "a", buffering=1)
        f.write(f"{_clock()} {what} {pid}\n")

    def _audit(event, args):
        if event in ("os.kill", "os.killpg"):
            _write("signal", args[0])

    sys.addaudithook(_audit)

    _pidfds = {}
    _pidfd_open = os.pidfd_open
    _pidfd_send = signal.pidfd_send_signal
    _waitpid, _waitid, _fork = os.waitpid, os.waitid, os.fork

    def pidfd_open(pid, *args):
        fd = _pidfd_open(pid, *args)
        _pidfds[fd] = pid
        return fd

    def pidfd_send_signal(fd, sig, *args):
        _write("signal", _pidfds.get(fd, -1))
        return _pidfd_send(fd, sig, *args)

    def waitpid(pid, options):
        result = _waitpid(pid, options)
        if result[0] > 0:
            _write("reap", result[0])
        return result

    def waitid(idtype, id, options):
        result = _waitid(idtype, id, options)
        if result is not None and not options & os.WNOWAIT:
            _write("reap", result.si_pid)
        return result

    def fork():
        pid = _fork()
        if pid > 0:
            _write("born", pid)
        return pid

    os.pidfd_open, signal.pidfd_send_signal = pidfd_open, pidfd_send_signal
    os.waitpid, os.waitid, os.fork = waitpid, waitid, fork
"""

# Crashes, hard exits, timeouts, function-scope churn, restarts by hand and
# processes that leave the worker's group: every way the plugin ends a worker.
CHURN = """
import ctypes, os, subprocess, sys, time
import pytest

@pytest.mark.subprocess
def test_segfault():
    ctypes.string_at(0)

@pytest.mark.subprocess
def test_hard_exit():
    os._exit(3)

@pytest.mark.subprocess(timeout=0.5)
def test_hang():
    time.sleep(30)

KEPT = []  # never waited for: the worker ends first

@pytest.mark.subprocess(scope="function")
@pytest.mark.parametrize("i", range(6))
def test_churn(i):
    KEPT.append(subprocess.Popen(["sleep", "30"], start_new_session=True))

@pytest.mark.subprocess
def test_leaves_a_daemon():
    subprocess.Popen(["sh", "-c", "setsid sleep 30 & exit 0"]).wait()

def test_restart_by_hand(subworker):
    for _ in range(3):
        subworker.run("import os")
        subworker.restart()
    subworker.run("import os; os._exit(5)")
"""


def _events(log_dir: Path) -> list[tuple[int, str, int, int]]:
    """Every recorded event as (clock, what, target pid, recording pid), in clock order."""
    events = []
    for log in log_dir.glob("*.log"):
        recorder = int(log.stem)
        for line in log.read_text().splitlines():
            clock, what, pid = line.split()
            events.append((int(clock), what, int(pid), recorder))
    return sorted(events)


def _late_signals(events: list[tuple[int, str, int, int]]) -> list[str]:
    """Signals aimed at a pid after it was reaped (and before any rebirth of that pid)."""
    reaped: dict[int, tuple[int, int]] = {}
    late = []
    for clock, what, pid, recorder in events:
        target = abs(pid)
        if what == "reap":
            reaped[target] = (clock, recorder)
        elif what == "born":
            reaped.pop(target, None)
        elif what == "signal" and target in reaped and target != recorder:
            when, reaper = reaped[target]
            late.append(
                f"pid {recorder} signalled {pid} {(clock - when) / 1e6:.3f} ms after "
                f"pid {reaper} reaped it"
            )
    return late


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_no_signal_targets_a_pid_after_its_reap(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, start: str
) -> None:
    site, logs = pytester.mkdir("site"), pytester.mkdir("logs")
    (site / "sitecustomize.py").write_text(RECORDER)
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("SIGNAL_LOG_DIR", str(logs))
    pytester.makepyfile(test_churn=CHURN)
    result = run_inner(pytester, f"--subprocess-start={start}", timeout=120)
    result.assert_outcomes(passed=7, failed=4)
    events = _events(logs)
    counts: dict[str, int] = defaultdict(int)
    for _, what, _, _ in events:
        counts[what] += 1
    # The recorder saw the run: workers were reaped and signalled.
    assert counts["reap"] >= 10, counts
    assert counts["signal"] >= 10, counts
    assert _late_signals(events) == []


# --- processes that leave the worker's group -------------------------------------------

# Each body starts `sleep` processes that leave its group in two ways, records
# their pids and start times, then does what its name says.
ESCAPES = """
import os, subprocess, sys, time
import psutil, pytest

KEPT = []  # never waited for: the worker ends first

def start_escapees():
    with open(os.environ["ESCAPEES"], "a") as f:
        own = subprocess.Popen(["sleep", "30"], start_new_session=True)
        KEPT.append(own)
        f.write(f"{own.pid} {psutil.Process(own.pid).create_time()}\\n")
        # Double fork and setsid: a daemon, adopted by the worker.
        daemon = int(subprocess.run(
            ["sh", "-c", "setsid sleep 30 >/dev/null 2>&1 & echo $!"],
            capture_output=True, check=True,
        ).stdout)
        f.write(f"{daemon} {psutil.Process(daemon).create_time()}\\n")

@pytest.mark.subprocess
def test_crash():
    start_escapees()
    os._exit(1)

@pytest.mark.subprocess(timeout=0.5)
def test_timeout():
    start_escapees()
    time.sleep(30)

@pytest.mark.subprocess(scope="function")
def test_scope_end():
    start_escapees()
"""


def _escapees(path: Path) -> list[psutil.Process]:
    """The recorded processes that are still the same processes as recorded."""
    found = []
    for line in path.read_text().splitlines():
        pid, created = line.split()
        try:
            proc = psutil.Process(int(pid))
            if abs(proc.create_time() - float(created)) < 0.01 and (
                proc.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


def _all_gone(path: Path) -> bool:
    return not _escapees(path)


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_processes_that_left_the_group_die_with_the_worker(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, start: str
) -> None:
    escapees = pytester.path / "escapees.txt"
    escapees.touch()
    monkeypatch.setenv("ESCAPEES", str(escapees))
    pytester.makepyfile(test_escapes=ESCAPES)
    result = run_inner(pytester, f"--subprocess-start={start}", timeout=60)
    result.assert_outcomes(passed=1, failed=2)
    assert len(escapees.read_text().splitlines()) == 6
    assert wait_for(lambda: _all_gone(escapees)), [p.pid for p in _escapees(escapees)]


# A run that stays busy in a marked body, having started processes that left
# its worker's group, until pytest itself is killed.
BUSY = """
import os, pytest
from test_escapes import start_escapees

@pytest.mark.subprocess
def test_busy():
    start_escapees()
    open(os.environ["BUSY"], "w").close()
    import time; time.sleep(60)
"""


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_what_a_test_started_dies_with_a_killed_pytest(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, how: signal.Signals
) -> None:
    escapees, busy = pytester.path / "escapees.txt", pytester.path / "busy"
    escapees.touch()
    monkeypatch.setenv("ESCAPEES", str(escapees))
    monkeypatch.setenv("BUSY", str(busy))
    pytester.makepyfile(test_escapes=ESCAPES, test_busy=BUSY)
    cmd = [sys.executable, "-m", "pytest", *PLUGIN, "-p", "no:cacheprovider", "test_busy.py"]
    proc = pytester.popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(busy.exists, 30), "the inner run never got busy"
        assert len(_escapees(escapees)) == 2
    finally:
        proc.send_signal(how)  # our own child, not yet reaped
        proc.wait(30)
    assert wait_for(lambda: _all_gone(escapees)), [p.pid for p in _escapees(escapees)]


# A plain test forks the pytest process itself; the fork lives on after pytest dies.
FORKS = """
import os, time, pytest

@pytest.mark.subprocess
def test_1_marked():
    with open(os.environ["WORKER"], "w") as f:
        f.write(str(os.getpid()))

def test_2_pytest_forks_a_helper():
    if os.fork() == 0:
        time.sleep(6)
        os._exit(0)

def test_3_busy():
    open(os.environ["BUSY"], "w").close()
    time.sleep(60)
"""


def test_a_process_forked_from_pytest_does_not_keep_workers_alive(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker_file, busy = pytester.path / "worker.txt", pytester.path / "busy"
    monkeypatch.setenv("WORKER", str(worker_file))
    monkeypatch.setenv("BUSY", str(busy))
    pytester.makepyfile(test_forks=FORKS)
    cmd = [sys.executable, "-m", "pytest", *PLUGIN, "-p", "no:cacheprovider", "test_forks.py"]
    proc = pytester.popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(busy.exists, 30), "the inner run never got busy"
        worker = psutil.Process(int(worker_file.read_text()))
        template = psutil.Process(worker.ppid())
        helper = [p for p in psutil.Process(proc.pid).children() if p.pid != template.pid]
    finally:
        proc.kill()  # our own child, not yet reaped
        proc.wait(30)
    # Gone well before the helper, which holds whatever pytest held, exits.
    assert wait_for(lambda: not (worker.is_running() or template.is_running()), 3)
    # The helper is the inner test's own business; it exits by itself.
    assert len(helper) == 1
    helper[0].wait(30)


def test_the_recorder_sees_what_it_should(tmp_path: Path) -> None:
    """The recorder itself: a reap and a late signal are caught."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(RECORDER)
    script = textwrap.dedent(
        """
        import os, signal, subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        try:
            os.kill(child.pid, 0)
        except ProcessLookupError:
            pass
        """
    )
    env = {**os.environ, "PYTHONPATH": str(site), "SIGNAL_LOG_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", script], env=env, check=True)
    events = _events(tmp_path)
    assert [what for _, what, _, _ in events] == ["reap", "signal"]
    assert len(_late_signals(events)) == 1


# The body ends its own template (through a pidfd, after checking that it is
# still its parent), then waits to die with it.
TEMPLATE_DIES = """
import os, signal, time, pytest

@pytest.mark.subprocess
def test_1_ends_its_template():
    parent = os.getppid()
    fd = os.pidfd_open(parent)
    assert os.getppid() == parent  # so the pidfd holds the template itself
    signal.pidfd_send_signal(fd, signal.SIGKILL)
    time.sleep(30)

@pytest.mark.subprocess
def test_2_next():
    pass
"""


def test_a_worker_lost_with_its_template_says_its_status_is_unknown(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_template_dies=TEMPLATE_DIES)
    result = run_inner(pytester, "-rA", timeout=60)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*WorkerCrashed: worker crashed: an exit status nobody could learn*"]
    )
    result.stdout.no_fnmatch_line("*SIGKILL*")
