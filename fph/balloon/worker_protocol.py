"""The control protocol between the daemon and a balloon worker, sans-IO: frames in, messages out.

A balloon worker (``python -m fph.balloon.worker``) holds one VM's vhost-user connection so that the
connection outlives the daemon (QEMU 11.1 aborts when a balloon back-end it was connected to is gone and
the device is later unplugged or reconnected). The daemon drives the device over this protocol and the
worker streams the guest's accepted hints back as :class:`Hints` messages, in the order the device took
them; a reply to ``REQUEST_HINTS`` is written before any hint of the id it issued, so the daemon opens the
bitmap epoch before that id's first hint is applied.

Framing: a 4-byte big-endian length, then one JSON object. Values are dataclasses of the balloon package
(:func:`to_wire`, :func:`from_wire`).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import struct
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_FRAME = 64 << 20
"""A frame larger than this is a protocol error (a hint batch of 1,024 ranges is ~40 KiB; a hand-over
state lists every held 4 MiB block: ~6 MB for 1 TiB of guest RAM)."""

_LEN = struct.Struct(">I")


class ProtocolError(Exception):
    """A frame that is not a message of this protocol."""


class Op(enum.Enum):
    HELLO = "hello"
    REQUEST_HINTS = "request_hints"
    STOP_HINTS = "stop_hints"
    DONE = "done"
    DONE_AND_WAIT = "done_and_wait"
    STATUS = "status"
    TAKE_METRICS = "take_metrics"
    GUEST_STATS = "guest_stats"
    REQUEST_STATS = "request_stats"
    SET_TARGET = "set_target"
    VIEW = "view"
    USED_RING_RANGES = "used_ring_ranges"
    RELEASE = "release"
    """DONE (forced) if the guest can hear it, then wait (bounded) until it read it: what a daemon that
    stops does for every VM."""
    EXIT = "exit"
    """Release, close the VM's connection and socket, and exit (UnregisterVm)."""
    HAND_OVER = "hand_over"
    """From a successor (fph.balloon.worker_handover): the reply carries the worker's state and fds."""
    TAKEN_OVER = "taken_over"
    """From the successor that serves the VM now: the worker exits without a word to QEMU or the guest."""


@dataclass(frozen=True)
class Request:
    seq: int
    op: Op
    arg: float | int | None = None


@dataclass(frozen=True)
class Reply:
    seq: int
    value: Any = None
    error: str = ""


@dataclass(frozen=True)
class Hints:
    epoch: int
    ranges: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class WorkerHello:
    """What a worker says of itself (the reply to HELLO)."""

    pid: int
    name: str
    socket_path: str
    protocol: int


PROTOCOL_VERSION = 1

Message = Request | Reply | Hints


def to_wire(value: Any) -> Any:
    """A JSON-able form of a value: dataclasses as objects, enums by value, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [to_wire(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_wire(v) for k, v in value.items()}
    return value


def from_wire(tp: Any, value: Any) -> Any:
    """The inverse of :func:`to_wire` for type ``tp`` (a dataclass, enum, ``X | None``, list, tuple, dict
    or a plain JSON type)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return from_wire(inner, value)
    if origin is list:
        (item,) = typing.get_args(tp)
        return [from_wire(item, v) for v in _as(list, value)]
    if origin is tuple:
        return tuple(from_wire(a, v) for a, v in zip(typing.get_args(tp), _as(list, value), strict=True))
    if origin is dict:
        _, vt = typing.get_args(tp)
        return {k: from_wire(vt, v) for k, v in _as(dict, value).items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        obj = _as(dict, value)
        return tp(**{f.name: from_wire(hints[f.name], obj[f.name]) for f in dataclasses.fields(tp)})
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    if tp is float:
        return float(_as((int, float), value))
    if tp in (int, str, bool):
        return _as(tp, value)
    return value


def _as(tp: Any, value: Any) -> Any:
    if not isinstance(value, tp):
        raise ProtocolError(f"expected {tp}, got {type(value).__name__}")
    return value


def encode(msg: Message) -> bytes:
    if isinstance(msg, Request):
        obj: dict[str, Any] = {"t": "req", "seq": msg.seq, "op": msg.op.value, "arg": msg.arg}
    elif isinstance(msg, Reply):
        obj = {"t": "rep", "seq": msg.seq, "value": msg.value, "error": msg.error}
    else:
        obj = {"t": "hints", "epoch": msg.epoch, "ranges": [[a, n] for a, n in msg.ranges]}
    body = json.dumps(obj, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"message of {len(body)} bytes is over the {MAX_FRAME}-byte frame limit")
    return _LEN.pack(len(body)) + body


def hints_message(epoch: int, ranges: Sequence[tuple[int, int]]) -> Hints:
    return Hints(epoch, [(int(a), int(n)) for a, n in ranges])


class Decoder:
    """Bytes in (``feed``), whole messages out."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(self._buf)
            if n > MAX_FRAME:
                raise ProtocolError(f"frame of {n} bytes is over the {MAX_FRAME}-byte limit")
            if len(self._buf) < _LEN.size + n:
                break
            body = bytes(self._buf[_LEN.size : _LEN.size + n])
            del self._buf[: _LEN.size + n]
            out.append(_decode(body))
        return out


def _decode(body: bytes) -> Message:
    try:
        obj = _as(dict, json.loads(body))
        kind = obj["t"]
        if kind == "req":
            arg = obj.get("arg")
            if arg is not None and not isinstance(arg, (int, float)):
                raise ProtocolError("arg must be a number")
            return Request(_as(int, obj["seq"]), Op(obj["op"]), arg)
        if kind == "rep":
            return Reply(_as(int, obj["seq"]), obj.get("value"), _as(str, obj.get("error", "")))
        if kind == "hints":
            ranges = [(int(a), int(n)) for a, n in _as(list, obj["ranges"])]
            return Hints(_as(int, obj["epoch"]), ranges)
    except (KeyError, ValueError, TypeError) as e:
        raise ProtocolError(f"malformed message: {e}") from e
    raise ProtocolError(f"unknown message kind {kind!r}")
