"""Unit tests for the message framing in ``pytest_subproc._wire``.

Every test works over real pipes from ``make_pipe()``; a writer and a reader
run in separate threads wherever a message is larger than the pipe buffer.
The numbered defects are the framing defects of the seed (see its notes):
1 one read per message, 2 partial writes ignored, 3 large transfers deadlock
and writes have no timeout, 4 end-of-file reported as a corrupt check.
"""

from __future__ import annotations

import array
import io
import os
import resource
import select
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from pytest_subproc import _wire
from pytest_subproc._wire import (
    HEADER,
    WireClosed,
    WireCorrupt,
    WireError,
    WireTimeout,
    WireTruncated,
    decode_header,
    encode_header,
    make_pipe,
    read_exact,
    recv,
    send,
    write_all,
)

KIB = 1 << 10
MIB = 1 << 20
# Where the header fields sit (magic 0-1, kind 2, pad 3, check 4-7, length 8-15).
KIND_OFFSET = 2
PAD_OFFSET = 3
CHECK_SLICE = slice(4, 8)
LENGTH_SLICE = slice(8, 16)
# Loose bounds: timings on shared CI machines are noisy.
JOIN_TIMEOUT = 30.0
DEADLINE_SLACK = 0.75


# --- helpers


def pattern(size: int, seed: int = 0) -> bytearray:
    """Return ``size`` bytes that are never zero and whose period (251, a prime)
    does not divide the 64 KiB or 1 MiB boundaries, so a dropped, repeated or
    reordered chunk shows up as a mismatch. Built in place: no spare copy."""
    unit = bytes((seed + i) % 251 + 1 for i in range(251))
    out = bytearray(unit) * (size // len(unit))
    out += unit[: size % len(unit)]
    return out


def first_difference(got: Any, expected: Any) -> int | None:
    """Offset of the first differing byte (or the shorter length), None if equal.

    Used instead of ``assert got == expected`` on big buffers so that a failure
    reports an offset rather than a multi-megabyte diff."""
    if not isinstance(got, bytearray):
        got = bytearray(got)
    if got == expected:  # one memcmp
        return None
    va, vb = memoryview(got), memoryview(expected).cast("B")
    step = 64 * KIB
    for start in range(0, min(len(va), len(vb)), step):
        if va[start : start + step] != vb[start : start + step]:
            for i in range(start, min(start + step, len(va), len(vb))):
                if va[i] != vb[i]:
                    return i
    return min(len(va), len(vb))


class Pipe:
    """Both ends of a ``make_pipe()`` pipe; each end is closed exactly once."""

    def __init__(self) -> None:
        self.r, self.w = make_pipe()
        self._open = {self.r, self.w}

    def close_r(self) -> None:
        self._close(self.r)

    def close_w(self) -> None:
        self._close(self.w)

    def _close(self, fd: int) -> None:
        if fd in self._open:
            self._open.discard(fd)
            os.close(fd)

    def close(self) -> None:
        # The write end first: a thread blocked reading sees end-of-file, one
        # blocked writing sees a broken pipe once the read end goes too.
        self.close_w()
        self.close_r()


class Worker:
    """Run ``target(*args)`` in a daemon thread; ``join()`` returns its result or
    re-raises its exception in the test's thread."""

    def __init__(self, target: Callable[..., Any], *args: Any) -> None:
        self._target = target
        self._args = args
        self.result: Any = None
        self.error: BaseException | None = None
        self.started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.started.wait(JOIN_TIMEOUT)

    def _run(self) -> None:
        self.started.set()
        try:
            self.result = self._target(*self._args)
        except BaseException as exc:
            self.error = exc

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float = JOIN_TIMEOUT) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "worker thread did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def _open_fds() -> set[str] | None:
    for d in ("/proc/self/fd", "/dev/fd"):
        if os.path.isdir(d):
            return set(os.listdir(d))
    return None  # pragma: no cover


@pytest.fixture(autouse=True)
def _no_fd_leak() -> Any:
    before = _open_fds()
    yield
    after = _open_fds()
    if before is not None and after is not None:
        assert after <= before, f"file descriptors leaked: {sorted(after - before)}"


@pytest.fixture
def pipe() -> Any:
    p = Pipe()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def pipe2() -> Any:
    """A second pipe, for the opposite direction."""
    p = Pipe()
    try:
        yield p
    finally:
        p.close()


def send_all(fd: int, messages: list[tuple[int, bytes]], close: Callable[[], None]) -> None:
    try:
        for kind, payload in messages:
            send(fd, kind, payload)
    finally:
        close()


def recv_until_closed(fd: int) -> list[tuple[int, bytearray]]:
    got = []
    while True:
        try:
            got.append(recv(fd))
        except WireTruncated:
            raise
        except WireClosed:
            return got


def deadline_in(seconds: float) -> float:
    return time.monotonic() + seconds


# --- header


def test_header_size_is_16() -> None:
    assert HEADER.size == 16
    assert len(encode_header(0, 0)) == 16
    assert len(encode_header(255, 2**64 - 1)) == 16


def test_header_layout() -> None:
    header = encode_header(7, 0x0102030405060708)
    assert header[:2] == _wire.MAGIC
    assert header[KIND_OFFSET] == 7
    assert header[PAD_OFFSET] == 0
    assert header[LENGTH_SLICE] == (0x0102030405060708).to_bytes(8, "little")


@pytest.mark.parametrize("length", [0, 1, 65535, 65536, 65537, MIB, 2**32, 2**64 - 1])
def test_header_round_trip(length: int) -> None:
    assert decode_header(encode_header(42, length)) == (42, length)


def test_decode_header_accepts_any_buffer() -> None:
    header = encode_header(3, 99)
    for buf in (header, bytearray(header), memoryview(header)):
        assert decode_header(buf) == (3, 99)


def test_kind_round_trips_0_to_255(pipe: Pipe) -> None:
    for kind in range(256):
        assert decode_header(encode_header(kind, kind)) == (kind, kind)
    # All 256 small messages fit in the pipe buffer: no second thread needed.
    for kind in range(256):
        send(pipe.w, kind, bytes([kind]))
    for kind in range(256):
        assert recv(pipe.r) == (kind, bytearray([kind]))


@pytest.mark.parametrize("kind", [-1, 256, 1000])
def test_kind_out_of_range_is_rejected(kind: int) -> None:
    # A kind that does not fit the byte must not wrap around silently.
    with pytest.raises((struct.error, ValueError, OverflowError)):
        encode_header(kind, 0)


# --- corrupt headers


def test_bad_magic_is_corrupt() -> None:
    header = bytearray(encode_header(1, 10))
    header[0] ^= 0xFF
    with pytest.raises(WireCorrupt):
        decode_header(header)
    header = bytearray(encode_header(1, 10))
    header[1] ^= 0x01
    with pytest.raises(WireCorrupt):
        decode_header(header)


def test_bad_check_value_is_corrupt() -> None:
    header = bytearray(encode_header(1, 10))
    for i in range(CHECK_SLICE.start, CHECK_SLICE.stop):
        bad = bytearray(header)
        bad[i] ^= 0x10
        with pytest.raises(WireCorrupt):
            decode_header(bad)


@pytest.mark.parametrize("index", range(LENGTH_SLICE.start, LENGTH_SLICE.stop))
def test_flipped_length_byte_is_corrupt(index: int) -> None:
    header = bytearray(encode_header(5, 70000))
    header[index] ^= 0x01
    with pytest.raises(WireCorrupt):
        decode_header(header)


def test_check_value_covers_kind() -> None:
    header = bytearray(encode_header(5, 70000))
    header[KIND_OFFSET] ^= 0x01
    with pytest.raises(WireCorrupt):
        decode_header(header)


def test_check_value_depends_on_kind_and_length() -> None:
    checks = {encode_header(k, n)[CHECK_SLICE] for k in range(4) for n in (0, 1, 65536, 2**40)}
    assert len(checks) == 16


def test_every_single_bit_flip_outside_the_pad_byte_is_corrupt() -> None:
    header = encode_header(0x5A, 123456789)
    for index in range(HEADER.size):
        if index == PAD_OFFSET:  # not covered by the check value, by design
            continue
        for bit in range(8):
            bad = bytearray(header)
            bad[index] ^= 1 << bit
            with pytest.raises(WireCorrupt):
                decode_header(bad)


def test_corrupt_header_in_stream_raises_without_reading_the_payload(pipe: Pipe) -> None:
    # The length becomes enormous; recv must fail on the header, not try to
    # allocate or wait for 2**56 bytes.
    header = bytearray(encode_header(1, 4))
    header[LENGTH_SLICE.stop - 1] ^= 0x01
    write_all(pipe.w, bytes(header) + b"data")
    with pytest.raises(WireCorrupt):
        recv(pipe.r)


def test_corrupt_is_not_closed() -> None:
    assert not issubclass(WireCorrupt, WireClosed)
    assert issubclass(WireCorrupt, WireError)


# --- round trips


SIZES = [0, 1, 64 * KIB - 1, 64 * KIB, 64 * KIB + 1, MIB]


def echo_once(src: int, dst: int) -> None:
    kind, payload = recv(src)
    send(dst, kind, payload)


@pytest.mark.parametrize("size", SIZES, ids=lambda n: f"{n}B")
def test_round_trip_both_directions(size: int, pipe: Pipe, pipe2: Pipe) -> None:
    """Out over one pipe to an echoing thread, back over another (defect 1)."""
    payload = pattern(size, seed=size)
    echo = Worker(echo_once, pipe.r, pipe2.w)
    send(pipe.w, 9, payload)
    kind, back = recv(pipe2.r)
    echo.join()
    assert kind == 9
    assert type(back) is bytearray
    assert len(back) == size
    assert first_difference(back, payload) is None


@pytest.mark.parametrize("size", [10, 200 * KIB])
@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_payload_buffer_types(size: int, wrap: Callable[[bytes], Any], pipe: Pipe) -> None:
    payload = pattern(size)
    writer = Worker(send, pipe.w, 1, wrap(payload))
    kind, got = recv(pipe.r)
    writer.join()
    assert kind == 1
    assert first_difference(got, payload) is None


@pytest.mark.parametrize("count", [3, 50_000])
def test_payload_with_wide_items_is_sent_as_raw_bytes(count: int, pipe: Pipe) -> None:
    data = array.array("I", range(count))
    writer = Worker(send, pipe.w, 2, memoryview(data))
    kind, got = recv(pipe.r)
    writer.join()
    assert (kind, len(got)) == (2, count * data.itemsize)
    assert first_difference(got, data.tobytes()) is None


def test_write_all_and_read_exact_round_trip(pipe: Pipe) -> None:
    payload = pattern(3 * MIB + 7)
    writer = Worker(write_all, pipe.w, payload)
    got = read_exact(pipe.r, len(payload))
    writer.join()
    assert first_difference(got, payload) is None
    assert read_exact(pipe.r, 0) == bytearray()


def test_many_messages_back_to_back_stay_in_sync(pipe: Pipe) -> None:
    """Sizes straddle the 64 KiB pipe buffer and the 1 MiB chunk (defect 1)."""
    sizes = [0, 1, 64 * KIB + 1, 3, 0, 64 * KIB, 200 * KIB, 64 * KIB - 1, 2, MIB + 5, 0, 17]
    sizes = sizes * 4
    messages = [(i % 256, pattern(n, seed=i)) for i, n in enumerate(sizes)]
    writer = Worker(send_all, pipe.w, messages, pipe.close_w)
    got = recv_until_closed(pipe.r)
    writer.join()
    assert len(got) == len(messages)
    for i, ((kind, payload), (got_kind, got_payload)) in enumerate(zip(messages, got)):
        assert got_kind == kind, f"message {i}"
        assert first_difference(got_payload, payload) is None, f"message {i}"


def test_many_small_messages_in_one_buffer(pipe: Pipe) -> None:
    """Several messages arriving in one read are split correctly."""
    stream = b"".join(encode_header(i, i) + pattern(i, seed=i) for i in range(100))
    writer = Worker(write_all, pipe.w, stream)
    for i in range(100):
        assert recv(pipe.r) == (i, bytearray(pattern(i, seed=i)))
    writer.join()


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover
        return None


@pytest.mark.timeout(120)
def test_big_round_trip_256_mib(pipe: Pipe) -> None:
    """BIG: one 256 MiB message (about 512 MiB of memory: payload and copy received)."""
    size = 256 * MIB
    available = _available_memory()
    if available is not None and available < 3 * size:
        pytest.skip("not enough free memory for a 256 MiB round trip")
    payload = pattern(size, seed=11)
    writer = Worker(send, pipe.w, 200, payload)
    kind, got = recv(pipe.r)
    writer.join()
    assert kind == 200
    assert len(got) == size
    # Spot checks first (they pinpoint a chunking error), then all of it.
    for offset in (0, 64 * KIB - 1, MIB - 3, MIB, size // 2 + 1, size - 251):
        assert got[offset : offset + 251] == payload[offset : offset + 251], offset
    assert first_difference(got, payload) is None
    del got, payload


# --- partial writes (defect 2)


def _set_nonblocking(*fds: int) -> None:
    for fd in fds:
        os.set_blocking(fd, False)


def test_nonblocking_writer_with_slow_reader(pipe: Pipe, monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-blocking write end fills up; partial writes and EAGAIN must loop."""
    _set_nonblocking(pipe.w)
    real_write = os.write
    short_writes = []
    would_block = []

    def spy_write(fd: int, data: Any) -> int:
        try:
            n = real_write(fd, data)
        except BlockingIOError:
            would_block.append(fd)
            raise
        if n < len(data):
            short_writes.append((n, len(data)))
        return n

    monkeypatch.setattr(_wire, "_write", spy_write)
    messages = [(i, pattern(n, seed=i)) for i, n in enumerate([3 * MIB + 1, 5, 2 * MIB, 0, 70000])]
    writer = Worker(send_all, pipe.w, messages, pipe.close_w)
    time.sleep(0.1)  # let the writer fill the pipe before anyone reads

    got = []
    while True:
        try:
            got.append(recv(pipe.r))
        except WireClosed:
            break
        time.sleep(0.01)
    writer.join()
    assert [k for k, _ in got] == [k for k, _ in messages]
    for (_, payload), (_, got_payload) in zip(messages, got):
        assert first_difference(got_payload, payload) is None
    assert would_block, "the pipe never filled up: the test did not exercise EAGAIN"
    assert short_writes, "no partial write happened: the test did not exercise them"


@pytest.mark.parametrize("max_bytes", [1, 3, 7])
def test_os_write_moving_a_few_bytes_per_call(
    max_bytes: int, pipe: Pipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    calls = []

    def stingy_write(fd: int, data: Any) -> int:
        calls.append(len(data))
        return real_write(fd, memoryview(data)[:max_bytes])

    monkeypatch.setattr(_wire, "_write", stingy_write)
    messages = [(i, pattern(n, seed=i)) for i, n in enumerate([0, 1, 2, 15, 16, 100, 5000])]
    if max_bytes > 1:
        messages.append((99, pattern(64 * KIB + 3)))  # the header-and-payload-apart path
    writer = Worker(send_all, pipe.w, messages, pipe.close_w)
    got = recv_until_closed(pipe.r)
    writer.join()
    monkeypatch.undo()
    assert got == [(k, bytearray(p)) for k, p in messages]
    total = sum(HEADER.size + len(p) for _, p in messages)
    assert len(calls) >= total // max_bytes


def test_os_write_alternating_eagain_and_short_writes(
    pipe: Pipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every other write "would block"; the rest move at most 5 bytes."""
    _set_nonblocking(pipe.w)
    real_write = os.write
    state = {"calls": 0}

    def flaky_write(fd: int, data: Any) -> int:
        state["calls"] += 1
        if state["calls"] % 2:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real_write(fd, memoryview(data)[:5])

    monkeypatch.setattr(_wire, "_write", flaky_write)
    messages = [(i, pattern(n, seed=i)) for i, n in enumerate([0, 4, 40, 400, 4000])]
    writer = Worker(send_all, pipe.w, messages, pipe.close_w)
    got = recv_until_closed(pipe.r)
    writer.join()
    assert got == [(k, bytearray(p)) for k, p in messages]


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill")
def test_writes_interrupted_by_signals_keep_the_stream_in_sync(pipe: Pipe) -> None:
    """Signals hit the writing thread while it is blocked on a full pipe: an
    interrupted write returns a short count (on Linux, a couple of times per
    run here), which must be continued, not dropped."""
    fired = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: fired.append(signum))
    main = threading.get_ident()  # Python runs handlers here; aim the signals at it
    stop = threading.Event()

    def pester() -> None:
        while not stop.wait(0.001):
            signal.pthread_kill(main, signal.SIGUSR1)

    messages = [(i, pattern(n, seed=i)) for i, n in enumerate([4 * MIB, 1, 3 * MIB + 3, 0, 99])]

    def slow_reader() -> list[tuple[int, bytearray]]:
        got = []
        for _ in messages:
            time.sleep(0.02)
            got.append(recv(pipe.r))
        return got

    reader = Worker(slow_reader)
    pesterer = Worker(pester)
    try:
        for kind, payload in messages:
            send(pipe.w, kind, payload)
    finally:
        stop.set()
        pesterer.join()
        signal.signal(signal.SIGUSR1, previous)
    got = reader.join()
    assert fired, "no signal arrived"
    assert [k for k, _ in got] == [k for k, _ in messages]
    for (_, payload), (_, got_payload) in zip(messages, got):
        assert first_difference(got_payload, payload) is None


# --- large messages and deadlines (defect 3)


def test_large_message_before_the_reader_starts_does_not_deadlock(pipe: Pipe) -> None:
    payload = pattern(8 * MIB, seed=3)
    writer = Worker(send, pipe.w, 4, payload)
    time.sleep(0.2)
    # 8 MiB cannot fit in any pipe buffer: the writer waits for a reader...
    assert writer.is_alive()
    # ...and finishes once one turns up.
    kind, got = recv(pipe.r)
    writer.join()
    assert kind == 4
    assert first_difference(got, payload) is None


def test_large_messages_crossing_in_both_directions(pipe: Pipe, pipe2: Pipe) -> None:
    """Each side sends a large message from its own thread while reading the
    other direction: neither blocks the other."""
    a, b = pattern(5 * MIB, seed=1), pattern(6 * MIB, seed=2)
    send_a = Worker(send, pipe.w, 1, a)
    send_b = Worker(send, pipe2.w, 2, b)
    recv_b = Worker(recv, pipe2.r)
    kind_a, got_a = recv(pipe.r)
    kind_b, got_b = recv_b.join()
    send_a.join()
    send_b.join()
    assert (kind_a, kind_b) == (1, 2)
    assert first_difference(got_a, a) is None
    assert first_difference(got_b, b) is None


def test_write_all_deadline_raises_timeout_when_nobody_reads(pipe: Pipe) -> None:
    _set_nonblocking(pipe.w)
    start = time.monotonic()
    with pytest.raises(WireTimeout):
        write_all(pipe.w, pattern(4 * MIB), deadline=start + 0.2)
    elapsed = time.monotonic() - start
    assert 0.15 <= elapsed < 0.2 + DEADLINE_SLACK


def test_send_deadline_raises_timeout_when_nobody_reads(pipe: Pipe) -> None:
    _set_nonblocking(pipe.w)
    start = time.monotonic()
    with pytest.raises(WireTimeout):
        send(pipe.w, 1, pattern(4 * MIB), deadline=start + 0.2)
    assert time.monotonic() - start < 0.2 + DEADLINE_SLACK


def test_recv_deadline_raises_timeout_when_nothing_arrives(pipe: Pipe) -> None:
    _set_nonblocking(pipe.r)
    start = time.monotonic()
    with pytest.raises(WireTimeout):
        recv(pipe.r, deadline=start + 0.2)
    elapsed = time.monotonic() - start
    assert 0.15 <= elapsed < 0.2 + DEADLINE_SLACK


def test_recv_deadline_in_the_middle_of_a_message(pipe: Pipe) -> None:
    """Half a message and then silence is a timeout, not end-of-file."""
    _set_nonblocking(pipe.r)
    write_all(pipe.w, encode_header(1, 100) + b"x" * 40)
    start = time.monotonic()
    with pytest.raises(WireTimeout) as info:
        recv(pipe.r, deadline=start + 0.2)
    assert not isinstance(info.value, WireClosed)
    assert time.monotonic() - start < 0.2 + DEADLINE_SLACK


def test_recv_deadline_covers_the_whole_message(pipe: Pipe) -> None:
    """A peer trickling a byte at a time does not extend the deadline."""
    _set_nonblocking(pipe.r)
    stop = threading.Event()
    stream = encode_header(1, 1000) + pattern(1000)

    def trickle() -> None:
        for i in range(len(stream)):
            if stop.wait(0.02):
                return
            os.write(pipe.w, stream[i : i + 1])

    writer = Worker(trickle)
    start = time.monotonic()
    try:
        with pytest.raises(WireTimeout):
            recv(pipe.r, deadline=start + 0.3)
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        writer.join()
    assert 0.25 <= elapsed < 0.3 + DEADLINE_SLACK


def test_recv_past_deadline_with_nothing_to_read_fails_at_once(pipe: Pipe) -> None:
    _set_nonblocking(pipe.r)
    start = time.monotonic()
    with pytest.raises(WireTimeout):
        recv(pipe.r, deadline=start - 1)
    assert time.monotonic() - start < 0.1


def test_recv_with_deadline_succeeds_when_data_arrives_in_time(pipe: Pipe) -> None:
    _set_nonblocking(pipe.r)
    payload = pattern(3 * MIB)

    def late_send() -> None:
        time.sleep(0.05)
        send(pipe.w, 8, payload)

    writer = Worker(late_send)
    kind, got = recv(pipe.r, deadline=deadline_in(JOIN_TIMEOUT))
    writer.join()
    assert kind == 8
    assert first_difference(got, payload) is None


def _free_fd_at_least(low: int) -> int | None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for fd in range(low, min(soft, low + 1000)):
        try:
            os.fstat(fd)
        except OSError:
            return fd
    return None


def test_deadlines_work_on_fds_above_fd_setsize(pipe: Pipe) -> None:
    """select() cannot wait on fds >= 1024; a busy parent process has those."""
    high = _free_fd_at_least(1100)
    if high is None:
        pytest.skip("RLIMIT_NOFILE too low for fds above FD_SETSIZE")
    r = os.dup2(pipe.r, high, inheritable=False)
    try:
        _set_nonblocking(r)
        with pytest.raises(WireTimeout):
            recv(r, deadline=deadline_in(0.05))
        send(pipe.w, 3, b"abc")
        assert recv(r, deadline=deadline_in(JOIN_TIMEOUT)) == (3, bytearray(b"abc"))
    finally:
        os.close(r)


# --- end of file (defect 4)


def test_await_readable_returns_at_once_for_data_or_end_of_file(pipe: Pipe) -> None:
    os.write(pipe.w, b"x")
    started = time.monotonic()
    _wire.await_readable(pipe.r, 30.0)
    assert os.read(pipe.r, 1) == b"x"
    pipe.close_w()
    _wire.await_readable(pipe.r, 30.0)
    assert time.monotonic() - started < JOIN_TIMEOUT / 2
    assert os.read(pipe.r, 1) == b""


class FakeClock:
    """A clock that moves ``step`` seconds each time it is read."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step
        self.reads = 0

    def __call__(self) -> float:
        self.now += self.step
        self.reads += 1
        return self.now


@pytest.mark.parametrize(
    ("step", "reads"),
    [
        # Polls a microsecond apart: the CPU is ours, so it spins all its time.
        pytest.param(1e-6, range(49_000, 51_000), id="spins-while-the-cpu-is-ours"),
        # A millisecond between polls: another process ran meanwhile. Spinning
        # on would take turns from it, so the first such gap ends the spin.
        pytest.param(1e-3, range(2, 3), id="sleeps-once-the-cpu-proves-shared"),
    ],
)
def test_await_readable_gives_up_in_time(
    pipe: Pipe, monkeypatch: pytest.MonkeyPatch, step: float, reads: range
) -> None:
    clock = FakeClock(step)
    monkeypatch.setattr(_wire, "_clock", clock)
    monkeypatch.setattr(_wire, "crowded", lambda: False)  # whatever else this machine runs
    _wire.await_readable(pipe.r, 0.05)
    assert clock.reads in reads


def test_await_readable_sleeps_at_once_on_a_crowded_machine(
    pipe: Pipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock(1e-6)
    monkeypatch.setattr(_wire, "_clock", clock)
    monkeypatch.setattr(_wire, "crowded", lambda: True)
    _wire.await_readable(pipe.r, 30.0)
    assert clock.reads == 0


@pytest.mark.parametrize(
    ("loadavg", "crowded"),
    [
        ("0.50 0.40 0.30 2/180 4242\n", False),  # as many running as CPUs
        ("3.10 2.80 2.00 3/180 4242\n", True),
        ("garbage\n", False),
        (None, False),  # no /proc: never crowded
    ],
)
def test_crowding_counts_runnable_processes_against_cpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loadavg: Optional[str], crowded: bool
) -> None:
    path = tmp_path / "loadavg"
    if loadavg is not None:
        path.write_text(loadavg)
    monkeypatch.setattr(_wire, "_LOADAVG", str(path))
    monkeypatch.setattr(_wire, "_cpus", lambda: 2)
    clock = FakeClock(1e-3)  # a millisecond between two looks
    monkeypatch.setattr(_wire, "_clock", clock)
    crowding = _wire._Crowding()
    assert crowding() is crowded
    path.write_text("0.1 0.1 0.1 9/180 4242\n")
    assert crowding() is crowded  # counted again only every 10 ms
    clock.now += 1.0
    assert crowding() is True


def test_truncated_is_closed_but_not_corrupt() -> None:
    assert issubclass(WireTruncated, WireClosed)
    assert not issubclass(WireTruncated, WireCorrupt)
    assert issubclass(WireClosed, WireError)
    assert issubclass(WireTimeout, WireError)
    assert not issubclass(WireTimeout, WireClosed)


def test_eof_before_any_message_is_closed_not_truncated(pipe: Pipe) -> None:
    pipe.close_w()
    with pytest.raises(WireClosed) as info:
        recv(pipe.r)
    assert not isinstance(info.value, WireTruncated)


def test_eof_between_messages_is_closed_not_truncated(pipe: Pipe) -> None:
    send(pipe.w, 1, b"one")
    send(pipe.w, 2, b"")
    pipe.close_w()
    assert recv(pipe.r) == (1, bytearray(b"one"))
    assert recv(pipe.r) == (2, bytearray())
    with pytest.raises(WireClosed) as info:
        recv(pipe.r)
    assert not isinstance(info.value, WireTruncated)
    # End of file stays end of file.
    with pytest.raises(WireClosed) as info:
        recv(pipe.r)
    assert not isinstance(info.value, WireTruncated)


@pytest.mark.parametrize("cut", [1, 2, 8, 15])
def test_eof_inside_a_header_is_truncated(cut: int, pipe: Pipe) -> None:
    write_all(pipe.w, encode_header(1, 10)[:cut])
    pipe.close_w()
    with pytest.raises(WireTruncated):
        recv(pipe.r)


def test_eof_right_after_a_header_is_truncated(pipe: Pipe) -> None:
    write_all(pipe.w, encode_header(1, 10))
    pipe.close_w()
    with pytest.raises(WireTruncated):
        recv(pipe.r)


@pytest.mark.parametrize(("length", "sent"), [(10, 9), (10, 1), (3 * MIB, 2 * MIB + 5)])
def test_eof_inside_a_payload_is_truncated(length: int, sent: int, pipe: Pipe) -> None:
    def write_part() -> None:
        try:
            write_all(pipe.w, encode_header(1, length) + pattern(sent))
        finally:
            pipe.close_w()

    writer = Worker(write_part)
    with pytest.raises(WireTruncated):
        recv(pipe.r)
    writer.join()


def test_eof_inside_a_payload_after_a_good_message(pipe: Pipe) -> None:
    send(pipe.w, 1, b"complete")
    write_all(pipe.w, encode_header(2, 50) + b"partial")
    pipe.close_w()
    assert recv(pipe.r) == (1, bytearray(b"complete"))
    with pytest.raises(WireTruncated):
        recv(pipe.r)


def test_read_exact_eof(pipe: Pipe) -> None:
    write_all(pipe.w, b"abc")
    pipe.close_w()
    with pytest.raises(WireTruncated):
        read_exact(pipe.r, 4)
    with pytest.raises(WireClosed) as info:
        read_exact(pipe.r, 4)
    assert not isinstance(info.value, WireTruncated)


def test_eof_on_a_nonblocking_fd_is_closed(pipe: Pipe) -> None:
    _set_nonblocking(pipe.r)
    pipe.close_w()
    with pytest.raises(WireClosed) as info:
        recv(pipe.r, deadline=deadline_in(JOIN_TIMEOUT))
    assert not isinstance(info.value, WireTruncated)


# --- closed read end


@pytest.mark.parametrize("size", [0, 10, 64 * KIB + 1, 2 * MIB])
@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "nonblocking"])
def test_send_to_a_closed_read_end_is_closed(size: int, blocking: bool, pipe: Pipe) -> None:
    os.set_blocking(pipe.w, blocking)
    pipe.close_r()
    with pytest.raises(WireClosed) as info:
        send(pipe.w, 1, pattern(size))
    assert not isinstance(info.value, BrokenPipeError)
    assert not isinstance(info.value, WireTruncated)
    assert isinstance(info.value.__cause__, BrokenPipeError)


def test_write_all_to_a_closed_read_end_is_closed(pipe: Pipe) -> None:
    pipe.close_r()
    with pytest.raises(WireClosed) as info:
        write_all(pipe.w, b"x")
    assert not isinstance(info.value, BrokenPipeError)


def test_reader_going_away_during_a_blocked_send_is_closed(pipe: Pipe) -> None:
    payload = pattern(8 * MIB)

    def send_expecting_close() -> BaseException | None:
        try:
            send(pipe.w, 1, payload)
        except WireClosed as exc:
            return exc
        return None

    writer = Worker(send_expecting_close)
    time.sleep(0.1)
    read_exact(pipe.r, 1000)  # the peer read a little, then died
    pipe.close_r()
    exc = writer.join()
    assert isinstance(exc, WireClosed)
    assert not isinstance(exc, BrokenPipeError)


# --- make_pipe


def test_make_pipe_returns_a_working_private_pipe(pipe: Pipe) -> None:
    assert pipe.r != pipe.w
    assert not os.get_inheritable(pipe.r)
    assert not os.get_inheritable(pipe.w)
    assert os.get_blocking(pipe.r)
    assert os.get_blocking(pipe.w)
    os.write(pipe.w, b"hi")
    assert os.read(pipe.r, 2) == b"hi"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="F_GETPIPE_SZ is Linux only")
def test_make_pipe_buffer_size(pipe: Pipe) -> None:
    import fcntl

    f_getpipe_sz = 1032
    size = fcntl.fcntl(pipe.w, f_getpipe_sz)
    assert size >= 64 * KIB
    # The large buffer is an optimisation; when the system allows it, it is used.
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            max_size = int(f.read())
    except OSError:  # pragma: no cover
        return
    if max_size >= MIB and os.geteuid() == 0:
        assert size == MIB


# --- through a real subprocess


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pytest_subproc import _wire

    r, w, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if mode == "echo":
        while True:
            try:
                kind, payload = _wire.recv(r)
            except _wire.WireClosed:
                break
            _wire.send(w, kind, payload)
    elif mode == "block":
        _wire.send(w, 1, b"ready")
        _wire.recv(r)
    elif mode == "die-mid-message":
        _wire.write_all(w, _wire.encode_header(2, 10 << 20))
        _wire.write_all(w, b"z" * (1 << 19))
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


class Child:
    """A Python child holding only its ends of two pipes: the parent closes its
    copies, so the child's death is end-of-file for the parent at once."""

    def __init__(self, mode: str) -> None:
        self.to_child_pipe, self.from_child_pipe = Pipe(), Pipe()
        self.to_child, self.from_child = self.to_child_pipe.w, self.from_child_pipe.r
        root = os.path.dirname(os.path.dirname(os.path.abspath(_wire.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        child_fds = (self.to_child_pipe.r, self.from_child_pipe.w)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", CHILD, *map(str, child_fds), mode],
                pass_fds=child_fds,
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
            )
        except BaseException:
            self.close_parent_ends()
            raise
        finally:
            # Keeping these would hide the child's death (seed defect 5).
            self.to_child_pipe.close_r()
            self.from_child_pipe.close_w()

    def close_parent_ends(self) -> None:
        self.to_child_pipe.close()
        self.from_child_pipe.close()

    def reap(self) -> None:
        """Close the parent's ends and wait for the child; show its stderr."""
        self.close_parent_ends()
        with self.proc:
            try:
                _, err = self.proc.communicate(timeout=JOIN_TIMEOUT)
            except subprocess.TimeoutExpired:  # pragma: no cover
                self.proc.kill()
                _, err = self.proc.communicate()
        if err:
            sys.stderr.write(err.decode(errors="replace"))


@pytest.fixture
def child_factory() -> Any:
    children: list[Child] = []

    def make(mode: str) -> Child:
        child = Child(mode)
        children.append(child)
        return child

    yield make
    for child in children:
        child.reap()


def test_subprocess_echoes_a_1_mib_message(child_factory: Callable[[str], Child]) -> None:
    child = child_factory("echo")
    payload = pattern(MIB, seed=5)
    for kind in (7, 8):
        # The child echoes only after reading the whole message, so sending it
        # all before reading the reply cannot deadlock.
        send(child.to_child, kind, payload)
        got_kind, got = recv(child.from_child)
        assert got_kind == kind
        assert first_difference(got, payload) is None
    # The child sees end-of-file and exits; its write end goes with it.
    child.to_child_pipe.close_w()
    with pytest.raises(WireClosed) as info:
        recv(child.from_child)
    assert not isinstance(info.value, WireTruncated)
    assert child.proc.wait(timeout=JOIN_TIMEOUT) == 0


def test_sigkilled_subprocess_is_noticed_by_recv_at_once(
    child_factory: Callable[[str], Child],
) -> None:
    child = child_factory("block")
    assert recv(child.from_child) == (1, bytearray(b"ready"))
    start = time.monotonic()
    child.proc.kill()
    with pytest.raises(WireClosed) as info:
        recv(child.from_child)
    elapsed = time.monotonic() - start
    assert not isinstance(info.value, WireTruncated)
    assert elapsed < 1.0, f"death noticed after {elapsed:.3f} s"
    assert child.proc.wait(timeout=JOIN_TIMEOUT) == -signal.SIGKILL
    # The parent's write end sees the death too.
    with pytest.raises(WireClosed):
        send(child.to_child, 1, b"anyone there?")


def test_subprocess_dying_inside_a_message_is_truncated(
    child_factory: Callable[[str], Child],
) -> None:
    child = child_factory("die-mid-message")
    with pytest.raises(WireTruncated):
        recv(child.from_child)
    assert child.proc.wait(timeout=JOIN_TIMEOUT) == -signal.SIGKILL


# --- multi-part messages --------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes",
    [[], [0], [1, 2, 3], [(1 << 16) - 1, 1], [1 << 16, 0, 5], [3 << 20, 7, 1 << 20]],
    ids=["none", "one empty", "small", "just small", "just large", "large"],
)
def test_parts_round_trip_apart(pipe: Pipe, sizes: list[int]) -> None:
    """Each part comes back as a buffer of its own, whatever the sizes."""
    parts = [pattern(n, seed=i) for i, n in enumerate(sizes)]
    reader = Worker(_wire.recv_parts, pipe.r)
    _wire.send_parts(pipe.w, 9, parts)
    kind, got = reader.join()
    assert kind == 9
    assert [len(p) for p in got] == sizes
    assert all(first_difference(g, p) is None for g, p in zip(got, parts))


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview], ids=lambda t: t.__name__)
def test_a_large_part_arrives_as_bytearray_only_if_it_left_as_one(
    pipe: Pipe, wrap: Callable[[bytes], Any]
) -> None:
    big = bytes(pattern(3 * MIB + 5))
    reader = Worker(_wire.recv_parts, pipe.r)
    _wire.send_parts(pipe.w, 9, [b"head", wrap(big)])
    _, (head, got) = reader.join()
    assert bytes(head) == b"head"
    assert type(got) is (bytearray if wrap is bytearray else bytes)
    assert first_difference(got, big) is None


def test_read_bytes_across_chunks_and_its_end_of_file(pipe: Pipe) -> None:
    data = bytes(pattern(2 * MIB + 3))
    reader = Worker(_wire.read_bytes, pipe.r, len(data))
    _wire.write_all(pipe.w, data)
    got = reader.join()
    assert type(got) is bytes
    assert first_difference(got, data) is None
    # End of file past the first chunk is truncation, and says how far it got.
    reader = Worker(_wire.read_bytes, pipe.r, 2 * MIB)
    _wire.write_all(pipe.w, data[: MIB + MIB // 2])
    pipe.close_w()
    with pytest.raises(WireTruncated, match=f"after {MIB + MIB // 2} of {2 * MIB} bytes"):
        reader.join()
    with pytest.raises(WireClosed) as closed:
        _wire.read_bytes(pipe.r, MIB)
    assert not isinstance(closed.value, WireTruncated)


def test_parts_and_plain_messages_interleave(pipe: Pipe) -> None:
    reader = Worker(lambda: [_wire.recv_parts(pipe.r), _wire.recv(pipe.r)])
    _wire.send_parts(pipe.w, 1, [b"ab", b"c"])
    _wire.send(pipe.w, 2, b"plain")
    (kind, parts), plain = reader.join()
    assert (kind, [bytes(p) for p in parts]) == (1, [b"ab", b"c"])
    assert plain == (2, bytearray(b"plain"))


@pytest.mark.parametrize("large", [False, True], ids=["small", "large"])
def test_a_part_table_that_does_not_add_up_is_corrupt(pipe: Pipe, large: bool) -> None:
    body = b"x" * ((1 << 17) if large else 10)
    table = struct.pack("<IQ", 1, len(body) + 1)  # claims one byte more than it carries
    _wire.write_all(pipe.w, _wire.encode_header(3, len(table) + len(body)) + table + body)
    with pytest.raises(WireCorrupt):
        _wire.recv_parts(pipe.r)


def test_a_part_table_overrunning_its_message_is_corrupt(pipe: Pipe) -> None:
    table = struct.pack("<I", 1000)  # 1000 lengths announced, none present
    _wire.write_all(pipe.w, _wire.encode_header(3, len(table)) + table)
    with pytest.raises(WireCorrupt):
        _wire.recv_parts(pipe.r)


def test_end_of_file_inside_a_large_part_is_truncation(pipe: Pipe) -> None:
    table = struct.pack("<IQ", 1, 1 << 17)
    _wire.write_all(pipe.w, _wire.encode_header(4, len(table) + (1 << 17)) + table + b"a" * 100)
    pipe.close_w()
    with pytest.raises(WireTruncated):
        _wire.recv_parts(pipe.r)


# --- what a test body leaves behind


def _replaced(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the framing called a function a test had replaced")


def _await_and_recv_parts(fd: int, deadline: float) -> tuple[int, list[_wire.Received]]:
    _wire.await_readable(fd, _wire.AWAKE)
    return _wire.recv_parts(fd, deadline)


def test_framing_ignores_functions_replaced_after_import(
    pipe: Pipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body that replaces os.write or select.poll and leaves it so breaks only itself."""
    _set_nonblocking(pipe.r, pipe.w)  # so both ends wait in poll() while the pipe is full
    deadline = time.monotonic() + JOIN_TIMEOUT
    big = pattern(3 * MIB + 5)
    for module, name in [
        (os, "write"), (os, "read"), (os, "readv"), (os, "sched_yield"),
        (select, "poll"), (select, "select"), (time, "monotonic"),
        (zlib, "crc32"), (struct, "pack"), (io, "BytesIO"),
    ]:  # fmt: skip
        monkeypatch.setattr(module, name, _replaced)
    reader = Worker(_await_and_recv_parts, pipe.r, deadline)
    _wire.send_parts(pipe.w, 9, [b"head", bytes(big)], deadline)
    kind, parts = reader.join()
    monkeypatch.undo()
    assert kind == 9
    assert bytes(parts[0]) == b"head"
    assert first_difference(parts[1], big) is None
