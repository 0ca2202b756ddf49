"""Framing of messages over a pair of pipe fds.

A message is a fixed 16-byte header followed by its payload. The header holds
a magic value, the message kind, a check value over kind and length, and the
payload length. Reads and writes loop until the whole message has moved, so a
payload of any size works, and a partial write cannot desynchronise the
stream. This module knows nothing of pytest or of what a payload means.
"""

from __future__ import annotations

import enum
import io
import os
import select
import struct
import sys
import time
import zlib
from collections.abc import Sequence
from typing import Optional, Union

MAGIC = b"\xa5S"
HEADER = struct.Struct("<2sBxIQ")  # magic, kind, pad, check, length
# Below this size a message goes out as one buffer (one syscall); above it the
# header and the payload are written apart so the payload is never copied.
_JOIN_LIMIT = 1 << 16
_CHUNK = 1 << 20
# Linux lets a pipe buffer grow to 1 MiB without privileges; large payloads
# move about half again as fast through it.
_F_SETPIPE_SZ = 1031

Buffer = Union[bytes, bytearray, memoryview]
Received = Union[bytes, bytearray]
# How long a process waits awake for its peer's message before it sleeps:
# about what a small test takes, and what pytest takes from one test to the
# next. Waking a sleeping process costs more than a small request takes.
AWAKE = 1e-3
# A gap this long between two polls of a spin means the CPU is shared.
_SHARED = 30e-6
# Where Linux counts the runnable processes, read at most this often.
_LOADAVG = "/proc/loadavg"
_RECOUNT = 10e-3

# Every function the framing calls is taken at import: a test body that
# replaces one (os.write, select.poll, time.monotonic) and leaves it behind
# breaks only itself, not the requests of the tests after it in its worker.
_clock = time.perf_counter
_monotonic = time.monotonic
_write = os.write
_read = os.read
_poll = getattr(select, "poll", None)
_POLLIN = getattr(select, "POLLIN", 0)
_POLLOUT = getattr(select, "POLLOUT", 0)
_select = select.select
_sched_yield = getattr(os, "sched_yield", None)
_open = os.open
_close = os.close
_crc32 = zlib.crc32
_BytesIO = io.BytesIO
_CHECKED = struct.Struct("<BQ")  # what the check value covers: kind and length


class WireError(Exception):
    """The stream is unusable."""


class WireClosed(WireError):
    """The other end closed the pipe: the peer is gone."""


class WireTruncated(WireClosed):
    """The other end closed the pipe in the middle of a message."""


class WireCorrupt(WireError):
    """A header did not check out: the stream is out of sync."""


class WireTimeout(WireError):
    """The deadline passed before the whole message moved."""


def make_pipe() -> tuple[int, int]:
    """Return a non-inheritable pipe (read fd, write fd) with a large buffer where possible."""
    r, w = os.pipe()
    if sys.platform.startswith("linux"):
        try:
            import fcntl

            fcntl.fcntl(w, _F_SETPIPE_SZ, _CHUNK)
        except OSError:
            pass  # a capped /proc/sys/fs/pipe-max-size: the default buffer works too
    return r, w


def _check(kind: int, length: int) -> int:
    return _crc32(_CHECKED.pack(kind, length))


def encode_header(kind: int, length: int) -> bytes:
    """Return the header for a message of ``kind`` with a ``length``-byte payload."""
    return HEADER.pack(MAGIC, kind, _check(kind, length), length)


def decode_header(header: Buffer) -> tuple[int, int]:
    """Return (kind, length) from a header, or raise WireCorrupt."""
    magic, kind, check, length = HEADER.unpack(header)
    if magic != MAGIC or check != _check(kind, length):
        raise WireCorrupt(f"bad message header {bytes(header)!r}")
    return kind, length


def _remaining(deadline: Optional[float]) -> Optional[float]:
    if deadline is None:
        return None
    left = deadline - _monotonic()
    if left <= 0:
        raise WireTimeout("deadline passed")
    return left


def _wait(fd: int, deadline: Optional[float], *, write: bool) -> None:
    """Block until ``fd`` is ready (only reached for non-blocking fds)."""
    timeout = _remaining(deadline)
    if _poll is not None:  # select() rejects fds >= FD_SETSIZE (1024)
        poller = _poll()
        poller.register(fd, _POLLOUT if write else _POLLIN)
        ready = bool(poller.poll(None if timeout is None else timeout * 1000))
    else:  # pragma: no cover - platforms without poll
        rlist, wlist = ([], [fd]) if write else ([fd], [])
        ready = any(_select(rlist, wlist, [], timeout))
    if not ready:
        raise WireTimeout("deadline passed")


def _cpus() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


class _Crowding:
    """Whether more processes want to run than there are CPUs, counted now and then.

    A process that spins while others wait for a CPU takes turns from them,
    its peer maybe: on a busy machine (xdist, a shared CI runner) it sleeps
    at once instead. Where the count cannot be read, nothing is crowded.
    """

    def __init__(self) -> None:
        self.cpus = _cpus()
        self.counted = -_RECOUNT
        self.crowded = False

    def __call__(self) -> bool:
        now = _clock()
        if now - self.counted >= _RECOUNT:
            self.counted = now
            self.crowded = self._running() > self.cpus
        return self.crowded

    @staticmethod
    def _running() -> int:
        """The runnable processes (this one included), from ``/proc/loadavg``; 0 if unknown."""
        try:
            fd = _open(_LOADAVG, os.O_RDONLY)
        except OSError:
            return 0
        try:
            fields = _read(fd, 128).split()
            return int(fields[3].partition(b"/")[0])
        except (OSError, IndexError, ValueError):
            return 0
        finally:
            _close(fd)


crowded = _Crowding()


def await_readable(fd: int, spin: float) -> None:
    """Poll ``fd`` without sleeping for up to ``spin`` seconds, yielding the CPU between polls.

    Waking a process asleep in poll() costs tens of microseconds, more on a
    virtual machine, which is more than a small reply takes to come; staying
    awake a little while is cheaper, unless another process needs this CPU.
    Returns when ``fd`` is readable (or at end-of-file), when the time is up,
    or once the CPU proves shared, at once if the machine is crowded; the
    reading is left to the caller.
    """
    if _poll is None or _sched_yield is None or crowded():
        return
    poller = _poll()
    poller.register(fd, _POLLIN)
    last = _clock()
    end = last + spin
    while not poller.poll(0):
        now = _clock()
        if now >= end or now - last > _SHARED:
            # A long gap between two polls: another process had this CPU, and
            # spinning would take turns from it (the peer, maybe). Sleep instead.
            return
        last = now
        _sched_yield()  # a process that shares this CPU, the peer maybe, runs first


def write_all(fd: int, data: Buffer, deadline: Optional[float] = None) -> None:
    """Write every byte of ``data``, looping over partial writes."""
    view = memoryview(data).cast("B")
    while view:
        try:
            # Most messages fit one write, taken whole rather than sliced.
            sent = _write(fd, view if len(view) <= _CHUNK else view[:_CHUNK])
        except BlockingIOError:
            _wait(fd, deadline, write=True)
            continue
        except BrokenPipeError as exc:
            raise WireClosed("the reading end is closed") from exc
        view = view[sent:]


if hasattr(os, "readv"):
    _readv = os.readv

    def _readinto(fd: int, buf: Union[bytearray, memoryview]) -> int:
        return _readv(fd, [buf])

else:  # pragma: no cover - platforms without readv

    def _readinto(fd: int, buf: Union[bytearray, memoryview]) -> int:
        chunk = _read(fd, len(buf))
        buf[: len(chunk)] = chunk
        return len(chunk)


def read_exact(fd: int, size: int, deadline: Optional[float] = None) -> bytearray:
    """Read exactly ``size`` bytes; WireClosed on end-of-file before the first byte."""
    buf = bytearray(size)
    got = 0
    if size <= _CHUNK:
        # Most reads find the whole of it there at once.
        try:
            got = _readinto(fd, buf)
        except BlockingIOError:
            _wait(fd, deadline, write=False)
        else:
            if got == size:
                return buf
            if got == 0:
                raise WireClosed("end of file: the peer is gone")
    _fill(fd, memoryview(buf), deadline, got)
    return buf


def read_bytes(fd: int, size: int, deadline: Optional[float] = None) -> bytes:
    """Read exactly ``size`` bytes as bytes; end-of-file as in read_exact.

    The bytes are read straight into a BytesIO's buffer, which getvalue() then
    hands over as the bytes object itself, uncopied. Reading into a bytearray
    and copying that into bytes would touch twice as much fresh memory, which
    costs more than moving the bytes.
    """
    if size == 0:
        return b""
    stream = _BytesIO()
    stream.seek(size - 1)
    stream.write(b"\0")
    with stream.getbuffer() as view:
        _fill(fd, view, deadline, 0)
    return stream.getvalue()


def _fill(fd: int, view: memoryview, deadline: Optional[float], got: int) -> None:
    """Fill ``view`` from ``got`` on."""
    while got < len(view):
        try:
            n = _readinto(fd, view[got : got + _CHUNK])
        except BlockingIOError:
            _wait(fd, deadline, write=False)
            continue
        if n == 0:
            if got == 0:
                raise WireClosed("end of file: the peer is gone")
            raise WireTruncated(f"end of file after {got} of {len(view)} bytes")
        got += n


def send(fd: int, kind: int, payload: Buffer = b"", deadline: Optional[float] = None) -> None:
    """Send one message."""
    length = memoryview(payload).nbytes
    header = encode_header(kind, length)
    if length <= _JOIN_LIMIT:
        write_all(fd, header + bytes(payload), deadline)
    else:
        write_all(fd, header, deadline)
        write_all(fd, payload, deadline)


def recv(fd: int, deadline: Optional[float] = None) -> tuple[int, bytearray]:
    """Receive one message as (kind, payload).

    WireClosed means the peer closed the stream between messages; WireTruncated
    that it closed it inside one.
    """
    kind, length = decode_header(read_exact(fd, HEADER.size, deadline))
    if length == 0:
        return kind, bytearray()
    try:
        return kind, read_exact(fd, length, deadline)
    except WireTruncated:
        raise
    except WireClosed as exc:
        raise WireTruncated(f"end of file after a header announcing {length} bytes") from exc


# A multi-part message's payload starts with a table: the part count, then
# each part's length, its top bit set for a part sent from a bytearray. Parts
# are written from their own buffers; a large part is read straight into a
# bytearray of its own if it left as one, else into bytes.
_COUNT = struct.Struct("<I")
_LENGTH = struct.Struct("<Q")
_MUTABLE = 1 << 63
_ONE_PART = struct.Struct("<IQ")  # the table of a one-part message


def send_parts(
    fd: int, kind: int, parts: Sequence[Buffer], deadline: Optional[float] = None
) -> None:
    """Send one message made of ``parts``; recv_parts gives them back apart."""
    if len(parts) == 1 and type(parts[0]) is bytes and len(parts[0]) <= _JOIN_LIMIT:
        # Most messages: one small pickle. Built in one go, sent in one write.
        only = parts[0]
        header = encode_header(kind, _ONE_PART.size + len(only))
        write_all(fd, header + _ONE_PART.pack(1, len(only)) + only, deadline)
        return
    sizes = [memoryview(part).nbytes for part in parts]
    entries = [n | _MUTABLE if isinstance(p, bytearray) else n for p, n in zip(parts, sizes)]
    table = _COUNT.pack(len(parts)) + b"".join(_LENGTH.pack(e) for e in entries)
    header = encode_header(kind, len(table) + sum(sizes))
    small = [bytes(part) for part, n in zip(parts, sizes) if n <= _JOIN_LIMIT]
    if len(small) == len(parts) and sum(sizes) <= _JOIN_LIMIT:
        write_all(fd, b"".join([header, table, *small]), deadline)
        return
    write_all(fd, header + table, deadline)
    for part in parts:
        write_all(fd, part, deadline)


def recv_parts(fd: int, deadline: Optional[float] = None) -> tuple[int, list[Received]]:
    """Receive one message sent by send_parts, as (kind, parts).

    A part sent from a bytearray arrives as a bytearray; a large part sent
    from anything else arrives as bytes, a small one as bytes or bytearray.
    """
    kind, length = decode_header(read_exact(fd, HEADER.size, deadline))
    try:
        if length <= _JOIN_LIMIT:
            # Small: one read for the whole payload, then cut it up.
            return kind, _split(read_exact(fd, length, deadline))
        (count,) = _COUNT.unpack(read_exact(fd, _COUNT.size, deadline))
        entries = _entries(read_exact(fd, count * _LENGTH.size, deadline), count)
        if _COUNT.size + count * _LENGTH.size + sum(n for n, _ in entries) != length:
            raise WireCorrupt(f"a part table of {count} parts does not add up to {length} bytes")
        return kind, [
            read_exact(fd, n, deadline) if mutable else read_bytes(fd, n, deadline)
            for n, mutable in entries
        ]
    except WireTruncated:
        raise
    except WireClosed as exc:
        raise WireTruncated(f"end of file inside a message of {length} bytes") from exc


def _entries(table: Buffer, count: int) -> list[tuple[int, bool]]:
    """Each part's (size, whether it left as a bytearray) from a part table."""
    raw = (_LENGTH.unpack_from(table, i * _LENGTH.size)[0] for i in range(count))
    return [(e & ~_MUTABLE, bool(e & _MUTABLE)) for e in raw]


def _split(payload: bytearray) -> list[Received]:
    if len(payload) >= _ONE_PART.size:
        count, size = _ONE_PART.unpack_from(payload)
        if count == 1 and _ONE_PART.size + size == len(payload):
            return [payload[_ONE_PART.size :]]
    if len(payload) < _COUNT.size:
        raise WireCorrupt("a message too short for its part table")
    (count,) = _COUNT.unpack_from(payload)
    start = _COUNT.size + count * _LENGTH.size
    if start > len(payload):
        raise WireCorrupt(f"a part table of {count} parts overruns its message")
    sizes = [n for n, _ in _entries(memoryview(payload)[_COUNT.size : start], count)]
    if start + sum(sizes) != len(payload):
        raise WireCorrupt(f"a part table of {count} parts does not add up to {len(payload)} bytes")
    parts: list[Received] = []
    for n in sizes:
        parts.append(payload[start : start + n])
        start += n
    return parts


class Kind(enum.IntEnum):
    """Message kinds: requests from the parent, replies from the worker."""

    READY = 1  # worker -> parent, once, after start-up
    RUN = 2
    STORE = 3
    LOAD = 4
    CALL = 5
    SHUTDOWN = 6
    OK = 7  # worker -> parent: the request's result
    ERROR = 8  # worker -> parent: a serialized exception
    # worker -> parent: one part of a request's result, more to follow, with
    # the sizes its stdout and stderr captures had when it was sent.
    PART = 9
    # worker -> parent, inside a request: a debugger starts, so the request has
    # no deadline any more; the parent answers with an OK on the request pipe.
    PAUSE = 10
