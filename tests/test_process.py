"""Unit tests of ``pytest_subproc._process.Worker``, driven directly.

Each test owns its worker and closes it. Requests are sent with
``Worker.request`` and checked through the ``Reply`` they return. The
numbered defects are those of the seed (see its notes): 5 death noticed only by
a slow polling thread, 6 an exit with code 0 never noticed, 7 SIGSEGV and
``exit(11)`` confused, 8 the status lost to whoever reaps first, 9 a stubborn
child and its descendants surviving the kill, 15 banners, startup files and
output landing in the next call, 18 fds and temp files leaking.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import signal
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import psutil
import pytest
from _inner import wait_for

from pytest_subproc import WorkerCrashed, WorkerStartError, WorkerTimeout, _process
from pytest_subproc._process import Reply, Worker
from pytest_subproc._wire import Kind

KIB = 1 << 10
MIB = 1 << 20
# Loose bounds: timings on shared CI machines are noisy.
NOTICE_BOUND = 0.5
LATE_BOUND = 0.5

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX signals and process groups")

_filenames = itertools.count(1)


@pytest.fixture
def worker() -> Iterator[Worker]:
    w = Worker()
    try:
        yield w
    finally:
        w.close()


def run(w: Worker, source: str, timeout: float | None = None) -> Reply:
    """Send a RUN request with a fresh filename, as the subworker handle does."""
    filename = f"<test-process-{next(_filenames)}>"
    return w.request(Kind.RUN, (textwrap.dedent(source), filename), timeout=timeout)


def ok(reply: Reply) -> Any:
    """Return the reply's value, failing clearly when it carries an error."""
    assert reply.error is None, f"unexpected error: {reply.error!r}"
    return reply.value


def store(w: Worker, name: str, value: Any) -> None:
    ok(w.request(Kind.STORE, (name, value)))


def load(w: Worker, name: str) -> Any:
    return ok(w.request(Kind.LOAD, (name,)))


def crash_of(reply: Reply) -> WorkerCrashed:
    assert isinstance(reply.error, WorkerCrashed), f"expected a crash, got {reply.error!r}"
    return reply.error


def timeout_of(reply: Reply) -> WorkerTimeout:
    assert isinstance(reply.error, WorkerTimeout), f"expected a timeout, got {reply.error!r}"
    return reply.error


def exited(pid: int) -> bool:
    """Whether the process has exited (a zombie counts: it runs nothing)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def is_gone(pid: int) -> bool:
    """Whether the process exits within a few seconds (its template kills it, not us)."""
    return wait_for(lambda: exited(pid))


def sigkill(pid: int) -> None:
    """SIGKILL a process of this test's own tree, only if it still is one.

    Through a pidfd, the check and the signal are about the same process, even
    if the pid were reused meanwhile; without pidfds, psutil's check of the
    start time stands in.
    """
    try:
        proc = psutil.Process(pid)
        fd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else -1
    except (psutil.Error, ProcessLookupError):
        return
    try:
        if not any(p.pid == os.getpid() for p in proc.parents()):
            return  # not ours (any more): leave it alone
        if fd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        else:
            with contextlib.suppress(psutil.Error):
                proc.kill()
    finally:
        if fd >= 0:
            os.close(fd)


def fd_count() -> int:
    if sys.platform.startswith("linux"):
        return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir used
    return psutil.Process().num_fds()


def my_children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


# --- start-up -------------------------------------------------------------------------


def test_not_started_until_first_use(worker: Worker) -> None:
    assert worker.pid is None
    assert not worker.alive
    assert worker.starts == 0


def test_start_handshake(worker: Worker) -> None:
    worker.start()
    pid = worker.pid
    assert isinstance(pid, int)
    assert worker.alive
    assert worker.starts == 1
    cmdline = psutil.Process(pid).cmdline()
    assert "-i" not in cmdline
    # Forked from a template of its own, started as a plain module.
    assert cmdline[-3:-1] == ["-m", "pytest_subproc._zygote"]
    worker.start()  # already up: a no-op
    assert (worker.pid, worker.starts) == (pid, 1)
    ok(run(worker, "import os; me = os.getpid()"))
    assert load(worker, "me") == pid


@posix_only
def test_worker_leads_a_group_in_our_session_and_has_no_stdin(worker: Worker) -> None:
    # A group of its own, to be killed as one; our session, so that Linux
    # schedules it with us (its waits yield the CPU to us, and ours to it).
    source = "import os, sys; group, session = os.getpgrp(), os.getsid(0); data = sys.stdin.read()"
    ok(run(worker, source))
    assert load(worker, "group") == worker.pid
    assert load(worker, "session") == os.getsid(0)
    assert load(worker, "data") == ""


@posix_only
def test_an_idle_worker_sleeps(worker: Worker) -> None:
    # It waits awake a millisecond for the next request, then sleeps.
    ok(run(worker, "pass"))
    process = psutil.Process(worker.pid)
    time.sleep(0.05)
    before = sum(process.cpu_times()[:2])
    time.sleep(0.5)
    assert sum(process.cpu_times()[:2]) - before < 0.1


@pytest.fixture
def sitecustomize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Make the worker's interpreter run ``source`` at start-up, before the worker's code."""

    def make(source: str) -> None:
        root = tmp_path / "site"
        root.mkdir()
        (root / "sitecustomize.py").write_text(textwrap.dedent(source))
        make_env = _process.child_env
        monkeypatch.setattr(_process, "child_env", lambda: {**make_env(), "PYTHONPATH": str(root)})

    return make


def test_start_error_carries_stderr(
    sitecustomize: Callable[[str], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    sitecustomize(
        """
        import os, sys
        sys.stderr.write("ImportError: the worker's environment is broken\\n")
        sys.stderr.flush()
        os._exit(3)
        """
    )
    w = Worker()
    try:
        with pytest.raises(WorkerStartError) as info:
            w.start()
        exc = info.value
        assert exc.exitcode == 3
        assert "ImportError: the worker's environment is broken" in exc.output
        assert "exited while starting (exit code 3)" in str(exc)
        assert "the worker's environment is broken" in str(exc)
        assert not w.alive
        # A request starts the worker first, and fails the same way.
        with pytest.raises(WorkerStartError):
            w.request(Kind.RUN, ("pass", "<never>"))
        # Once the cause is gone, the same Worker starts fine.
        monkeypatch.undo()
        ok(run(w, "x = 1"))
        assert w.alive
    finally:
        w.close()


def test_start_that_hangs_times_out(sitecustomize: Callable[[str], None]) -> None:
    sitecustomize("import sys, time\nprint('stuck at start', file=sys.stderr)\ntime.sleep(300)\n")
    w = Worker(start_timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(WorkerStartError) as info:
            w.start()
        elapsed = time.monotonic() - started
        assert "did not answer in time" in str(info.value)
        assert "stuck at start" in info.value.output
        assert 0.5 <= elapsed < 0.5 + 2.0
        assert w.pid is None  # its template hung before it could fork the worker
        assert wait_for(lambda: not my_children())  # and was killed
    finally:
        w.close()


# --- payloads -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [0, 64 * KIB - 1, 64 * KIB, 64 * KIB + 1, MIB],
    ids=["0B", "64KiB-1", "64KiB", "64KiB+1", "1MiB"],
)
def test_payload_round_trip(worker: Worker, size: int) -> None:
    """seed defect 1: one read per message broke anything over the pipe buffer."""
    data = os.urandom(size)
    store(worker, "blob", data)
    ok(run(worker, "import hashlib; n = len(blob); digest = hashlib.sha256(blob).hexdigest()"))
    assert load(worker, "n") == size
    assert load(worker, "digest") == hashlib.sha256(data).hexdigest()
    back = load(worker, "blob")
    assert len(back) == size
    assert back == data
    # And a value made in the worker, coming the other way first.
    ok(run(worker, f"made = bytes(range(256)) * ({size} // 256) + bytes({size} % 256)"))
    made = load(worker, "made")
    assert len(made) == size
    assert made[:512] == (bytes(range(256)) * 2)[: min(size, 512)]


def test_payload_256_mib_both_ways(worker: Worker) -> None:
    """seed defect 3: large store/load values deadlocked."""
    size = 256 * MIB
    data = bytes(range(256)) * (size // 256)
    store(worker, "big", data)
    ok(
        run(
            worker,
            f"n = len(big); head = big[:1000]; tail = big[-1000:]; mid = big[{size // 2}:][:64]",
        )
    )
    assert load(worker, "n") == size
    assert load(worker, "head") == data[:1000]
    assert load(worker, "tail") == data[-1000:]
    assert load(worker, "mid") == data[size // 2 :][:64]
    back = load(worker, "big")
    assert len(back) == size
    same = back == data
    assert same, "the 256 MiB value changed on its way back"


# --- crashes ----------------------------------------------------------------------------


CRASHES = [
    pytest.param(
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
        -signal.SIGKILL,
        "SIGKILL",
        id="SIGKILL",
        marks=posix_only,
    ),
    pytest.param("import ctypes; ctypes.string_at(0)", -signal.SIGSEGV, "SIGSEGV", id="SIGSEGV"),
    pytest.param("import os; os.abort()", -signal.SIGABRT, "SIGABRT", id="SIGABRT"),
    pytest.param("import os; os._exit(0)", 0, None, id="exit-0"),
    pytest.param("import os; os._exit(3)", 3, None, id="exit-3"),
    pytest.param("import os; os._exit(11)", 11, None, id="exit-11"),
]


@pytest.mark.parametrize(("source", "exitcode", "signame"), CRASHES)
def test_crash_mid_request(worker: Worker, source: str, exitcode: int, signame: str | None) -> None:
    """seed defects 6 and 7: exit code 0 went unnoticed; exit(11) passed for SIGSEGV."""
    worker.start()
    pid = worker.pid
    exc = crash_of(run(worker, source))
    assert exc.pid == pid
    assert exc.exitcode == exitcode
    assert exc.signal == signame
    what = f"signal {signame}" if signame else f"exit code {exitcode}"
    assert str(exc).startswith(f"worker crashed: {what} (pid {pid})")
    if signame is None:
        assert "SIG" not in str(exc).partition("\n")[0]
    assert is_gone(pid)
    # The next request gets a new worker.
    ok(run(worker, "x = 1"))
    assert worker.pid != pid
    assert worker.starts == 2


def test_exit_zero_mid_request_does_not_hang(worker: Worker) -> None:
    """seed defect 6: a child exiting with code 0 mid-request was never noticed."""
    worker.start()
    started = time.monotonic()
    exc = crash_of(run(worker, "import os; os._exit(0)", timeout=30))
    assert time.monotonic() - started < NOTICE_BOUND
    assert exc.exitcode == 0
    assert exc.signal is None


def test_exit_11_is_not_sigsegv(worker: Worker) -> None:
    """seed defect 7: abs(exit code) made exit(11) read as SIGSEGV."""
    exc = crash_of(run(worker, "import sys; sys.stdout.flush(); import os; os._exit(11)"))
    assert (exc.exitcode, exc.signal) == (11, None)
    assert "SIGSEGV" not in str(exc)
    assert "exit code 11" in str(exc)


def run_busy(worker: Worker, tmp_path: Path, act: Callable[[int], None]) -> Reply:
    """Run a request that sleeps for good, with ``act(pid)`` done from a thread once it is busy."""
    ready = tmp_path / "ready"
    worker.start()
    pid = worker.pid
    assert pid is not None

    def act_when_busy() -> None:
        if wait_for(ready.exists):
            act(pid)

    thread = threading.Thread(target=act_when_busy)
    thread.start()
    try:
        return run(worker, f"import time; open({str(ready)!r}, 'w').close(); time.sleep(300)")
    finally:
        thread.join()


@posix_only
def test_sigkill_noticed_at_once(worker: Worker, tmp_path: Path) -> None:
    """seed defect 5: death noticed through end-of-file, not a 1 s polling thread."""
    killed_at: list[float] = []

    def kill(pid: int) -> None:
        killed_at.append(time.monotonic())
        sigkill(pid)

    reply = run_busy(worker, tmp_path, kill)
    noticed = time.monotonic() - killed_at[0]
    exc = crash_of(reply)
    assert exc.signal == "SIGKILL"
    assert noticed < NOTICE_BOUND


def test_crash_stack_is_kept(worker: Worker) -> None:
    exc = crash_of(
        run(
            worker,
            """
            import ctypes

            def crash_in_helper():
                ctypes.string_at(0)

            crash_in_helper()
            """,
        )
    )
    assert exc.signal == "SIGSEGV"
    assert "Segmentation fault" in exc.stack
    assert "crash_in_helper" in exc.stack
    assert "crash_in_helper" in str(exc)
    assert "pytest_subproc" not in exc.stack  # the worker's own frames are dropped


def test_output_before_exit_is_kept(worker: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Output written just before os._exit reaches the reply, buffered or not."""
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    reply = run(
        worker,
        """
        import os, sys
        print("last words")
        sys.stderr.write("last error words")
        os._exit(3)
        """,
    )
    exc = crash_of(reply)
    assert reply.stdout == "last words\n"
    assert reply.stderr == "last error words"
    assert "last error words" in exc.output


@posix_only
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_does_not_hide_death(worker: Worker, tmp_path: Path) -> None:
    """A fork()ed child (multiprocessing's default on Linux) must not hold the reply pipe."""
    pidfile = tmp_path / "forked.pid"
    started = time.monotonic()
    reply = run(
        worker,
        f"""
        import os, time
        child = os.fork()
        if child == 0:
            time.sleep(300)
            os._exit(0)
        with open({str(pidfile)!r}, "w") as f:
            f.write(str(child))
        os._exit(3)
        """,
        timeout=10,
    )
    forked = int(pidfile.read_text())
    try:
        exc = crash_of(reply)
        assert exc.exitcode == 3
        assert time.monotonic() - started < 2.0
        assert wait_for(lambda: is_gone(forked))
    finally:
        sigkill(forked)


# --- who reaps the worker (seed defect 8) -----------------------------------------------


def killed_while_idle(worker: Worker) -> int:
    """Start the worker, SIGKILL it between requests, and return its pid once it is dead."""
    worker.start()
    pid = worker.pid
    assert pid is not None
    sigkill(pid)
    assert wait_for(lambda: not worker.alive)
    return pid


@posix_only
def test_exit_status_survives_until_read(worker: Worker) -> None:
    """seed defect 8: checking liveness must not lose the status of a worker that died idle."""
    pid = killed_while_idle(worker)
    assert not worker.alive  # asked twice: still there to be asked about
    ok(run(worker, "x = 1"))
    assert worker.idle_deaths == [f"worker died between tests: signal SIGKILL (pid {pid})"]


@posix_only
def test_idle_death_is_replaced_silently(worker: Worker) -> None:
    """A worker killed between requests is replaced; no crash is reported for it."""
    pid = killed_while_idle(worker)
    assert worker.pid == pid  # the pid of the dead worker until the next start
    reply = run(worker, "y = 2")
    assert reply.error is None
    assert worker.pid != pid
    assert worker.starts == 2
    assert load(worker, "y") == 2
    assert is_gone(pid)


def test_a_submitted_request_runs_while_its_reply_waits(worker: Worker, tmp_path: Path) -> None:
    """submit() sends and returns at once; reply() takes the reply, with its output."""
    flag = tmp_path / "ran"
    source = (
        f"import pathlib, time\ntime.sleep(0.5)\npathlib.Path({str(flag)!r}).touch()\nprint('out')"
    )
    worker.submit(Kind.RUN, (source, "<submitted>"))
    assert not flag.exists()  # pytest's side went on while the worker ran it
    reply = worker.reply()
    assert reply.error is None
    assert reply.stdout == "out\n"
    assert flag.exists()
    with pytest.raises(RuntimeError, match="no request"):
        worker.reply()


def test_a_reply_left_due_is_drained_not_mistaken(worker: Worker) -> None:
    """The next request (or drain) takes a submitted request's reply, dropped, out of its way."""
    worker.submit(Kind.RUN, ("x = 1", "<first>"))
    assert load(worker, "x") == 1  # its own reply, not the one left due
    worker.submit(Kind.RUN, ("x = 2", "<second>"))
    worker.drain()
    assert load(worker, "x") == 2


@posix_only
def test_a_submitted_request_goes_to_a_fresh_worker_if_the_last_died(worker: Worker) -> None:
    """As with request(): a worker dead before it read the request is replaced, and it reruns."""
    pid = killed_while_idle(worker)
    worker.submit(Kind.RUN, ("y = 3", "<after-death>"))
    assert worker.reply().error is None
    assert worker.pid != pid
    assert load(worker, "y") == 3


@posix_only
def test_the_worker_is_not_ours_to_reap(worker: Worker) -> None:
    """seed defect 8: whoever reaped first took the status; only the template reaps now."""
    worker.start()
    assert worker.pid is not None
    with pytest.raises(ChildProcessError):
        os.waitpid(worker.pid, os.WNOHANG)


class Interrupted(Exception):
    pass


@posix_only
def test_interrupted_request_does_not_shift_replies(worker: Worker) -> None:
    """An exception in the parent mid-request (Ctrl-C, a signal handler) retires the worker.

    Left alive, the worker's late reply would answer the next request.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    worker.start()
    pid = worker.pid
    assert pid is not None
    previous = signal.signal(signal.SIGUSR1, interrupt)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        timer.start()
        with pytest.raises(Interrupted):
            run(worker, "import time; time.sleep(0.6); late = 'the first reply'")
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGUSR1, previous)
    assert is_gone(pid)
    assert not worker.alive
    ok(run(worker, "y = 'the second reply'"))
    assert load(worker, "y") == "the second reply"
    assert worker.pid != pid


# --- timeouts -----------------------------------------------------------------------------


def test_timeout_reports_stack(worker: Worker) -> None:
    worker.start()
    pid = worker.pid
    started = time.monotonic()
    reply = run(
        worker,
        """
        import time

        def hang_in_helper():
            time.sleep(300)

        hang_in_helper()
        """,
        timeout=1,
    )
    elapsed = time.monotonic() - started
    exc = timeout_of(reply)
    assert isinstance(exc, TimeoutError)
    assert 1.0 <= elapsed < 1.0 + LATE_BOUND
    assert (exc.pid, exc.timeout) == (pid, 1)
    assert "hang_in_helper" in exc.stack
    assert "hang_in_helper" in str(exc)
    assert str(exc).startswith(f"worker timed out after 1 s (pid {pid})")
    assert pid is not None
    assert is_gone(pid)
    ok(run(worker, "x = 1"))
    assert worker.pid != pid


STUBBORN = """
    import faulthandler, itertools, signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def spin_forever():
        if {disarm}:
            # Spinning in C holds the GIL, so the worker's own watchdog cannot
            # dump either.
            faulthandler.cancel_dump_traceback_later()
            sum(itertools.repeat(1, 10**15))
        while True:
            pass

    spin_forever()
"""


@posix_only
@pytest.mark.parametrize("disarm", [False, True], ids=["dumps-stack", "faulthandler-disarmed"])
def test_timeout_kills_a_stubborn_child(worker: Worker, disarm: bool) -> None:
    """seed defect 9: a busy child ignoring SIGTERM and SIGINT survived the kill.

    A body that disarms faulthandler's timer and holds the GIL still has its
    stack dumped: faulthandler dumps on a signal the template sends.
    """
    worker.start()
    pid = worker.pid
    assert pid is not None
    started = time.monotonic()
    exc = timeout_of(run(worker, STUBBORN.format(disarm=disarm), timeout=0.5))
    assert time.monotonic() - started < 0.5 + LATE_BOUND
    assert is_gone(pid)
    assert "spin_forever" in exc.stack


GRANDCHILD = """
    import subprocess, sys
    grandchild = subprocess.Popen([sys.executable, "-c", {code!r}])
    gpid = grandchild.pid
"""


def spawn_grandchild(w: Worker, leave_group: bool) -> int:
    code = "import time; time.sleep(300)"
    if leave_group:
        code = "import os; os.setsid(); " + code
    ok(run(w, GRANDCHILD.format(code=code)))
    gpid: int = load(w, "gpid")
    if leave_group:
        assert wait_for(lambda: os.getpgid(gpid) == gpid), "the grandchild never left the group"
    return gpid


@posix_only
@pytest.mark.parametrize("leave_group", [False, True], ids=["in-group", "setsid"])
def test_timeout_kills_grandchildren(worker: Worker, leave_group: bool) -> None:
    """seed defect 9: grandchildren always survived; also one that left the process group."""
    gpid = spawn_grandchild(worker, leave_group)
    try:
        timeout_of(run(worker, "import time; time.sleep(300)", timeout=0.5))
        assert wait_for(lambda: is_gone(gpid))
    finally:
        sigkill(gpid)


@posix_only
@pytest.mark.parametrize("leave_group", [False, True], ids=["in-group", "setsid"])
def test_close_kills_grandchildren(leave_group: bool) -> None:
    w = Worker()
    gpid = None
    try:
        gpid = spawn_grandchild(w, leave_group)
        w.close()
        assert wait_for(lambda: is_gone(gpid))
    finally:
        w.close()
        if gpid is not None:
            sigkill(gpid)


# --- output ---------------------------------------------------------------------------------


def test_output_belongs_to_its_request(worker: Worker) -> None:
    """seed defect 15: output flushed after the reply landed in the next call."""
    first = run(
        worker,
        """
        import os, sys
        print("one")
        os.write(1, b"fd one\\n")
        sys.stderr.write("err one\\n")
        """,
    )
    second = run(worker, "print('two')")
    third = run(worker, "pass")
    assert (first.stdout, first.stderr) == ("one\nfd one\n", "err one\n")
    assert (second.stdout, second.stderr) == ("two\n", "")
    assert (third.stdout, third.stderr) == ("", "")


def test_buffered_output_is_flushed_before_the_reply(worker: Worker) -> None:
    """seed defect 15: a block-buffered stream is flushed into its own request's output."""
    first = run(
        worker,
        """
        import sys
        sys.stdout = open(1, "w", buffering=1 << 16, closefd=False)
        sys.stdout.write("held in a buffer")
        """,
    )
    second = run(worker, "print('next')")
    assert first.stdout == "held in a buffer"
    assert second.stdout == "next\n"


def test_no_banner_no_timer_lines_no_startup_file(
    worker: Worker, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """seed defect 15: `python -i` printed a banner and ran PYTHONSTARTUP; TIMER lines."""
    marker = tmp_path / "startup-ran"
    startup = tmp_path / "startup.py"
    startup.write_text(f"print('STARTUP FILE RAN')\nopen({str(marker)!r}, 'w').close()\n")
    monkeypatch.setenv("PYTHONSTARTUP", str(startup))
    for _ in range(3):
        reply = run(worker, "pass")
        assert (reply.stdout, reply.stderr) == ("", "")
    reply = run(worker, "print('only this')")
    assert (reply.stdout, reply.stderr) == ("only this\n", "")
    assert not marker.exists()


def test_twenty_megabytes_of_output(worker: Worker) -> None:
    size = 20_000_000
    reply = run(
        worker, f"import sys; sys.stdout.write('x' * {size}); print('done', file=sys.stderr)"
    )
    ok(reply)
    assert len(reply.stdout) == size
    same = reply.stdout == "x" * size
    assert same
    assert reply.stderr == "done\n"


def test_undecodable_output_is_replaced(worker: Worker) -> None:
    reply = run(worker, "import os; os.write(1, b'bad \\xff\\xfe bytes\\n'); os.write(2, b'\\x80')")
    assert reply.stdout == "bad \ufffd\ufffd bytes\n"
    assert reply.stderr == "\ufffd"


@pytest.mark.parametrize(
    "closer",
    [
        "import os, sys; sys.stdout.flush(); os.close(1); os.close(2)",
        "import sys; sys.stdout.close(); sys.stderr.close()",
    ],
    ids=["fds", "streams"],
)
def test_closing_stdio_does_not_break_the_next_request(worker: Worker, closer: str) -> None:
    ok(run(worker, closer))
    reply = run(
        worker,
        """
        import os, sys
        print("out again")
        print("err again", file=sys.stderr)
        os.write(1, b"fd again\\n")
        """,
    )
    ok(reply)
    assert reply.stdout == "out again\nfd again\n"
    assert reply.stderr == "err again\n"


# --- resources (seed defect 18) -----------------------------------------------------------


@posix_only
def test_close_leaves_no_process_and_no_fd() -> None:
    """seed defect 18: fds leaked until garbage collection."""
    fds_before = fd_count()
    children_before = my_children()
    w = Worker()
    try:
        ok(run(w, "x = 1"))
        pid = w.pid
        assert pid is not None
        assert fd_count() > fds_before
        assert pid in my_children()
    finally:
        w.close()
    assert fd_count() == fds_before
    assert my_children() == children_before
    assert not psutil.pid_exists(pid) or is_gone(pid)
    assert not w.alive
    w.close()  # twice is fine
    assert fd_count() == fds_before


def test_close_after_crash_and_unused_close() -> None:
    fds_before = fd_count()
    Worker().close()
    w = Worker()
    try:
        crash_of(run(w, "import os; os._exit(5)"))
    finally:
        w.close()
    assert fd_count() == fds_before


def test_no_files_left_in_the_temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """seed defect 18: no temp files, and no predictable path in a shared temp directory."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    w = Worker()
    try:
        ok(run(w, "print('captured')"))
        assert list(tmp.iterdir()) == []
    finally:
        w.close()
    assert list(tmp.iterdir()) == []


@posix_only
def test_two_thousand_requests_do_not_grow(worker: Worker) -> None:
    ok(run(worker, "pass"))
    pid = worker.pid
    fds = fd_count()
    children = my_children()
    worker_fds = psutil.Process(pid).num_fds()
    for _ in range(2000):
        reply = worker.request(Kind.RUN, ("pass", "<test-process-loop>"))
        if reply.error is not None:
            raise reply.error
    assert fd_count() == fds
    assert my_children() == children
    assert psutil.Process(pid).num_fds() == worker_fds
    assert (worker.pid, worker.starts) == (pid, 1)


# --- alive / pid / restart -----------------------------------------------------------------


def test_alive_pid_and_restart(worker: Worker) -> None:
    assert (worker.pid, worker.alive) == (None, False)
    worker.start()
    first = worker.pid
    assert worker.alive
    worker.restart()
    second = worker.pid
    assert second != first
    assert worker.alive
    assert first is not None
    assert is_gone(first)
    assert worker.starts == 2
    worker.close()
    assert not worker.alive
    assert worker.pid == second
    ok(run(worker, "x = 1"))  # a closed worker starts again on the next request
    assert worker.alive
    assert worker.pid not in (first, second)
    crash_of(run(worker, "import os; os._exit(4)"))
    assert not worker.alive
