"""The worker layer against its raw floor: latency, throughput, death notice, start time.

Everything is measured in one run on one machine, so the ratios hold even
where the absolute numbers do not. ``Worker`` and ``Subworker`` are used
directly; no pytest run is involved. POSIX only (``pass_fds``, ``os.readv``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from bench._common import Row, fmt_ratio, fmt_seconds, median, percentile, progress, table

MIB = 1 << 20
MESSAGE = 64

# The raw floor: a child that reads messages of a fixed size into a buffer and
# echoes each back, until end-of-file. Fds and the size come as arguments.
ECHO_CHILD = """\
import os, sys
size, rfd, wfd = (int(a) for a in sys.argv[1:4])
view = memoryview(bytearray(size))
os.write(wfd, b"r")
while True:
    got = 0
    while got < size:
        n = os.readv(rfd, [view[got:]])
        if n == 0:
            sys.exit(0)
        got += n
    sent = 0
    while sent < size:
        sent += os.write(wfd, view[sent:])
"""

_F_SETPIPE_SZ = 1031  # Linux: grow a pipe's buffer (up to 1 MiB unprivileged)


@dataclass(frozen=True)
class Plan:
    """How much to measure: the full run, or a quick check."""

    calls: int
    bulk_mib: int
    bulk_repeats: int
    kills: int
    starts: int

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(calls=500, bulk_mib=64, bulk_repeats=1, kills=5, starts=5)
        return cls(calls=2000, bulk_mib=256, bulk_repeats=3, kills=20, starts=10)


# --- the raw floor ------------------------------------------------------------


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _read_exact(fd: int, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise EOFError("the echo child closed its pipe")
        got += n


def _grow(fd: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    import fcntl

    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, MIB)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def echo_child(size: int, *, big_buffer: bool = False) -> Iterator[tuple[int, int]]:
    """Start an echo child for ``size``-byte messages; yield (fd to it, fd from it)."""
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    if big_buffer:
        _grow(to_child_w)
        _grow(from_child_w)
    child_ends = (to_child_r, from_child_w)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", ECHO_CHILD, str(size), *map(str, child_ends)],
            pass_fds=child_ends,
            stdin=subprocess.DEVNULL,
        )
    except BaseException:
        for fd in (to_child_w, from_child_r):
            os.close(fd)
        raise
    finally:
        for fd in child_ends:
            os.close(fd)
    try:
        _read_exact(from_child_r, memoryview(bytearray(1)))  # the child is ready
        yield to_child_w, from_child_r
    finally:
        os.close(to_child_w)  # end-of-file: the child exits
        os.close(from_child_r)
        proc.wait(10)


def raw_round_trips(calls: int) -> list[float]:
    message = memoryview(b"x" * MESSAGE)
    reply = memoryview(bytearray(MESSAGE))
    samples = []
    with echo_child(MESSAGE) as (out, inp):
        for i in range(calls + calls // 10):
            start = time.perf_counter()
            _write_all(out, message)
            _read_exact(inp, reply)
            if i >= calls // 10:  # the first tenth warms up
                samples.append(time.perf_counter() - start)
    return samples


def raw_bulk(payload: bytes, repeats: int, *, big_buffer: bool) -> list[float]:
    """Seconds to send ``payload`` to the echo child and read it all back.

    One untimed round first, as for the worker: both sides touch their buffers.
    """
    back = bytearray(len(payload))
    samples = []
    with echo_child(len(payload), big_buffer=big_buffer) as (out, inp):
        for i in range(repeats + 1):
            start = time.perf_counter()
            _write_all(out, memoryview(payload))
            _read_exact(inp, memoryview(back))
            if i:
                samples.append(time.perf_counter() - start)
    if back != payload:
        raise AssertionError("the echo child garbled the payload")
    return samples


def spawn_python(repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        samples.append(time.perf_counter() - start)
    return samples


# --- the worker ----------------------------------------------------------------


def worker_round_trips(calls: int) -> list[float]:
    from pytest_subproc._process import Worker
    from pytest_subproc._subworker import Subworker

    worker = Worker()
    try:
        sub = Subworker(worker)
        samples = []
        for i in range(calls + calls // 10):
            start = time.perf_counter()
            sub.run("pass")
            if i >= calls // 10:
                samples.append(time.perf_counter() - start)
        return samples
    finally:
        worker.close()


def worker_bulk(payload: bytes, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds for ``store`` and for ``load`` of ``payload``, per repeat, after an untimed one."""
    from pytest_subproc._process import Worker
    from pytest_subproc._subworker import Subworker

    worker = Worker()
    try:
        sub = Subworker(worker)
        sub.run("pass")  # started before the clock runs
        stores, loads = [], []
        for i in range(repeats + 1):
            start = time.perf_counter()
            sub.store("blob", payload)
            middle = time.perf_counter()
            back = sub.load("blob")
            if i:
                stores.append(middle - start)
                loads.append(time.perf_counter() - middle)
            if back != payload:
                raise AssertionError("store/load garbled the payload")
            del back
            sub.run("del blob")
        return stores, loads
    finally:
        worker.close()


def worker_death_notice(kills: int) -> list[float]:
    """Seconds from ``os.kill(SIGKILL)`` (another thread) to ``WorkerCrashed`` raised."""
    from pytest_subproc import WorkerCrashed
    from pytest_subproc._process import Worker
    from pytest_subproc._subworker import Subworker

    worker = Worker()
    try:
        sub = Subworker(worker)
        samples = []
        for _ in range(kills):
            sub.run("pass")  # a live worker, started before the clock runs
            pid = sub.pid
            assert pid is not None
            sent: list[float] = []

            def kill(pid: int = pid, sent: list[float] = sent) -> None:
                time.sleep(0.05)  # the sleep request is in flight by now
                sent.append(time.perf_counter())
                os.kill(pid, signal.SIGKILL)

            killer = threading.Thread(target=kill)
            killer.start()
            try:
                sub.run("import time; time.sleep(30)")
            except WorkerCrashed as exc:
                raised = time.perf_counter()
                if exc.signal != "SIGKILL":
                    raise AssertionError(f"expected SIGKILL, got {exc}") from exc
            else:
                raise AssertionError("the worker survived SIGKILL")
            finally:
                killer.join()
            samples.append(raised - sent[0])
        return samples
    finally:
        worker.close()


def worker_starts(repeats: int) -> list[float]:
    from pytest_subproc._process import Worker

    samples = []
    for _ in range(repeats):
        worker = Worker()
        try:
            start = time.perf_counter()
            worker.start()
            samples.append(time.perf_counter() - start)
        finally:
            worker.close()
    return samples


# --- the report ------------------------------------------------------------------


def _mib_s(mib: float, seconds: float) -> str:
    return f"{mib / seconds:.0f} MiB/s"


def _ratio_row(
    what: str, ours: str, floor: str, ratio: float | None, target: str, met: bool | None
) -> Row:
    return Row((what, ours, floor, "" if ratio is None else fmt_ratio(ratio), target), met)


def _round_trip_rows(plan: Plan) -> list[Row]:
    progress(f"round trips: {plan.calls} x run('pass') and {plan.calls} raw 64-byte echoes")
    ours = worker_round_trips(plan.calls)
    raw = raw_round_trips(plan.calls)
    p99_ours, p99_raw = percentile(ours, 99), percentile(raw, 99)
    ratio = median(ours) / median(raw)
    return [
        _ratio_row(
            "run('pass') round trip, median",
            fmt_seconds(median(ours)),
            fmt_seconds(median(raw)),
            ratio,
            "<= 3x",
            ratio <= 3,
        ),
        _ratio_row(
            "run('pass') round trip, p99",
            fmt_seconds(p99_ours),
            fmt_seconds(p99_raw),
            p99_ours / p99_raw,
            "",
            None,
        ),
    ]


def _throughput_rows(plan: Plan) -> list[Row]:
    mib = plan.bulk_mib
    progress(f"throughput: {mib} MiB store+load, x{plan.bulk_repeats}, and raw pipes")
    payload = bytes(range(256)) * (mib * MIB // 256)
    stores, loads = worker_bulk(payload, plan.bulk_repeats)
    raw_small = raw_bulk(payload, plan.bulk_repeats, big_buffer=False)
    raw_big = raw_bulk(payload, plan.bulk_repeats, big_buffer=True)
    del payload
    both = median([s + ld for s, ld in zip(stores, loads)])
    rows = []
    for label, floor in (("64 KiB pipe buffer", raw_small), ("1 MiB pipe buffer", raw_big)):
        ratio = median(floor) / both
        rows.append(
            _ratio_row(
                f"{mib} MiB store+load vs raw echo, {label}",
                _mib_s(2 * mib, both),
                _mib_s(2 * mib, median(floor)),
                ratio,
                ">= 0.50x",
                ratio >= 0.5,
            )
        )
    for label, samples in ((f"store ({mib} MiB in)", stores), (f"load ({mib} MiB out)", loads)):
        rows.append(
            _ratio_row(f"  of which {label}", _mib_s(mib, median(samples)), "", None, "", None)
        )
    return rows


def _death_rows(plan: Plan) -> list[Row]:
    progress(f"death notice: {plan.kills} x SIGKILL during run(sleep)")
    deaths = worker_death_notice(plan.kills)
    return [
        _ratio_row(
            "SIGKILL to WorkerCrashed, median",
            fmt_seconds(median(deaths)),
            "",
            None,
            "< 10 ms",
            median(deaths) < 0.010,
        ),
        _ratio_row("SIGKILL to WorkerCrashed, max", fmt_seconds(max(deaths)), "", None, "", None),
    ]


def _start_rows(plan: Plan) -> list[Row]:
    progress(f"start: {plan.starts} x Worker().start() and python -c pass")
    starts = worker_starts(plan.starts)
    spawns = spawn_python(plan.starts)
    return [
        _ratio_row(
            "Worker().start() vs python -c pass, median",
            fmt_seconds(median(starts)),
            fmt_seconds(median(spawns)),
            median(starts) / median(spawns),
            "< 150 ms",
            median(starts) < 0.150,
        )
    ]


PARTS = (
    ("round trip", _round_trip_rows),
    ("throughput", _throughput_rows),
    ("death notice", _death_rows),
    ("start", _start_rows),
)


def run(quick: bool) -> str:
    """Measure the worker layer and return the report; a part that breaks is reported."""
    plan = Plan.make(quick)
    rows: list[Row] = []
    for name, part in PARTS:
        try:
            rows += part(plan)
        except Exception as exc:
            rows.append(Row((name, f"failed: {type(exc).__name__}: {exc}")))
    head = (
        f"Worker layer ({plan.calls} round trips, {plan.bulk_mib} MiB x{plan.bulk_repeats} "
        f"bulk after a warm-up, {plan.kills} kills, {plan.starts} starts)"
    )
    headers = ("measure", "pytest_subproc", "raw floor", "ratio (ours / floor)", "target")
    return f"{head}\n{table(headers, rows)}"
