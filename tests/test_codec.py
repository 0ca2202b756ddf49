"""Values to and from message parts: large byte strings travel apart, exactly."""

from __future__ import annotations

import datetime
import decimal
import enum
import io
import pickle

import pytest

from pytest_subproc import _codec, _worker_items


class Colour(enum.Enum):
    RED = 1


def round_trip(value: object) -> tuple[object, list[bytearray]]:
    parts = [bytearray(p) for p in _codec.dumps(value)]
    return _codec.loads(parts), parts


@pytest.mark.parametrize(
    "value",
    [None, 0, "text", (1, [2, {3: b"x"}]), datetime.date(2026, 1, 2), decimal.Decimal("1.5")],
)
def test_small_values_are_one_part(value: object) -> None:
    back, parts = round_trip(value)
    assert back == value
    assert len(parts) == 1


def test_large_byte_strings_travel_apart_and_keep_their_type() -> None:
    big, mutable = bytes(range(256)) * 1024, bytearray(b"m" * (1 << 17))
    back, parts = round_trip({"b": big, "a": mutable, "e": Colour.RED})
    assert [len(p) for p in parts[1:]] == [len(big), len(mutable)]
    assert type(back["b"]) is bytes
    assert back["b"] == big
    assert type(back["a"]) is bytearray
    assert back["a"] == mutable
    assert back["e"] is Colour.RED
    assert len(parts[0]) < 200  # the stream holds none of the data


def test_a_received_bytearray_is_its_part_no_copy() -> None:
    back, parts = round_trip(bytearray(1 << 17))
    assert back is parts[1]


def test_a_received_bytes_part_is_used_uncopied() -> None:
    parts = [bytes(p) for p in _codec.dumps(b"q" * (1 << 17))]
    assert _codec.loads(parts) is parts[1]


def test_the_same_object_twice_is_one_part_and_stays_one_object() -> None:
    big = b"z" * (1 << 17)
    back, parts = round_trip([big, big, bytearray(big)])
    assert len(parts) == 3
    assert back[0] is back[1]
    assert back[2] == big
    assert back[2] is not back[0]


class Tagged(bytes):
    pass


def test_byte_string_subclasses_keep_their_type() -> None:
    value = Tagged(b"t" * (1 << 17))
    back, _ = round_trip(value)
    assert type(back) is Tagged
    assert back == value


def test_a_large_value_without_byte_strings_is_still_one_part() -> None:
    # Past the size where the fast path gives up, the value is pickled again
    # with byte strings kept apart; there are none, so one part it is.
    value = [f"item {i}" for i in range(20_000)]
    back, parts = round_trip(value)
    assert back == value
    assert len(parts) == 1


def _replaced(*args: object, **kwargs: object) -> object:
    raise AssertionError("the codec called a function a test had replaced")


def test_the_codec_ignores_pickle_replaced_after_import(monkeypatch: pytest.MonkeyPatch) -> None:
    """A body that patches pickle and leaves it so breaks only itself."""
    small, large = {"a": [1, 2]}, {"b": bytes(1 << 17)}
    for name in ("dumps", "loads", "dump", "load", "Pickler", "Unpickler"):
        monkeypatch.setattr(pickle, name, _replaced)
    monkeypatch.setattr(io, "BytesIO", _replaced)
    (small_back, small_parts), (large_back, large_parts) = round_trip(small), round_trip(large)
    monkeypatch.undo()
    assert (small_back, len(small_parts)) == (small, 1)
    assert (large_back, len(large_parts)) == (large, 2)


def test_the_configuration_spec_is_rebuilt_only_when_it_changes() -> None:
    """Sent with every request, the spec is read once per worker: later copies give that one."""
    spec = _worker_items.ConfigSpec(("-q",), "/run", ("/run",), basetemp="/tmp/base")
    first, _ = round_trip(spec)
    again, _ = round_trip(
        _worker_items.ConfigSpec(("-q",), "/run", ("/run",), basetemp="/tmp/base")
    )
    assert first == spec
    assert again is first
    other, _ = round_trip(_worker_items.ConfigSpec(("-x",), "/run", ("/run",)))
    assert other == _worker_items.ConfigSpec(("-x",), "/run", ("/run",))
    assert other is not first
