"""One codec for every payload: JSON on NATS, msgpack between the node and its engine host.

Bytes that do not decode into the expected type raise `DecodeError`, which names the
field at fault (`stop.max_tokens`) so the caller can be told precisely what is wrong.
"""

from __future__ import annotations

import re
import threading
from typing import Any, TypeVar

import msgspec

__all__ = ["DecodeError", "decode_json", "decode_msgpack", "encode_json", "encode_msgpack"]

T = TypeVar("T")

_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()
_json_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}
_msgpack_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}
# msgspec builds a type's decoding tables on first use, and two threads doing that at once
# for the same types can crash the interpreter (a segfault, seen with two handlers taking
# their first requests together): decoders are made one at a time, under this lock.
_building = threading.Lock()
_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


class DecodeError(ValueError):
    """Bytes that are not a valid `type_name`; `field` is the dotted path at fault ('' = whole)."""

    def __init__(self, type_name: str, field: str, problem: str) -> None:
        where = f" at {field}" if field else ""
        super().__init__(f"invalid {type_name}{where}: {problem}")
        self.type_name = type_name
        self.field = field
        self.problem = problem


def _error(exc: msgspec.DecodeError, type_: Any) -> DecodeError:
    name = getattr(type_, "__name__", str(type_))
    match = _AT.match(str(exc))
    assert match is not None
    problem = match["msg"]
    field = (match["path"] or "").lstrip(".")
    if isinstance(exc, msgspec.ValidationError):
        unknown = re.match(r"Object contains unknown field `([^`]+)`", problem)
        if unknown:
            field = f"{field}.{unknown[1]}" if field else unknown[1]
            problem = "unknown field"
        missing = re.match(r"Object missing required field `([^`]+)`", problem)
        if missing:
            field = f"{field}.{missing[1]}" if field else missing[1]
            problem = "required field missing"
    else:
        problem = f"malformed payload: {problem}"
    problem = problem[:1].lower() + problem[1:]
    return DecodeError(name, field, problem)


def _decoder(cache: dict[Any, Any], make: Any, type_: Any) -> Any:
    """The cached decoder for `type_`, made (once, under `_building`) by `make`."""
    with _building:
        decoder = cache.get(type_)
        if decoder is None:
            decoder = cache[type_] = make(type_)
        return decoder


def encode_json(obj: Any) -> bytes:
    """Encode a message for NATS."""
    return _json_encoder.encode(obj)


def decode_json(data: bytes | str, type_: type[T]) -> T:
    """Decode NATS bytes into `type_`, or raise `DecodeError`."""
    decoder = _json_decoders.get(type_) or _decoder(_json_decoders, msgspec.json.Decoder, type_)
    try:
        return decoder.decode(data)  # type: ignore[no-any-return]
    except msgspec.DecodeError as exc:
        raise _error(exc, type_) from None
    except UnicodeDecodeError as exc:  # msgspec lets invalid UTF-8 in strings through as this
        name = getattr(type_, "__name__", str(type_))
        raise DecodeError(
            name, "", f"malformed payload: invalid UTF-8 at byte {exc.start}"
        ) from None
    except RecursionError:  # nesting deeper than the interpreter can follow
        name = getattr(type_, "__name__", str(type_))
        raise DecodeError(name, "", "malformed payload: nested too deeply") from None


def encode_msgpack(obj: Any) -> bytes:
    """Encode a message for the engine host channel."""
    return _msgpack_encoder.encode(obj)


def decode_msgpack(data: bytes, type_: Any) -> Any:
    """Decode engine host channel bytes into `type_` (a type or union), or raise `DecodeError`."""
    decoder = _msgpack_decoders.get(type_) or _decoder(
        _msgpack_decoders, msgspec.msgpack.Decoder, type_
    )
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise _error(exc, type_) from None
