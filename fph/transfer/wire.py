"""fph's RAM data plane on the wire, sans-IO: frame headers in and out, and the receiver's state machine.

A migration is one TCP stream from source to destination and a reply stream back. Every frame is a
fixed 40-byte little-endian header, then ``payload_len`` bytes::

    magic "FPHd" | version u8 | kind u8 | flags u16 | round u32 | first_page u64 | npages u32
    | payload_len u32 | checksum u64 | reserved u32

The checksum is xxh3-64 of the payload, 0 without one; for PAGES it is xxh3-64 of the pages' 64-bit
fingerprints (``pagehash``), which the source computes anyway while copying the pages and which detect
any single-word change of a page for certain.

Kinds: HELLO (JSON: page size and the RAM layout), PAGES (``npages`` whole pages of data), ZEROS
(``npages`` zero pages, no payload), FILL (``npages`` pages each filled with one repeated 8-byte value, the
payload: a guest's poisoned free pages cost a marker, like zero pages), ROUND_END (JSON counters), FINISH
(JSON totals), ABORT (UTF-8 reason); from the destination: ACK (JSON: every page is in its RAM, or the
error) and RESUMED (JSON: what the destination's daemon did after QEMU's device state arrived).
HELLO carries the migration's one-time credential (``security``): a HELLO without it, or any other
first frame, is refused before any page lands. Pages are guest-physical
page numbers: both sides translate them through the same ``RamLayout`` to offsets of their own RAM file.

No sockets here: :class:`ReceiverProtocol` takes headers and payloads and says where the payload goes,
so every rule can be tested frame by frame, and the transport can read payloads straight into place.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from fph.ram_layout import PAGE_SHIFT, PAGE_SIZE, LayoutError, RamLayout, RamRange
from fph.transfer.pagehash import page_hashes
from fph.transfer.security import credential_matches

MAGIC = b"FPHd"
VERSION = 1
HEADER = struct.Struct("<4sBBHIQIIQ4x")
HEADER_SIZE = HEADER.size
MAX_FRAME_PAGES = 256
"""1 MiB of page data per frame: bounded memory on both sides, checksums over cache-sized blocks."""
MAX_JSON_PAYLOAD = 1 << 20


class Kind(enum.IntEnum):
    HELLO = 1
    PAGES = 2
    ZEROS = 3
    ROUND_END = 4
    FINISH = 5
    ABORT = 6
    ACK = 7
    FILL = 8
    RESUMED = 9


FILL_PAYLOAD = struct.Struct("<Q")


class WireError(RuntimeError):
    """The data stream broke a rule; the migration must abort (nothing is applied past this frame)."""


class AuthError(WireError):
    """The peer did not present this migration's credential: it is refused before any page lands."""


class ChecksumError(WireError):
    """A payload did not match its checksum: the bytes in RAM for those pages are not trustworthy."""


@dataclass(frozen=True, slots=True)
class Frame:
    kind: Kind
    round: int = 0
    first_page: int = 0
    npages: int = 0
    payload_len: int = 0
    checksum: int = 0
    flags: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC,
            VERSION,
            self.kind,
            self.flags,
            self.round,
            self.first_page,
            self.npages,
            self.payload_len,
            self.checksum,
        )


def checksum(payload: bytes | bytearray | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(payload)


def parse_header(data: bytes | bytearray | memoryview) -> Frame:
    if len(data) != HEADER_SIZE:
        raise WireError(f"frame header must be {HEADER_SIZE} bytes, got {len(data)}")
    magic, version, kind, flags, rnd, first, npages, plen, check = HEADER.unpack(data)
    if magic != MAGIC:
        raise WireError(f"bad frame magic {magic!r}: not an fph data stream (or it lost sync)")
    if version != VERSION:
        raise WireError(f"data stream version {version}, this fph speaks {VERSION}")
    try:
        k = Kind(kind)
    except ValueError:
        raise WireError(f"unknown frame kind {kind}") from None
    return Frame(k, rnd, first, npages, plen, check, flags)


def json_frame(kind: Kind, body: dict[str, Any], round_: int = 0) -> tuple[Frame, bytes]:
    payload = json.dumps(body, separators=(",", ":")).encode()
    return Frame(kind, round_, payload_len=len(payload), checksum=checksum(payload)), payload


def pages_checksum(fingerprints: npt.NDArray[np.uint64]) -> int:
    return xxhash.xxh3_64_intdigest(np.ascontiguousarray(fingerprints, dtype="<u8").data)


def pages_frame(
    round_: int,
    first_page: int,
    payload: bytes | bytearray | memoryview,
    fingerprints: npt.NDArray[np.uint64],
) -> Frame:
    n = len(payload) // PAGE_SIZE
    return Frame(Kind.PAGES, round_, first_page, n, len(payload), pages_checksum(fingerprints[:n]))


def fill_frame(round_: int, first_page: int, npages: int, value: int) -> tuple[Frame, bytes]:
    """``npages`` pages that each hold ``value`` (a u64) in every 8-byte word."""
    payload = FILL_PAYLOAD.pack(value)
    return Frame(Kind.FILL, round_, first_page, npages, len(payload), checksum(payload)), payload


def fill_value(payload: bytes | bytearray | memoryview) -> int:
    (value,) = FILL_PAYLOAD.unpack(bytes(payload))
    return int(value)


def hello_body(layout: RamLayout, credential: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"page_size": PAGE_SIZE, "ranges": [[r.gpa, r.size, r.offset] for r in layout]}
    if credential is not None:
        body["credential"] = credential
    return body


def layout_from_hello(body: dict[str, Any]) -> RamLayout:
    if body.get("page_size") != PAGE_SIZE:
        raise WireError(f"source uses page size {body.get('page_size')!r}, destination {PAGE_SIZE}")
    try:
        return RamLayout(RamRange(int(g), int(s), int(o)) for g, s, o in body["ranges"])
    except (KeyError, TypeError, ValueError, LayoutError) as exc:
        raise WireError(f"HELLO carries no valid RAM layout: {exc}") from None


def decode_json(frame: Frame, payload: bytes | bytearray | memoryview) -> dict[str, Any]:
    try:
        body = json.loads(bytes(payload))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"{frame.kind.name} payload is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise WireError(f"{frame.kind.name} payload must be a JSON object")
    return body


class RxState(enum.Enum):
    WAIT_HELLO = "wait-hello"
    RECEIVING = "receiving"
    FINISHED = "finished"
    FAILED = "failed"


@dataclass
class RxCounters:
    frames: int = 0
    pages: int = 0
    zero_pages: int = 0
    fill_pages: int = 0
    bytes: int = 0
    rounds: int = 0
    pages_per_round: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PayloadTarget:
    """Where a PAGES payload goes: ``length`` bytes at ``offset`` of the destination RAM file."""

    offset: int
    length: int


class ReceiverProtocol:
    """The destination's rules: HELLO first, matching layouts, page ranges inside RAM, verified payloads.

    ``on_header`` validates a header and tells the caller how many payload bytes follow and, for
    PAGES, where in the RAM file they belong. ``on_payload`` verifies them. Any violation raises
    WireError and moves to FAILED for good.
    """

    def __init__(self, layout: RamLayout, credential: str | None = None) -> None:
        """``credential``: what HELLO must carry (None: any source is accepted, the in-process case)."""
        self.layout = layout
        self.credential = credential
        self.state = RxState.WAIT_HELLO
        self.counters = RxCounters()
        self.round = 0
        self.finish_body: dict[str, Any] | None = None
        self.abort_reason: str | None = None

    def _fail(self, message: str, exc: type[WireError] = WireError) -> WireError:
        self.state = RxState.FAILED
        return exc(message)

    def on_header(self, frame: Frame) -> PayloadTarget | None:
        if self.state in (RxState.FINISHED, RxState.FAILED):
            raise self._fail(f"{frame.kind.name} frame after the stream {self.state.value}")
        self.counters.frames += 1
        if self.state is RxState.WAIT_HELLO and frame.kind is not Kind.HELLO:
            raise self._fail(f"first frame must be HELLO, got {frame.kind.name}", AuthError)
        if frame.kind in (Kind.ACK, Kind.RESUMED):
            raise self._fail(f"{frame.kind.name} frames flow from the destination, not to it")
        if frame.kind in (Kind.PAGES, Kind.ZEROS, Kind.FILL):
            if frame.round < self.round:
                raise self._fail(f"{frame.kind.name} frame of round {frame.round} after round {self.round}")
            self.round = frame.round
            if not 0 < frame.npages <= MAX_FRAME_PAGES:
                raise self._fail(f"{frame.kind.name} frame with {frame.npages} pages (1..{MAX_FRAME_PAGES})")
            try:
                offset = self.layout.gpa_to_offset(frame.first_page << PAGE_SHIFT, frame.npages << PAGE_SHIFT)
            except LayoutError as exc:
                raise self._fail(f"{frame.kind.name} frame outside destination RAM: {exc}") from None
            want = {Kind.PAGES: frame.npages * PAGE_SIZE, Kind.ZEROS: 0, Kind.FILL: FILL_PAYLOAD.size}[
                frame.kind
            ]
            if frame.payload_len != want:
                raise self._fail(
                    f"{frame.kind.name} frame of {frame.npages} pages carries {frame.payload_len} bytes"
                )
            return PayloadTarget(offset, frame.npages * PAGE_SIZE)
        if frame.payload_len > MAX_JSON_PAYLOAD:
            raise self._fail(f"{frame.kind.name} payload of {frame.payload_len} bytes is too large")
        return None

    def on_payload(self, frame: Frame, payload: bytes | bytearray | memoryview) -> None:
        """Check a frame's payload (for PAGES: already in place at its target) and apply the frame."""
        if frame.kind is Kind.PAGES:
            ok = pages_checksum(page_hashes(np.frombuffer(payload, dtype=np.uint8))) == frame.checksum
        else:
            ok = not frame.payload_len or checksum(payload) == frame.checksum
        if not ok:
            what = (
                f"pages [{frame.first_page}, +{frame.npages})"
                if frame.kind is Kind.PAGES
                else frame.kind.name
            )
            raise self._fail(f"checksum mismatch on {what} in round {frame.round}", ChecksumError)
        c = self.counters
        if frame.kind is Kind.HELLO:
            if self.state is not RxState.WAIT_HELLO:
                raise self._fail("second HELLO in one stream")
            body = decode_json(frame, payload)
            if self.credential is not None and not credential_matches(
                self.credential, body.get("credential")
            ):
                raise self._fail("the source did not present this migration's credential", AuthError)
            src = layout_from_hello(body)
            if src.ranges != self.layout.ranges:
                raise self._fail(f"source RAM layout {src!r} differs from the destination's {self.layout!r}")
            self.state = RxState.RECEIVING
        elif frame.kind is Kind.PAGES:
            c.pages += frame.npages
            c.bytes += frame.payload_len
            self._count_round(frame.npages)
        elif frame.kind is Kind.ZEROS:
            c.zero_pages += frame.npages
            self._count_round(frame.npages)
        elif frame.kind is Kind.FILL:
            c.fill_pages += frame.npages
            self._count_round(frame.npages)
        elif frame.kind is Kind.ROUND_END:
            c.rounds = max(c.rounds, frame.round + 1)
        elif frame.kind is Kind.FINISH:
            self.finish_body = decode_json(frame, payload)
            self.state = RxState.FINISHED
        elif frame.kind is Kind.ABORT:
            self.abort_reason = bytes(payload).decode("utf-8", "replace") or "no reason given"
            self.state = RxState.FAILED

    def _count_round(self, npages: int) -> None:
        per = self.counters.pages_per_round
        while len(per) <= self.round:
            per.append(0)
        per[self.round] += npages
