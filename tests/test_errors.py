"""Exception serialization in the worker and revival in the parent."""

from __future__ import annotations

import builtins
import datetime
import decimal
import enum
import errno
import marshal
import os
import reprlib
import subprocess
import sys
import textwrap
import threading
import traceback
import types
from pathlib import Path
from typing import Any, Callable

import pytest

import pytest_subproc
from pytest_subproc import ChildTraceException, UnserializableException, _errors
from pytest_subproc._errors import (
    TEXT_LIMIT,
    child_traceback_text,
    dump_exception,
    load_exception,
)

PACKAGE_ROOT = Path(pytest_subproc.__file__).resolve().parent.parent
HERE = Path(__file__).resolve()


def raised(action: Callable[[], object]) -> BaseException:
    """The exception action raises, with its traceback."""
    try:
        action()
    except BaseException as exc:
        return exc
    raise AssertionError("nothing was raised")


def round_trip(exc: BaseException) -> BaseException:
    return load_exception(dump_exception(exc))


def record(exc: BaseException) -> dict[str, Any]:
    fields: dict[str, Any] = marshal.loads(dump_exception(exc))
    return fields


def line_of(marker: str) -> int:
    """The line number in this file of the line ending with the comment ``# marker``."""
    for number, line in enumerate(HERE.read_text().splitlines(), start=1):
        if line.rstrip().endswith(f"# {marker}"):
            return number
    raise LookupError(marker)


def raise_value_error(value: object) -> None:
    raise ValueError(value)


# --- classes the tests revive ---------------------------------------------------------


class CustomError(Exception):
    def __init__(self, code: int, detail: str = "none") -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


class Color(enum.Enum):
    RED = 1


class Count(int):
    pass


class Text(str):
    pass


class BadStrAndRepr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


class SkipInStr(Exception):
    def __str__(self) -> str:
        pytest.skip("str() of this exception skips")


class StrSubclassMessage(Exception):
    def __str__(self) -> str:
        return Text("a str subclass")


class BadReduce(Exception):
    def __reduce__(self) -> Any:
        raise RuntimeError("no reduce")


class BadArgs(Exception):
    @property
    def args(self) -> Any:  # type: ignore[override]
        raise RuntimeError("no args")


class NeedsKeyword(Exception):
    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.code = code


class Shapeshifter(Exception):
    def __reduce__(self) -> Any:
        return (ValueError, ("changed shape",))


class BadSetstate(Exception):
    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.state = "some"  # pickle calls __setstate__ only when there is state

    def __setstate__(self, state: Any) -> None:
        raise RuntimeError("no setstate")


class ModuleIsNotAString(Exception):
    pass


ModuleIsNotAString.__module__ = 42  # type: ignore[assignment]


def cause_cycle() -> BaseException:
    first, second = ValueError("first"), TypeError("second")
    first.__cause__ = second
    second.__cause__ = first
    return raised(lambda: raise_it(first))


def raise_it(exc: BaseException) -> None:
    raise exc


def with_unpicklable_attribute() -> BaseException:
    exc = ValueError("holds a lock")
    exc.lock = threading.Lock()  # type: ignore[attr-defined]
    return exc


# --- builtins -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad", 3),
        KeyError("key"),
        ZeroDivisionError("division by zero"),
        StopIteration(5),
        RecursionError("deep"),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
        SystemExit(3),
        SystemExit("leaving"),
        KeyboardInterrupt("interrupted"),
        GeneratorExit("closing"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_builtins_revive_as_their_own_type(exc: BaseException) -> None:
    """BaseException subclasses too: SystemExit and KeyboardInterrupt are no Exception."""
    revived = round_trip(raised(lambda: raise_it(exc)))
    assert type(revived) is type(exc)
    assert revived.args == exc.args
    assert str(revived) == str(exc)


def test_base_exception_subclasses_keep_their_attributes() -> None:
    """Revival keeps the instance's attributes, not only its args."""
    exit_ = SystemExit(7)
    exit_.detail = "why"  # type: ignore[attr-defined]
    revived = round_trip(raised(lambda: raise_it(exit_)))
    assert isinstance(revived, SystemExit)
    assert revived.code == 7
    assert revived.detail == "why"  # type: ignore[attr-defined]


def test_os_error_keeps_errno_filename_and_strerror(tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    exc = raised(lambda: missing.open())
    revived = round_trip(exc)
    assert type(revived) is FileNotFoundError
    assert isinstance(revived, OSError)
    assert revived.errno == errno.ENOENT
    assert revived.filename == str(missing)
    assert revived.strerror == os.strerror(errno.ENOENT)


def test_os_error_keeps_a_second_filename() -> None:
    exc = PermissionError(errno.EACCES, "denied", "/from", None, "/to")
    revived = round_trip(raised(lambda: raise_it(exc)))
    assert type(revived) is PermissionError
    assert (revived.filename, revived.filename2) == ("/from", "/to")


def test_notes_are_kept() -> None:
    exc = ValueError("noted")
    if sys.version_info >= (3, 11):
        exc.add_note("first note")
        exc.add_note("second note")
    else:
        vars(exc)["__notes__"] = ["first note", "second note"]
    revived = round_trip(raised(lambda: raise_it(exc)))
    assert getattr(revived, "__notes__", None) == ["first note", "second note"]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception groups are 3.11+")
def test_exception_group_revives_with_its_members() -> None:
    group_type = vars(builtins)["ExceptionGroup"]
    group = group_type("several", [ValueError("one"), KeyError("two")])
    revived = round_trip(raised(lambda: raise_it(group)))
    assert type(revived) is group_type
    assert [type(e) for e in revived.exceptions] == [ValueError, KeyError]  # type: ignore[attr-defined]
    assert "ValueError: one" in (child_traceback_text(revived) or "")


def test_custom_class_the_parent_has_revives_with_attributes() -> None:
    exc = CustomError(404, detail="not found")
    exc.extra = {"retry": False}  # type: ignore[attr-defined]
    revived = round_trip(raised(lambda: raise_it(exc)))
    assert type(revived) is CustomError
    assert (revived.code, revived.detail) == (404, "not found")
    assert revived.extra == {"retry": False}  # type: ignore[attr-defined]


# --- pytest's outcomes ----------------------------------------------------------------


def did_not_raise() -> None:
    with pytest.raises(ValueError, match="never"):
        pass


@pytest.mark.parametrize(
    ("action", "kind", "message"),
    [
        (lambda: pytest.skip("skipped in the worker"), pytest.skip.Exception, "skipped in"),
        (lambda: pytest.xfail("expected to fail"), pytest.xfail.Exception, "expected to"),
        (lambda: pytest.fail("failed", pytrace=False), pytest.fail.Exception, "failed"),
        (lambda: pytest.exit("bye", returncode=3), pytest.exit.Exception, "bye"),
        (
            lambda: pytest.importorskip("no_such_module_for_pytest_subproc"),
            pytest.skip.Exception,
            "no_such_module_for_pytest_subproc",
        ),
        (did_not_raise, pytest.fail.Exception, "DID NOT RAISE"),
    ],
    ids=["skip", "xfail", "fail", "exit", "importorskip", "did-not-raise"],
)
def test_pytest_outcomes_revive_as_themselves(
    action: Callable[[], object], kind: type[BaseException], message: str
) -> None:
    """pytest's outcomes are BaseException subclasses: they serialize like any exception."""
    exc = raised(action)
    assert type(exc) is kind
    fields = record(exc)
    assert fields["pickled"] is not None
    revived = load_exception(dump_exception(exc))
    assert type(revived) is kind
    assert message in revived.msg  # type: ignore[attr-defined]
    assert revived.msg == exc.msg  # type: ignore[attr-defined]


def test_outcome_fields_are_kept() -> None:
    skipped = round_trip(raised(lambda: pytest.importorskip("no_such_module_for_pytest_subproc")))
    assert skipped.allow_module_level is True  # type: ignore[attr-defined]
    failed = round_trip(raised(lambda: pytest.fail("quiet", pytrace=False)))
    assert failed.pytrace is False  # type: ignore[attr-defined]
    exited = round_trip(raised(lambda: pytest.exit("bye", returncode=3)))
    assert exited.returncode == 3  # type: ignore[attr-defined]


def test_outcomes_that_claim_to_live_in_builtins_still_pickle() -> None:
    # pytest sets __module__ = "builtins" on Skipped and Failed, so plain
    # pickle cannot find them by name.
    exc = raised(lambda: pytest.skip("x"))
    fields = record(exc)
    assert (fields["module"], fields["qualname"]) == ("builtins", "Skipped")
    assert fields["pickled"] is not None


# --- what cannot be revived -----------------------------------------------------------


def test_class_the_parent_has_not_imported_becomes_unserializable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = types.ModuleType("pytest_subproc_tests_ephemeral")
    exec("class GoneError(Exception):\n    pass\n", vars(module))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    data = dump_exception(raised(lambda: raise_it(module.GoneError("gone", 1))))
    monkeypatch.delitem(sys.modules, module.__name__)

    revived = load_exception(data)
    assert type(revived) is UnserializableException
    assert revived.type_name == "pytest_subproc_tests_ephemeral.GoneError"
    assert revived.args_repr == "('gone', 1)"
    assert revived.message == "('gone', 1)"
    assert str(revived) == "pytest_subproc_tests_ephemeral.GoneError: ('gone', 1)"
    assert isinstance(revived.__cause__, ChildTraceException)


def test_a_different_class_under_the_recorded_name_is_not_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = types.ModuleType("pytest_subproc_tests_renamed")
    exec("class Original(Exception):\n    pass\n", vars(module))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    data = dump_exception(raised(lambda: raise_it(module.Original("x"))))
    # Here the name now leads to a factory of another type.
    vars(module)["Original"] = lambda *args: KeyError(*args)

    revived = load_exception(data)
    assert type(revived) is UnserializableException
    assert revived.type_name == "pytest_subproc_tests_renamed.Original"


# --- hostile exceptions ---------------------------------------------------------------


HOSTILE: list[tuple[str, Callable[[], BaseException]]] = [
    ("str-and-repr-raise", lambda: BadStrAndRepr("x")),
    ("str-raises-an-outcome", lambda: SkipInStr("x")),
    ("str-returns-a-subclass", lambda: StrSubclassMessage("x")),
    ("reduce-raises", lambda: BadReduce("x")),
    ("args-raise", lambda: BadArgs("x")),
    ("lambda-arg", lambda: ValueError(lambda: 1)),
    ("lock-arg", lambda: ValueError(threading.Lock())),
    ("required-keyword", lambda: NeedsKeyword("needs a code", code=5)),
    ("changes-type", lambda: Shapeshifter("x")),
    ("setstate-raises", lambda: BadSetstate("x")),
    ("module-not-a-string", lambda: ModuleIsNotAString("x")),
    ("unpicklable-dict", with_unpicklable_attribute),
    ("generator-arg", lambda: ValueError(i for i in range(3))),
    ("frame-arg", lambda: ValueError(sys._getframe())),
]


@pytest.mark.parametrize("make", [make for _, make in HOSTILE], ids=[i for i, _ in HOSTILE])
def test_hostile_exceptions_never_break_the_round_trip(make: Callable[[], BaseException]) -> None:
    exc = make()
    data = dump_exception(raised(lambda: raise_it(exc)))
    revived = load_exception(data)
    assert isinstance(revived, BaseException)
    assert isinstance(revived.__cause__, ChildTraceException)
    assert revived.__suppress_context__
    text = child_traceback_text(revived)
    assert text is not None
    assert "raise exc" in text


def test_failing_str_and_repr_are_reported_not_raised() -> None:
    fields = record(raised(lambda: raise_it(BadStrAndRepr("x"))))
    assert fields["message"] == "<str() failed: RuntimeError>"
    assert "BadStrAndRepr" in fields["traceback_text"]
    # Pickle needs neither, so the instance itself still comes back.
    assert type(load_exception(dump_exception(BadStrAndRepr("x")))) is BadStrAndRepr


def test_outcome_raised_from_str_is_caught() -> None:
    fields = record(SkipInStr("x"))
    assert fields["message"] == "<str() failed: Skipped>"


def test_str_subclass_message_is_sent_as_plain_str() -> None:
    assert record(StrSubclassMessage("x"))["message"] == "a str subclass"


def test_class_whose_module_is_not_a_string_is_found_by_its_home() -> None:
    fields = record(ModuleIsNotAString("odd"))
    assert (fields["module"], fields["qualname"]) == ("?", "ModuleIsNotAString")
    revived = load_exception(dump_exception(ModuleIsNotAString("odd")))
    assert type(revived) is ModuleIsNotAString


def test_dump_answers_even_when_everything_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_memory(exc: BaseException) -> None:
        raise MemoryError

    monkeypatch.setattr(_errors, "_record", out_of_memory)
    revived = load_exception(dump_exception(ValueError("x")))
    assert type(revived) is UnserializableException
    assert revived.type_name == "builtins.ValueError"
    assert revived.message == "the exception could not be serialized: MemoryError"


def test_failing_args_are_reported() -> None:
    fields = record(BadArgs("x"))
    assert fields["args_repr"] == "<repr() of args failed: RuntimeError>"


@pytest.mark.parametrize(
    ("make", "type_name", "in_args"),
    [
        (lambda: BadReduce("x"), f"{__name__}.BadReduce", "'x'"),
        (lambda: ValueError(lambda: 1), "builtins.ValueError", "<function"),
        (lambda: ValueError(threading.Lock()), "builtins.ValueError", "lock"),
        (lambda: Shapeshifter("x"), f"{__name__}.Shapeshifter", "'x'"),
        (lambda: BadSetstate("x"), f"{__name__}.BadSetstate", "'x'"),
        (lambda: LockInMessage(threading.Lock()), f"{__name__}.LockInMessage", "()"),
        (lambda: OwnErrno("/gone"), f"{__name__}.OwnErrno", "'gone'"),
    ],
    ids=["reduce", "lambda", "lock", "shape", "setstate", "message-needs-it", "errno-by-init"],
)
def test_what_does_not_round_trip_becomes_unserializable(
    make: Callable[[], BaseException], type_name: str, in_args: str
) -> None:
    exc = make()
    assert record(exc)["pickled"] is None
    revived = load_exception(dump_exception(exc))
    assert type(revived) is UnserializableException
    assert revived.type_name == type_name
    assert in_args in revived.args_repr


# --- what revives without all of its parts ---------------------------------------


def test_unpicklable_attributes_are_dropped_and_the_type_kept() -> None:
    exc = with_unpicklable_attribute()
    exc.detail = "kept"  # type: ignore[attr-defined]
    revived = round_trip(raised(lambda: raise_it(exc)))
    assert type(revived) is ValueError
    assert revived.args == ("holds a lock",)
    assert vars(revived) == {"detail": "kept"}
    assert isinstance(revived.__cause__, ChildTraceException)


def test_outcome_with_an_unpicklable_attribute_keeps_its_fields() -> None:
    exc = raised(lambda: pytest.fail("quiet", pytrace=False))
    exc.lock = threading.Lock()  # type: ignore[attr-defined]
    revived = round_trip(exc)
    assert type(revived) is pytest.fail.Exception
    assert revived.pytrace is False  # type: ignore[attr-defined]
    assert not hasattr(revived, "lock")


class FrozenError(AttributeError):
    """The shape of attrs' FrozenAttributeError: __init__ does not take its own args."""

    def __init__(self) -> None:
        super().__init__("can't set attribute")
        self.calls = getattr(self, "calls", 0) + 1


def test_an_init_that_does_not_take_its_args_revives_without_being_called() -> None:
    revived = round_trip(raised(lambda: raise_it(FrozenError())))
    assert type(revived) is FrozenError
    assert revived.args == ("can't set attribute",)
    assert str(revived) == "can't set attribute"
    assert revived.calls == 1  # type: ignore[attr-defined]


def test_a_required_keyword_revives_from_the_attributes() -> None:
    revived = round_trip(raised(lambda: raise_it(NeedsKeyword("needs a code", code=5))))
    assert type(revived) is NeedsKeyword
    assert (revived.args, revived.code) == (("needs a code",), 5)  # type: ignore[attr-defined]


def test_no_argument_init_and_unpicklable_attribute_together() -> None:
    exc = FrozenError()
    exc.lock = threading.Lock()  # type: ignore[attr-defined]
    revived = round_trip(raised(lambda: raise_it(exc)))
    assert type(revived) is FrozenError
    assert vars(revived) == {"calls": 1}


class LockInMessage(Exception):
    """Its message is made of the attribute that cannot travel."""

    def __init__(self, lock: Any) -> None:
        super().__init__()
        self.lock = lock

    def __str__(self) -> str:
        return f"held: {self.lock.locked()}"


class OwnErrno(FileNotFoundError):
    """Its errno is set by an __init__ that does not take its own args."""

    def __init__(self, path: str) -> None:
        super().__init__(errno.ENOENT, "gone", path)


def test_a_rebuilt_exception_must_read_the_same() -> None:
    # Without the lock, or without __init__ (whose args set errno), str()
    # would change: the stand-in keeps the message instead.
    for exc in (LockInMessage(threading.Lock()), OwnErrno("/gone")):
        assert record(exc)["pickled"] is None
        revived = load_exception(dump_exception(exc))
        assert type(revived) is UnserializableException
        assert revived.message == str(exc)


def test_cause_cycle_is_serialized() -> None:
    exc = cause_cycle()
    fields = record(exc)
    assert "ValueError: first" in fields["traceback_text"]
    assert "TypeError: second" in fields["traceback_text"]
    revived = load_exception(dump_exception(exc))
    assert type(revived) is ValueError
    assert isinstance(revived.__cause__, ChildTraceException)


def test_ten_megabyte_message_survives() -> None:
    message = "m" * 10_000_000
    exc = raised(lambda: raise_value_error(message))
    fields = record(exc)
    assert len(fields["message"]) <= TEXT_LIMIT
    assert "characters truncated" in fields["message"]
    assert len(fields["traceback_text"]) <= TEXT_LIMIT
    assert len(fields["args_repr"]) <= TEXT_LIMIT
    revived = load_exception(dump_exception(exc))
    assert type(revived) is ValueError
    assert revived.args == (message,)


def test_ten_megabyte_message_that_cannot_pickle_is_clipped() -> None:
    exc = ValueError("m" * 10_000_000, threading.Lock())
    revived = load_exception(dump_exception(raised(lambda: raise_it(exc))))
    assert type(revived) is UnserializableException
    assert len(revived.message) <= TEXT_LIMIT
    assert len(revived.args_repr) <= TEXT_LIMIT
    assert revived.message.startswith("('mmm")
    assert "characters truncated" in revived.message
    assert revived.message.endswith(">)")


def test_clip_keeps_head_and_tail() -> None:
    assert _errors._clip("a" * 100, limit=100) == "a" * 100
    clipped = _errors._clip("h" * 100 + "t" * 100, limit=100)
    assert len(clipped) <= 100
    assert clipped.startswith("h" * 18)
    assert clipped.endswith("t" * 18)
    assert "[164 characters truncated]" in clipped


def test_undecodable_data_gives_a_stand_in() -> None:
    for data in (b"", b"not marshal data", marshal.dumps({"module": 1})):
        revived = load_exception(data)
        assert type(revived) is UnserializableException
        assert "could not be decoded" in revived.message


def test_malformed_frames_drop_the_traceback_only() -> None:
    fields = record(raised(lambda: raise_value_error("x")))
    fields["frames"] = (("file", "not a line", "name", 1, False, None, None, None, ()),)
    revived = load_exception(marshal.dumps(fields))
    assert type(revived) is ValueError
    assert revived.__traceback__ is None


# --- the worker's traceback -----------------------------------------------------------


def helper_that_raises(value: int) -> None:
    total = value * 2
    raise ValueError(f"helper got {total}")  # helper-raise


def caller_of_helper() -> None:
    helper_that_raises(21)  # caller-call


def test_cause_is_the_child_traceback_with_source_lines() -> None:
    revived = round_trip(raised(caller_of_helper))
    assert isinstance(revived.__cause__, ChildTraceException)
    assert revived.__suppress_context__ is True
    text = child_traceback_text(revived)
    assert text == str(revived.__cause__)
    assert text is not None
    assert text.startswith("Traceback (most recent call last):")
    assert 'raise ValueError(f"helper got {total}")  # helper-raise' in text
    assert text.rstrip().endswith("ValueError: helper got 42")


def test_child_traceback_text_is_none_for_other_exceptions() -> None:
    assert child_traceback_text(ValueError("plain")) is None
    chained = ValueError("chained")
    chained.__cause__ = KeyError("k")
    assert child_traceback_text(chained) is None


def test_traceback_text_is_formatted_on_every_version() -> None:
    """The removed etype= keyword of traceback.print_exception must not be used."""
    text = record(raised(caller_of_helper))["traceback_text"]
    assert "could not be formatted" not in text
    assert "helper_that_raises(21)  # caller-call" in text


def test_formatting_failure_gives_a_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> list[str]:
        raise RuntimeError("formatter broke")

    monkeypatch.setattr(traceback, "format_exception", broken)
    text = record(raised(caller_of_helper))["traceback_text"]
    assert "the traceback could not be formatted: RuntimeError: formatter broke" in text
    assert "builtins.ValueError: helper got 42" in text


def test_rebuilt_frames_point_at_the_real_source() -> None:
    original = raised(caller_of_helper)
    revived = round_trip(original)
    summaries = traceback.extract_tb(revived.__traceback__)
    assert [s.name for s in summaries] == ["raised", "caller_of_helper", "helper_that_raises"]
    assert [s.filename for s in summaries] == [str(HERE)] * 3
    assert summaries[1].lineno == line_of("caller-call")
    assert summaries[2].lineno == line_of("helper-raise")
    assert summaries[2].line == 'raise ValueError(f"helper got {total}")  # helper-raise'
    tb = revived.__traceback__
    assert tb is not None
    codes = []
    while tb is not None:
        codes.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    assert [c.co_firstlineno for c in codes] == [
        raised.__code__.co_firstlineno,
        caller_of_helper.__code__.co_firstlineno,
        helper_that_raises.__code__.co_firstlineno,
    ]
    assert [c.co_name for c in codes] == [s.name for s in summaries]
    if sys.version_info >= (3, 11):
        assert [c.co_qualname for c in codes] == [s.name for s in summaries]


def test_rebuilt_traceback_formats_like_the_original() -> None:
    """Same lines and, on 3.11+, the same carets as the worker's own traceback."""
    original = raised(caller_of_helper)
    revived = round_trip(original)
    assert traceback.format_tb(revived.__traceback__) == traceback.format_tb(original.__traceback__)
    if sys.version_info >= (3, 11):
        columns = [
            (s.lineno, s.end_lineno, s.colno, s.end_colno)
            for s in traceback.extract_tb(revived.__traceback__)
        ]
        assert columns == [
            (s.lineno, s.end_lineno, s.colno, s.end_colno)
            for s in traceback.extract_tb(original.__traceback__)
        ]


def test_rebuilt_frames_are_not_tied_to_the_parent_stack() -> None:
    revived = round_trip(raised(caller_of_helper))
    tb = revived.__traceback__
    while tb is not None:
        assert tb.tb_frame.f_back is None
        assert tb.tb_frame.f_globals["__file__"] == str(HERE)
        tb = tb.tb_next


def test_rebuilt_frames_are_marked_as_the_worker_s() -> None:
    revived = round_trip(raised(caller_of_helper))
    tb = revived.__traceback__
    assert tb is not None
    assert tb.tb_frame.f_globals["__name__"] == _errors.WORKER_FRAME_MODULE


def test_traceback_from_plain_frames() -> None:
    first = helper_that_raises.__code__.co_firstlineno
    tb = _errors.traceback_from([(str(HERE), line_of("helper-raise"), "helper_that_raises", first)])
    assert tb is not None
    assert tb.tb_frame.f_code.co_firstlineno == first
    (summary,) = traceback.extract_tb(tb)
    assert (summary.name, summary.line) == (
        "helper_that_raises",
        'raise ValueError(f"helper got {total}")  # helper-raise',
    )


def run_as_machinery(action: Callable[[], object], name: str) -> BaseException:
    """Call action from a catching frame whose module is named name, as the worker loop does."""
    namespace: dict[str, Any] = {"__name__": name}
    source = "def run(action):\n    try:\n        action()\n    except BaseException as exc:\n"
    exec(compile(source + "        return exc\n", "<machinery>", "exec"), namespace)
    exc: BaseException = namespace["run"](action)
    return exc


@pytest.mark.parametrize("name", ["pytest_subproc", "pytest_subproc._child"])
def test_leading_frames_of_the_worker_machinery_are_skipped(name: str) -> None:
    exc = run_as_machinery(caller_of_helper, name)
    fields = record(exc)
    assert [row[2] for row in fields["frames"]] == ["caller_of_helper", "helper_that_raises"]
    assert "<machinery>" not in fields["traceback_text"]
    revived = load_exception(dump_exception(exc))
    names = [s.name for s in traceback.extract_tb(revived.__traceback__)]
    assert names == ["caller_of_helper", "helper_that_raises"]


def test_only_the_package_itself_counts_as_machinery() -> None:
    exc = run_as_machinery(caller_of_helper, "pytest_subprocess_other")
    assert [row[2] for row in record(exc)["frames"]] == [
        "run",
        "caller_of_helper",
        "helper_that_raises",
    ]


def test_all_machinery_frames_are_kept_rather_than_none() -> None:
    namespace: dict[str, Any] = {"__name__": "pytest_subproc._child"}
    exec(compile("def boom():\n    1 / 0\n", "<machinery>", "exec"), namespace)
    exc = run_as_machinery(namespace["boom"], "pytest_subproc._child")
    assert [row[2] for row in record(exc)["frames"]] == ["run", "boom"]
    assert "<machinery>" in record(exc)["traceback_text"]


def hidden_helper() -> None:
    __tracebackhide__ = True
    raise ValueError("from a hidden helper")


def test_hidden_frames_stay_hidden() -> None:
    revived = round_trip(raised(hidden_helper))
    tb = revived.__traceback__
    assert tb is not None
    assert tb.tb_next is not None
    assert "__tracebackhide__" not in tb.tb_frame.f_globals
    assert tb.tb_next.tb_frame.f_globals["__tracebackhide__"] is True


def hidden_by_a_callable() -> None:
    __tracebackhide__ = lambda excinfo: True  # noqa: E731
    raise ValueError("shown: the worker cannot call the filter")


def test_callable_tracebackhide_is_not_applied() -> None:
    revived = round_trip(raised(hidden_by_a_callable))
    tb = revived.__traceback__
    assert tb is not None
    assert tb.tb_next is not None
    assert "__tracebackhide__" not in tb.tb_next.tb_frame.f_globals


class ReprRaises:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def takes_arguments(number: object, *rest: object, flag: bool = False, **extra: object) -> None:
    raise ValueError("with arguments")


def test_frames_carry_the_reprs_of_their_arguments() -> None:
    exc = raised(lambda: takes_arguments(7, "a", ReprRaises(), flag=True, key=[1, 2]))
    tb = round_trip(exc).__traceback__
    while tb is not None and tb.tb_frame.f_code.co_name != "takes_arguments":
        tb = tb.tb_next
    assert tb is not None
    shown = {name: repr(value) for name, value in tb.tb_frame.f_locals.items()}
    assert list(shown) == ["number", "flag", "rest", "extra"]
    assert shown["number"] == "7"
    assert shown["flag"] == "True"
    assert shown["rest"].startswith("('a', <[RuntimeError('no repr') raised in repr()] ReprRaises")
    assert shown["extra"] == "{'key': [1, 2]}"


def test_argument_reprs_without_pytest_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker only uses pytest's saferepr when pytest is already imported.
    monkeypatch.setitem(sys.modules, "_pytest._io.saferepr", None)
    exc = raised(lambda: takes_arguments("x" * 1000))
    frames = record(exc)["frames"]
    assert frames[-1][-1] == (
        ("number", reprlib.repr("x" * 1000)),
        ("flag", "False"),
        ("rest", "()"),
        ("extra", "{}"),
    )


def fail_in_comprehension() -> list[int]:
    return [1 // value for value in (1, 0)]


def test_comprehension_frames_revive() -> None:
    """A comprehension's frame (before 3.12) has an argument named ``.0``."""
    exc = raised(fail_in_comprehension)
    revived = round_trip(exc)
    assert traceback.format_tb(revived.__traceback__) == traceback.format_tb(exc.__traceback__)


def test_module_level_and_lambda_frames(tmp_path: Path) -> None:
    path = tmp_path / "module_like.py"
    path.write_text("x = 1\nfail = lambda: 1 / 0\nfail()\n")
    code = compile(path.read_text(), str(path), "exec")
    exc = raised(lambda: exec(code, {"__name__": "module_like"}))
    revived = round_trip(exc)
    summaries = traceback.extract_tb(revived.__traceback__)[-2:]
    assert [(s.name, s.lineno, s.line) for s in summaries] == [
        ("<module>", 3, "fail()"),
        ("<lambda>", 2, "fail = lambda: 1 / 0"),
    ]
    assert traceback.format_tb(revived.__traceback__) == traceback.format_tb(exc.__traceback__)


@pytest.mark.parametrize(
    ("lineno", "first", "compiled_at"),
    [
        (10, 10, 10),
        (12, 10, 12),
        (5, 10, 10),
        (0, 10, 10),
        (100_003, 3, 100_003),
        (10**8 + 2, 10**8, 10**8 + 2),
        (500_000, 1, 1),
    ],
    ids=["on-def-line", "after-def", "before-def", "unknown", "far", "huge", "too-far"],
)
def test_unusual_line_numbers(lineno: int, first: int, compiled_at: int) -> None:
    fields = record(ValueError("x"))
    row = ("/nowhere/odd.py", lineno, "<odd name>", first, False, None, None, None, ())
    fields["frames"] = (row,)
    revived = load_exception(marshal.dumps(fields))
    tb = revived.__traceback__
    assert tb is not None
    assert tb.tb_frame.f_code.co_firstlineno == first
    assert tb.tb_frame.f_code.co_name == "<odd name>"
    assert tb.tb_frame.f_code.co_filename == "/nowhere/odd.py"
    assert tb.tb_lineno == (lineno if lineno >= 1 else first)
    # Python's own traceback reads the code's line from 3.11 on, tb_lineno before.
    shown = compiled_at if sys.version_info >= (3, 11) else tb.tb_lineno
    assert traceback.extract_tb(tb)[0].lineno == shown


def test_compiled_frames_are_cached() -> None:
    _errors._code_at.cache_clear()
    data = dump_exception(raised(caller_of_helper))
    load_exception(data)
    size = _errors._code_at.cache_info().currsize
    assert size == 3
    load_exception(data)
    assert _errors._code_at.cache_info().currsize == size


def test_failure_to_rebuild_frames_keeps_the_revival(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("cannot compile")

    monkeypatch.setattr(_errors, "_code_at", broken)
    revived = round_trip(raised(caller_of_helper))
    assert type(revived) is ValueError
    assert revived.__traceback__ is None
    assert "helper got 42" in (child_traceback_text(revived) or "")


# --- values that marshal alone would lose ---------------------------------------------


def test_rich_args_survive_with_their_types() -> None:
    """datetime, Decimal, enums, int subclasses and bytearray travel by pickle, not marshal."""
    args = (
        datetime.datetime(2024, 5, 17, 12, 30),
        datetime.date(2024, 5, 17),
        decimal.Decimal("1.50"),
        Color.RED,
        Count(3),
        bytearray(b"\x00\x01"),
        {"set": {1, 2}},
    )
    revived = round_trip(raised(lambda: raise_it(ValueError(*args))))
    assert revived.args == args
    assert [type(a) for a in revived.args] == [type(a) for a in args]


# --- in a real worker process ---------------------------------------------------------

CHILD_TAIL = """
import sys
from pytest_subproc._errors import dump_exception
try:
    trigger()
except BaseException as exc:
    sys.stdout.buffer.write(dump_exception(exc))
"""


def dump_in_child(tmp_path: Path, source: str, *path: Path) -> bytes:
    """Run source (which defines trigger()) in a fresh Python; return what it dumps."""
    script = tmp_path / "child_script.py"
    script.write_text(textwrap.dedent(source) + CHILD_TAIL)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (PACKAGE_ROOT, *path))
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, env=env, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


def test_class_defined_only_in_the_child_becomes_unserializable(tmp_path: Path) -> None:
    data = dump_in_child(
        tmp_path,
        """
        class OnlyInChild(Exception):
            pass

        def trigger():
            raise OnlyInChild("from the child", 7)
        """,
    )
    revived = load_exception(data)
    assert type(revived) is UnserializableException
    assert revived.type_name == "__main__.OnlyInChild"
    assert revived.args_repr == "('from the child', 7)"
    assert revived.message == "('from the child', 7)"
    text = child_traceback_text(revived)
    assert text is not None
    assert 'raise OnlyInChild("from the child", 7)' in text
    summary = traceback.extract_tb(revived.__traceback__)[-1]
    assert (summary.name, summary.line) == ("trigger", 'raise OnlyInChild("from the child", 7)')


def test_revival_never_imports_a_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    library = tmp_path / "lib"
    library.mkdir()
    (library / "pytest_subproc_tests_lazy.py").write_text("class LazyError(Exception):\n    pass\n")
    data = dump_in_child(
        tmp_path,
        """
        import pytest_subproc_tests_lazy

        def trigger():
            raise pytest_subproc_tests_lazy.LazyError("lazy")
        """,
        library,
    )
    # The parent could import it, but must not.
    monkeypatch.syspath_prepend(str(library))
    revived = load_exception(data)
    assert "pytest_subproc_tests_lazy" not in sys.modules
    assert type(revived) is UnserializableException
    assert revived.type_name == "pytest_subproc_tests_lazy.LazyError"


def test_the_worker_side_does_not_import_pytest() -> None:
    script = "import sys, pytest_subproc._errors; print(sorted(sys.modules))"
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, env=env, timeout=60, check=True
    )
    loaded = proc.stdout.decode()
    assert "'pytest_subproc._errors'" in loaded
    assert "'pytest'" not in loaded
    assert "'_pytest" not in loaded
    assert "'pluggy'" not in loaded


def test_outcomes_and_builtins_from_a_child_revive(tmp_path: Path) -> None:
    data = dump_in_child(
        tmp_path,
        """
        import pytest

        def trigger():
            pytest.skip("skipped in a child")
        """,
    )
    revived = load_exception(data)
    assert type(revived) is pytest.skip.Exception
    assert revived.msg == "skipped in a child"
    data = dump_in_child(tmp_path, "def trigger():\n    raise SystemExit(4)\n")
    revived = load_exception(data)
    assert type(revived) is SystemExit
    assert revived.code == 4


# --- how pytest renders a revived exception -------------------------------------------

CONFTEST = """
import pytest
from pytest_subproc._errors import dump_exception, load_exception

@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    # Run the test body, ship its exception through a dump and raise the revival.
    try:
        pyfuncitem.obj()
    except BaseException as exc:
        data = dump_exception(exc)
    else:
        return True
    raise load_exception(data)
"""

TEST_MODULE = """
import pytest

def helper(value):
    total = value * 2
    raise ValueError(f"helper got {total}")

def double(value):
    return value * 2

def check(value):
    __tracebackhide__ = True
    if value != 3:
        pytest.fail(f"bad value {value}")

def test_helper_fails():
    helper(21)

def test_assertion():
    assert double(2) == 5

def test_hidden_helper():
    check(4)

def test_skips():
    pytest.skip("skipped through a dump")
"""


@pytest.fixture
def pytester(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    # The inner runs need no installed plugin (this one included): keep them plain and quick.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    return pytester


def test_pytest_renders_the_worker_frames(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_render=TEST_MODULE)
    result = pytester.runpytest("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(failed=3, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_helper_fails _*",
            "    def test_helper_fails():",
            ">       helper(21)",
            "",
            "test_render.py:16: ",
            "_ _ _ *",
            "",
            "value = 21",
            "",
            "    def helper(value):",
            "        total = value * 2",
            '>       raise ValueError(f"helper got {total}")',
            "E       ValueError: helper got 42",
            "",
            "test_render.py:5: ValueError",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*_ test_assertion _*",
            "    def test_assertion():",
            ">       assert double(2) == 5",
            "E       assert 4 == 5",
            "E        +  where 4 = double(2)",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*_ test_hidden_helper _*",
            "    def test_hidden_helper():",
            ">       check(4)",
            "E       Failed: bad value 4",
        ]
    )
    result.stdout.no_fnmatch_line("*if value != 3:*")
    # The frames of the hook that ran the body and raised the revival are cut.
    result.stdout.no_fnmatch_line(">*pyfuncitem.obj()")
    result.stdout.no_fnmatch_line("*raise load_exception(data)")
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] test_render.py:*: skipped through a dump"])


def failure_sections(lines: list[str]) -> dict[str, list[str]]:
    """Each failed test's section of a report; for a revival, only the part after its cause."""
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for line in lines:
        if line.startswith("=") and sections:
            break
        header = line.strip("_ ")
        if line.startswith("____") and header:
            current = sections.setdefault(header, [])
        elif line == "The above exception was the direct cause of the following exception:":
            current.clear()
        else:
            current.append(line)
    return sections


@pytest.mark.parametrize("style", ["long", "short", "auto"])
def test_pytest_report_matches_an_in_process_run(pytester: pytest.Pytester, style: str) -> None:
    pytester.makepyfile(test_render=TEST_MODULE)
    native = pytester.runpytest("-p", "no:cacheprovider", f"--tb={style}")
    pytester.makeconftest(CONFTEST)
    revived = pytester.runpytest("-p", "no:cacheprovider", f"--tb={style}")
    expected = failure_sections(native.outlines)
    assert sorted(expected) == ["test_assertion", "test_helper_fails", "test_hidden_helper"]
    assert failure_sections(revived.outlines) == expected


def test_pytest_native_style_shows_the_worker_lines(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_render=TEST_MODULE)
    result = pytester.runpytest("-p", "no:cacheprovider", "--tb=native", "-k", "helper_fails")
    result.assert_outcomes(failed=1, deselected=3)
    result.stdout.fnmatch_lines(
        [
            "*The above exception was the direct cause of the following exception:",
            "Traceback (most recent call last):",
            '*File "*test_render.py", line 16, in test_helper_fails',
            "    helper(21)",
            '*File "*test_render.py", line 5, in helper',
            '    raise ValueError(f"helper got {total}")',
            "ValueError: helper got 42",
        ]
    )
