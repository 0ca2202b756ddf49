"""Exception serialization in the worker and revival in the parent.

The worker turns an exception into a marshal'd dict of plain values: the
exception pickled (when it survives a round trip), its type's name, the repr of
its args, its message, its formatted traceback and where each of its frames
stood. The parent revives it as its own type where it can, else as an
``UnserializableException``; either way the worker's traceback is chained as a
``ChildTraceException`` cause, and a traceback is rebuilt whose frames point at
the worker's source lines, so pytest renders the failure as it would an
in-process one.

Only the standard library is imported here: the worker imports this module
before anything else and must stay light.
"""

from __future__ import annotations

import copyreg
import dis
import functools
import io
import itertools
import keyword
import marshal
import pickle
import reprlib
import sys
import traceback
import types
from collections.abc import Iterable
from typing import Any, Callable, NamedTuple, Optional

from pytest_subproc._exceptions import ChildTraceException, UnserializableException

# Taken at import: a body that replaces pickle.loads must not break the reports after it.
_loads = pickle.loads

# Longest message, args repr or traceback text shipped, in characters. The
# pickled exception is not cut, so a revived exception keeps a longer message.
TEXT_LIMIT = 1 << 20

_PACKAGE = "pytest_subproc"
_PROTOCOL = 5
_CO_VARARGS = 0x04
_CO_VARKEYWORDS = 0x08

_Position = tuple[Optional[int], Optional[int], Optional[int], Optional[int]]


class _FrameRecord(NamedTuple):
    """Where one worker frame stood. It crosses the pipe as a plain tuple."""

    filename: str
    lineno: int
    name: str
    firstlineno: int
    # pytest's __tracebackhide__ hid the frame.
    hidden: bool
    # Where the failing instruction ends and its columns: Python 3.11+ only.
    end_lineno: int | None
    colno: int | None
    end_colno: int | None
    # (name, repr) of each argument, which pytest's long reports show.
    arguments: tuple[tuple[str, str], ...]


class _Record(NamedTuple):
    """What crosses the pipe, as a dict of these fields."""

    module: str
    qualname: str
    pickled: bytes | None
    args_repr: str
    message: str
    traceback_text: str
    frames: tuple[_FrameRecord, ...]

    def to_wire(self) -> dict[str, object]:
        # marshal takes plain tuples only, not NamedTuples.
        return {**self._asdict(), "frames": tuple(tuple(frame) for frame in self.frames)}


# --------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------


def dump_exception(exc: BaseException) -> bytes:
    """Child side: serialize exc. Never raises, whatever exc does."""
    try:
        return marshal.dumps(_record(exc).to_wire())
    except BaseException as err:
        # Each part below is guarded already; this is for what is left
        # (memory, say). The worker must answer whatever happened.
        return marshal.dumps(_last_resort(exc, err).to_wire())


def _record(exc: BaseException) -> _Record:
    module, qualname = _type_names(type(exc))
    tb = _without_own_frames(exc.__traceback__)
    return _Record(
        module=module,
        qualname=qualname,
        pickled=_pickled(exc),
        args_repr=_clip(_safe_text(lambda: repr(exc.args), "repr() of args")),
        message=_clip(_safe_str(exc)),
        traceback_text=_clip(_format(exc, tb)),
        frames=_frame_records(tb),
    )


def _last_resort(exc: BaseException, err: BaseException) -> _Record:
    module, qualname = _type_names(type(exc))
    why = f"the exception could not be serialized: {_type_names(type(err))[1]}"
    return _Record(module, qualname, None, "", why, why + "\n", ())


def _type_names(cls: type) -> tuple[str, str]:
    """(module, qualname) of a class, as exact str whatever the class holds."""
    try:
        module = getattr(cls, "__module__", None)
        qualname = getattr(cls, "__qualname__", None)
        return (_exact(module) if isinstance(module, str) else "?"), (
            _exact(qualname) if isinstance(qualname, str) else "?"
        )
    except BaseException:
        return "?", "?"


def _exact(text: str) -> str:
    # marshal refuses str subclasses; str.__str__ copies one into a plain str.
    return text if type(text) is str else str.__str__(text)


def _safe_str(obj: object) -> str:
    return _safe_text(lambda: str(obj), "str()")


def _safe_text(make: Callable[[], str], what: str) -> str:
    """make(), or a note of its failure: user __repr__/__str__ may raise anything.

    BaseException is caught on purpose: pytest's outcomes are BaseException,
    and the worker has to send an answer whatever the user's code does.
    """
    try:
        return _exact(make())
    except BaseException as err:
        return f"<{what} failed: {_type_names(type(err))[1]}>"


def _clip(text: str, limit: int = TEXT_LIMIT) -> str:
    """text cut to at most limit characters, keeping its head and tail around a marker."""
    if len(text) <= limit:
        return text
    keep = max(limit - 64, 0)  # room for the marker
    head = keep // 2
    marker = f"\n... [{len(text) - keep} characters truncated] ...\n"
    return text[:head] + marker + text[len(text) - (keep - head) :]


def _pickled(exc: BaseException) -> bytes | None:
    """exc pickled, if it comes back from the pickle as the same type; else None.

    BaseException.__reduce__ carries __dict__, so attributes such as filename,
    errno, __notes__ or pytest's outcome fields travel with the instance.
    """
    data = _round_trip(exc)
    if data is None:
        for reduction in _rebuilds(exc):
            data = _round_trip(exc, reduction)
            if data is not None:
                break
    return data


def _round_trip(exc: BaseException, reduction: tuple[Any, ...] | None = None) -> bytes | None:
    """exc pickled (as ``reduction`` says, if given) if it comes back as the same type.

    A rebuilt exception must also read the same: a dropped attribute could
    have been what its message was made of.
    """
    try:
        buffer = io.BytesIO()
        _Pickler(buffer, protocol=_PROTOCOL, rebuilt=(exc, reduction)).dump(exc)
        data = buffer.getvalue()
        # The parent could do no better than this round trip: ship only a success.
        back = _loads(data)
        if type(back) is not type(exc):
            return None
        if reduction is not None and _safe_str(back) != _safe_str(exc):
            return None
        return data
    except BaseException:
        return None


def _rebuilds(exc: BaseException) -> list[tuple[Any, ...]]:
    """Other ways to rebuild exc from the parts of its own reduction, best first.

    BaseException pickles as its class called with its args, then its
    __dict__ set: that fails for an attribute that does not pickle (a lock),
    and for an ``__init__`` that does not take the exception's own args
    (``def __init__(self): super().__init__("fixed message")``). Without
    such attributes, and then without calling ``__init__`` at all (as
    ``copyreg.__newobj__`` makes pickle do), it may still come back whole.
    Only the default shape is reworked: a class with a reduction of its own
    said how it wants to be rebuilt.
    """
    try:
        reduced = exc.__reduce_ex__(_PROTOCOL)
        cls = type(exc)
        if not (
            type(reduced) is tuple
            and len(reduced) in (2, 3)
            and reduced[0] is cls
            and type(reduced[1]) is tuple
        ):
            return []
        args, state = reduced[1], reduced[2] if len(reduced) == 3 else None
        if state is not None and type(state) is not dict:
            return []
        kept = {name: value for name, value in (state or {}).items() if _picklable(value)}
        rebuilds: list[tuple[Any, ...]] = [(_NEW_OBJECT, (cls, *args), kept or None)]
        if kept != (state or {}):
            rebuilds.insert(0, (cls, args, kept or None))
        return rebuilds
    except BaseException:
        return []


# Pickle rebuilds an object reduced to this as ``cls.__new__(cls, *args)``.
_NEW_OBJECT = copyreg.__newobj__  # type: ignore[attr-defined]


def _picklable(value: object) -> bool:
    try:
        _Pickler(io.BytesIO(), protocol=_PROTOCOL).dump(value)
        return True
    except BaseException:
        return False


class _Pickler(pickle.Pickler):
    """A pickler that finds classes which are not where their ``__module__`` says.

    pytest's ``Skipped`` and ``Failed`` claim to live in ``builtins`` (for
    shorter reports), so pickle cannot find them by name; such a class is
    pickled as a lookup in a module that does hold it. ``rebuilt`` is an
    object and the reduction to pickle it by, in place of its own.
    """

    def __init__(
        self,
        file: io.BytesIO,
        protocol: int,
        rebuilt: tuple[object, tuple[Any, ...] | None] = (None, None),
    ) -> None:
        super().__init__(file, protocol=protocol)
        self._rebuilt, self._reduction = rebuilt

    def reducer_override(self, obj: Any) -> Any:
        if self._reduction is not None and obj is self._rebuilt:
            return self._reduction
        if isinstance(obj, type) and not _found_at(obj, *_type_names(obj)):
            home = _home_of(obj)
            if home is not None:
                return _by_name, (home, obj.__qualname__)
        return NotImplemented


def _found_at(cls: type, module: str, qualname: str) -> bool:
    try:
        return _by_name(module, qualname) is cls
    except Exception:
        return False


def _home_of(cls: type) -> str | None:
    """The name of an imported module that holds cls under its qualname."""
    for name, module in list(sys.modules.items()):
        try:
            if isinstance(name, str) and _walk(module, cls.__qualname__) is cls:
                return name
        except Exception:
            continue
    return None


def find_class(module: str, qualname: str) -> Any:
    """module.qualname if the parent has that module imported, else None."""
    try:
        return _by_name(module, qualname)
    except Exception:
        return None


def _by_name(module: str, qualname: str) -> Any:
    """module.qualname among the modules already imported; it never imports one."""
    if module not in sys.modules:
        raise pickle.UnpicklingError(f"module {module!r} is not imported in this process")
    return _walk(sys.modules[module], qualname)


def _walk(module: Any, qualname: str) -> Any:
    head, *rest = qualname.split(".")
    # vars(), not getattr(): a module-level __getattr__ may import lazily.
    obj = vars(module)[head]
    for part in rest:
        obj = getattr(obj, part)
    return obj


def _without_own_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """tb from the first frame that is not the worker's own machinery.

    All of tb when every frame is the machinery's: the failure is then in it.
    """
    first = tb
    while first is not None and _is_own(first.tb_frame):
        first = first.tb_next
    return tb if first is None else first


def _is_own(frame: types.FrameType) -> bool:
    try:
        name = frame.f_globals.get("__name__", "")
    except BaseException:  # a dict lookup can still run a hostile key's __eq__
        return False
    return isinstance(name, str) and (name == _PACKAGE or name.startswith(_PACKAGE + "."))


def _format(exc: BaseException, tb: types.TracebackType | None) -> str:
    """The whole chain formatted as Python prints it, or a note of why it could not be."""
    try:
        # Three positional arguments: the one form that 3.9 through 3.13 all take.
        return "".join(traceback.format_exception(type(exc), exc, tb))
    except BaseException as err:
        module, qualname = _type_names(type(exc))
        reason = f"{_type_names(type(err))[1]}: {_safe_str(err)}"
        message = _safe_str(exc)
        return f"(the traceback could not be formatted: {reason})\n{module}.{qualname}: {message}\n"


def _frame_records(tb: types.TracebackType | None) -> tuple[_FrameRecord, ...]:
    try:
        return _frame_records_of(tb)
    except BaseException:
        # Without frames the parent still revives the exception and its text.
        return ()


def _frame_records_of(tb: types.TracebackType | None) -> tuple[_FrameRecord, ...]:
    records = []
    while tb is not None:
        frame, code = tb.tb_frame, tb.tb_frame.f_code
        # tb_lineno can be None on recent Pythons when no line is known.
        lineno = tb.tb_lineno if isinstance(tb.tb_lineno, int) else 0
        records.append(
            _FrameRecord(
                _exact(code.co_filename),
                lineno,
                _exact(code.co_name),
                code.co_firstlineno,
                _hidden(frame),
                *_columns(code, tb.tb_lasti, lineno),
                _arguments(frame),
            )
        )
        tb = tb.tb_next
    return tuple(records)


def _columns(
    code: types.CodeType, lasti: int, lineno: int
) -> tuple[int | None, int | None, int | None]:
    """Python 3.11+: (end_lineno, colno, end_colno) of the instruction at lasti."""
    if sys.version_info >= (3, 11) and lasti >= 0:
        position = next(itertools.islice(code.co_positions(), lasti // 2, None), None)
        if position is not None and position[0] == lineno:
            return position[1], position[2], position[3]
    return None, None, None


def _hidden(frame: types.FrameType) -> bool:
    """Whether pytest would hide the frame: ``__tracebackhide__`` in its locals, else globals."""
    try:
        for namespace in (frame.f_locals, frame.f_globals):
            if "__tracebackhide__" in namespace:
                value = namespace["__tracebackhide__"]
                # pytest calls a callable with an ExceptionInfo, which the
                # worker does not have: show such a frame rather than guess.
                return not callable(value) and bool(value)
    except BaseException:
        pass
    return False


def _arguments(frame: types.FrameType) -> tuple[tuple[str, str], ...]:
    """(name, repr) of the frame's arguments, in the order pytest lists them."""
    try:
        code = frame.f_code
        count = code.co_argcount + code.co_kwonlyargcount
        count += bool(code.co_flags & _CO_VARARGS) + bool(code.co_flags & _CO_VARKEYWORDS)
        values = frame.f_locals
        return tuple(
            (_exact(name), _value_repr(values[name]))
            for name in code.co_varnames[:count]
            if name in values
        )
    except BaseException:
        return ()


def _value_repr(value: object) -> str:
    # pytest's own saferepr where the worker has it loaded (never import it
    # here), so values read as pytest would show them in-process.
    saferepr = getattr(sys.modules.get("_pytest._io.saferepr"), "saferepr", None)
    if callable(saferepr):
        return _safe_text(lambda: saferepr(value), "repr()")
    return _safe_text(lambda: reprlib.repr(value), "repr()")


# --------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------


def load_exception(data: bytes) -> BaseException:
    """Parent side: return the revived exception (not raised)."""
    record = _decode(data)
    exc = _revive(record)
    if exc is None:
        exc = _stand_in(record)
    try:
        _attach(exc, record)
    except Exception:
        # A revived class may guard its attributes; the stand-in does not.
        exc = _stand_in(record)
        _attach(exc, record)
    return exc


def child_traceback_text(exc: BaseException) -> str | None:
    """The worker's formatted traceback, if exc was revived by load_exception."""
    cause = exc.__cause__
    if isinstance(cause, ChildTraceException) and cause.args and isinstance(cause.args[0], str):
        return cause.args[0]
    return None


def _decode(data: bytes) -> _Record:
    try:
        raw = marshal.loads(data)
        texts = [raw[key] for key in ("module", "qualname", "args_repr", "message")]
        text = raw["traceback_text"]
        pickled = raw["pickled"]
        if all(type(t) is str for t in [*texts, text]) and type(pickled) in (bytes, type(None)):
            module, qualname, args_repr, message = texts
            frames = _checked_frames(raw.get("frames"))
            return _Record(module, qualname, pickled, args_repr, message, text, frames)
    except Exception:
        pass
    why = "the worker's exception record could not be decoded"
    return _Record("", "<unknown>", None, "", why, why + "\n", ())


def _checked_frames(raw: object) -> tuple[_FrameRecord, ...]:
    """The frame records in raw if all are well formed, else none at all."""
    if not isinstance(raw, tuple):
        return ()
    frames = tuple(frame for frame in map(_as_frame, raw) if frame is not None)
    return frames if len(frames) == len(raw) else ()


def _as_frame(row: object) -> _FrameRecord | None:
    if not (isinstance(row, tuple) and len(row) == len(_FrameRecord._fields)):
        return None
    frame = _FrameRecord(*row)
    columns = (frame.end_lineno, frame.colno, frame.end_colno)
    well_formed = (
        isinstance(frame.filename, str)
        and isinstance(frame.name, str)
        and isinstance(frame.lineno, int)
        and isinstance(frame.firstlineno, int)
        and isinstance(frame.hidden, bool)
        and all(value is None or isinstance(value, int) for value in columns)
        and isinstance(frame.arguments, tuple)
        and all(_is_pair_of_str(pair) for pair in frame.arguments)
    )
    return frame if well_formed else None


def _is_pair_of_str(pair: object) -> bool:
    return isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(s, str) for s in pair)


class _Unpickler(pickle.Unpickler):
    """Resolves only names in modules the parent has already imported.

    This keeps revival from importing (and so running) anything new in the
    parent. It is robustness, not a security boundary: an imported module has
    plenty to misuse. Trust comes from where the bytes come from, a private
    pipe to a worker process that the parent itself started.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _by_name(module, name)
        except Exception as err:
            raise pickle.UnpicklingError(f"cannot find {module}.{name} here: {err!r}") from None


def _revive(record: _Record) -> BaseException | None:
    if record.pickled is None:
        return None
    try:
        obj = _Unpickler(io.BytesIO(record.pickled)).load()
    except Exception:
        return None
    # The same name could mean another class here; take only the recorded type.
    if isinstance(obj, BaseException) and _type_names(type(obj)) == (
        record.module,
        record.qualname,
    ):
        return obj
    return None


def _stand_in(record: _Record) -> UnserializableException:
    type_name = f"{record.module}.{record.qualname}" if record.module else record.qualname
    return UnserializableException(type_name, record.args_repr, record.message)


def _attach(exc: BaseException, record: _Record) -> None:
    exc.__cause__ = ChildTraceException(record.traceback_text)
    exc.__suppress_context__ = True
    exc.__traceback__ = _rebuild_traceback(record.frames)


# --------------------------------------------------------------------------
# Rebuilt tracebacks
#
# Each worker frame becomes a real frame object whose code has the worker's
# filename, first line and name, so pytest finds the source lines and cuts
# the traceback at the test function as it does in-process. The frame is that
# of a generator that is never started: nothing runs in the parent, and the
# frame has no f_back tying it to the parent's stack. Its arguments stand for
# the worker's, so pytest's long reports list them as they would in-process.
# --------------------------------------------------------------------------


# The module name of every rebuilt frame: how the parent tells them apart.
WORKER_FRAME_MODULE = "<worker>"


def traceback_from(
    frames: Iterable[tuple[str, int, str, int]],
) -> types.TracebackType | None:
    """A traceback through (filename, lineno, name, firstlineno) frames, outermost first."""
    records = tuple(
        _FrameRecord(filename, lineno, name, first, False, None, None, None, ())
        for filename, lineno, name, first in frames
    )
    return _rebuild_traceback(records)


def _rebuild_traceback(frames: tuple[_FrameRecord, ...]) -> types.TracebackType | None:
    """A traceback through the worker's frames, or None if one cannot be built."""
    tb = None
    try:
        for frame in reversed(frames):
            tb = _traceback_entry(frame, tb)
    except Exception:
        return None
    return tb


class _Shown:
    """Stands for a worker value in a rebuilt frame: its repr is the worker's."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _traceback_entry(
    record: _FrameRecord, tb_next: types.TracebackType | None
) -> types.TracebackType:
    first = max(record.firstlineno, 1)
    # The code's body goes on the failing line. Where it cannot (a line before
    # the def line, or absurdly far below it) it goes on the def line: pytest
    # reads tb_lineno anyway, and only Python's traceback module shows `first`.
    at = record.lineno if first <= record.lineno <= first + _MAX_SPAN else first
    arguments = record.arguments if _usable_names(n for n, _ in record.arguments) else ()
    names = tuple(name for name, _ in arguments)
    code, lasti = _code_at(record.filename, first, at, record.name, _position(record, at), names)
    namespace: dict[str, object] = {"__name__": WORKER_FRAME_MODULE, "__file__": record.filename}
    if record.hidden:
        namespace["__tracebackhide__"] = True
    generator = types.FunctionType(code, namespace)(*[_Shown(text) for _, text in arguments])
    lineno = record.lineno if record.lineno >= 1 else at
    return types.TracebackType(tb_next, generator.gi_frame, lasti, lineno)


def _usable_names(names: Iterable[str]) -> bool:
    """Whether names can be a def's parameters (a comprehension's ``.0`` cannot)."""
    seen: set[str] = set()
    for name in names:
        if not name.isidentifier() or keyword.iskeyword(name) or name in seen:
            return False
        seen.add(name)
    return True


def _position(record: _FrameRecord, at: int) -> _Position | None:
    """The worker's position of the failing instruction, if complete and sane."""
    end, col, end_col = record.end_lineno, record.colno, record.end_colno
    if at != record.lineno or end is None or col is None or end_col is None:
        return None
    if end < at or col < 0 or end_col < 0:
        return None
    return (at, end, col, end_col)


# Farthest a failing line may sit below its def line and still be compiled
# there (each line between costs a character of source).
_MAX_SPAN = 100_000


def _compile_code(
    filename: str,
    first: int,
    lineno: int,
    name: str,
    position: _Position | None,
    parameters: tuple[str, ...],
) -> tuple[types.CodeType, int]:
    # A def whose body sits `lineno - first` lines below it (on the def line
    # when they are equal), compiled at line 1 and then moved to `first`:
    # every line number a code object holds counts from co_firstlineno.
    source = f"def _({', '.join(parameters)}):" + "\n" * (lineno - first) + " yield\n"
    module = compile(source, filename, "exec", dont_inherit=True)
    code = next(c for c in module.co_consts if isinstance(c, types.CodeType))
    code = code.replace(co_firstlineno=first)
    if sys.version_info >= (3, 11):
        code = code.replace(co_name=name, co_qualname=name)
    else:
        code = code.replace(co_name=name)
    offset = next(start for start, line in dis.findlinestarts(code) if line == lineno)
    return _with_position(code, offset // 2, position), offset


# (code, offset of an instruction on lineno) of a generator function named
# name; the same worker frame recurs across tests, so each is compiled once.
_code_at = functools.lru_cache(maxsize=2048)(_compile_code)


def _with_position(code: types.CodeType, unit: int, position: _Position | None) -> types.CodeType:
    """Python 3.11+: code whose locations carry no columns, but position at one instruction.

    The compiled columns point into the blank-padded source, so Python's
    traceback and pytest would draw carets under the wrong characters of the
    real line. The result is checked, and code returned unchanged if the
    location table format is not the one this writes.
    """
    if sys.version_info < (3, 11):
        return code
    wanted: list[_Position] = [(line, line, None, None) for line, *_ in code.co_positions()]
    if position is not None:
        wanted[unit] = position
    try:
        changed = code.replace(co_linetable=_location_table(wanted, code.co_firstlineno))
        if list(changed.co_positions()) == wanted:
            return changed
    except Exception:
        pass
    return code


def _location_table(units: list[_Position], first: int) -> bytes:
    """A CPython 3.11+ location table (Objects/locations.md) with one position per code unit."""
    table = bytearray()
    line = first
    for position, group in itertools.groupby(units):
        count = len(list(group))
        start, end, col, end_col = position
        while count:
            n = min(count, 8)  # an entry covers at most 8 code units
            count -= n
            if start is None:
                table.append(0xF8 | (n - 1))  # kind 15: no location
                continue
            if end is None or col is None or end_col is None:
                table.append(0xE8 | (n - 1))  # kind 13: a line, no columns
                _put_svarint(table, start - line)
            else:
                table.append(0xF0 | (n - 1))  # kind 14: lines and columns
                _put_svarint(table, start - line)
                _put_varint(table, end - start)
                _put_varint(table, col + 1)
                _put_varint(table, end_col + 1)
            line = start
    return bytes(table)


def _put_varint(table: bytearray, value: int) -> None:
    # Six bits a byte, low bits first; 0x40 marks that more bytes follow.
    while value >= 0x40:
        table.append(0x40 | (value & 0x3F))
        value >>= 6
    table.append(value)


def _put_svarint(table: bytearray, value: int) -> None:
    _put_varint(table, (-value << 1) | 1 if value < 0 else value << 1)
