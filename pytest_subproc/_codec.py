"""Values to and from message parts: pickle, with large byte strings kept apart.

A large bytes or bytearray travels as a message part of its own: it is
written straight from the object and read straight into a buffer of its own,
so the pickle stream never holds (and copies) its data.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, Optional

from pytest_subproc._wire import Buffer, Received

PROTOCOL = 5
# Below this, a byte string costs less inside the stream than as a part.
_APART = 1 << 16
# Taken at import: a test body that patches pickle and leaves it patched
# breaks only itself, not the requests of the tests after it in its worker.
_CPickler = pickle.Pickler
_CUnpickler = pickle.Unpickler
_loads = pickle.loads
_BytesIO = io.BytesIO


class _Pickler(_CPickler):
    def __init__(self, stream: io.BytesIO, parts: list[Buffer]) -> None:
        super().__init__(stream, PROTOCOL)
        self.parts = parts
        self.index: dict[int, int] = {}  # id of a byte string sent apart -> its part

    def persistent_id(self, obj: Any) -> Optional[tuple[str, int]]:
        # Called for every object, bytes included (reducer_override is not).
        kind = type(obj)
        if (kind is bytes or kind is bytearray) and len(obj) >= _APART:
            # The same object twice is one part, so identity survives as with the memo.
            if id(obj) not in self.index:
                self.index[id(obj)] = len(self.parts)
                self.parts.append(obj)
            return ("bytes" if kind is bytes else "bytearray", self.index[id(obj)])
        return None


class _Unpickler(_CUnpickler):
    def __init__(self, parts: list[Received]) -> None:
        super().__init__(_BytesIO(parts[0]))
        self.parts = parts
        self.built: dict[int, Any] = {}

    def persistent_load(self, pid: Any) -> Any:
        kind, index = pid
        if index not in self.built:
            part = self.parts[index]
            # A part that arrived as the type wanted is used as it is, uncopied.
            wanted = bytearray if kind == "bytearray" else bytes
            self.built[index] = part if type(part) is wanted else wanted(part)
        return self.built[index]


class _TooLarge(Exception):
    pass


class _SmallStream:
    """A pickle stream that gives up as soon as it could hold a large byte string.

    Pickling through the C pickler alone is several times faster than with a
    persistent_id hook called back for every object, and most values are small.
    A byte string of _APART bytes or more reaches write() whole, before any copy.
    """

    __slots__ = ("chunks", "size")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.size >= _APART:
            raise _TooLarge
        self.chunks.append(data)
        return len(data)


_NONE = [pickle.dumps(None, PROTOCOL)]


def dumps(obj: Any) -> list[Buffer]:
    """Return the parts that carry ``obj``: the pickle stream, then large byte strings.

    A value whose pickle grows past _APART bytes is pickled a second time,
    with byte strings kept apart (its __reduce__ methods run twice).
    """
    if obj is None:  # what most requests return
        return list(_NONE)
    small = _SmallStream()
    try:
        _CPickler(small, PROTOCOL).dump(obj)
    except _TooLarge:
        return _dumps_apart(obj)
    return [b"".join(small.chunks)]


def _dumps_apart(obj: Any) -> list[Buffer]:
    stream = _BytesIO()
    parts: list[Buffer] = [b""]
    _Pickler(stream, parts).dump(obj)
    parts[0] = stream.getbuffer()
    return parts


def loads(parts: list[Received]) -> Any:
    """Rebuild the value that dumps() split into ``parts``."""
    if len(parts) == 1:  # nothing was sent apart, so no persistent ids to resolve
        return _loads(parts[0])
    return _Unpickler(parts).load()
