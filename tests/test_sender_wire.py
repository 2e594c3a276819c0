"""The data-plane protocol, frame by frame, without sockets."""

from __future__ import annotations

import numpy as np
import pytest

from fph.ram_layout import PAGE_SIZE, GiB, RamLayout
from fph.transfer.pagehash import page_hashes
from fph.transfer.wire import (
    HEADER_SIZE,
    MAX_FRAME_PAGES,
    ChecksumError,
    Frame,
    Kind,
    ReceiverProtocol,
    RxState,
    WireError,
    checksum,
    hello_body,
    json_frame,
    pages_frame,
    parse_header,
)

LAYOUT = RamLayout.pc(4608 << 20)


def hello(layout: RamLayout = LAYOUT) -> tuple[Frame, bytes]:
    return json_frame(Kind.HELLO, hello_body(layout))


def started() -> ReceiverProtocol:
    p = ReceiverProtocol(LAYOUT)
    f, body = hello()
    assert p.on_header(f) is None
    p.on_payload(f, body)
    assert p.state is RxState.RECEIVING
    return p


def test_header_round_trip() -> None:
    f = Frame(Kind.PAGES, 3, 12345, 7, 7 * PAGE_SIZE, 0xDEADBEEF)
    raw = f.pack()
    assert len(raw) == HEADER_SIZE == 40
    assert parse_header(raw) == f


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"XXXX" + Frame(Kind.ACK).pack()[4:], "magic"),
        (Frame(Kind.ACK).pack()[:4] + b"\x09" + Frame(Kind.ACK).pack()[5:], "version"),
        (Frame(Kind.ACK).pack()[:5] + b"\x63" + Frame(Kind.ACK).pack()[6:], "unknown frame kind 99"),
        (Frame(Kind.ACK).pack()[:20], "40 bytes"),
    ],
)
def test_malformed_headers(raw: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        parse_header(raw)


def test_hello_first_and_layouts_must_match() -> None:
    p = ReceiverProtocol(LAYOUT)
    with pytest.raises(WireError, match="first frame must be HELLO"):
        p.on_header(Frame(Kind.ZEROS, 0, 0, 1))
    assert p.state is RxState.FAILED
    with pytest.raises(WireError, match="after the stream failed"):
        p.on_header(hello()[0])
    p = ReceiverProtocol(LAYOUT)
    f, body = hello(RamLayout.flat(GiB))
    p.on_header(f)
    with pytest.raises(WireError, match="differs from the destination"):
        p.on_payload(f, body)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (Frame(Kind.PAGES, 0, 0, 0, 0), "with 0 pages"),
        (Frame(Kind.PAGES, 0, 0, MAX_FRAME_PAGES + 1, (MAX_FRAME_PAGES + 1) * PAGE_SIZE), "pages"),
        (Frame(Kind.PAGES, 0, 0, 2, PAGE_SIZE), "carries 4096 bytes"),
        (Frame(Kind.ZEROS, 0, 0, 2, 8), "carries 8 bytes"),
        (Frame(Kind.PAGES, 0, (3 * GiB) >> 12, 1, PAGE_SIZE), "outside destination RAM"),  # PCI hole
        (Frame(Kind.PAGES, 0, (3 * GiB >> 12) - 1, 2, 2 * PAGE_SIZE), "outside destination RAM"),
        (Frame(Kind.ZEROS, 0, 2**63, 1), "outside destination RAM"),
        (Frame(Kind.ACK), "ACK frames flow from the destination"),
        (Frame(Kind.FINISH, payload_len=2 << 20), "too large"),
    ],
)
def test_bad_frames_fail_the_stream(frame: Frame, message: str) -> None:
    p = started()
    with pytest.raises(WireError, match=message):
        p.on_header(frame)
    assert p.state is RxState.FAILED


def test_pages_go_to_their_file_offset_and_checksums_are_verified() -> None:
    p = started()
    payload = bytes(range(256)) * 32  # two pages
    f = pages_frame(1, (4 * GiB) >> 12, payload, page_hashes(np.frombuffer(payload, dtype=np.uint8)))
    target = p.on_header(f)
    assert target is not None and (target.offset, target.length) == (3 * GiB, 2 * PAGE_SIZE)
    p.on_payload(f, payload)
    assert p.counters.pages == 2 and p.counters.pages_per_round == [0, 2]
    bad = bytearray(payload)
    bad[5000] ^= 1
    p.on_header(f)
    with pytest.raises(ChecksumError, match=r"pages \[1048576, \+2\) in round 1"):
        p.on_payload(f, bad)


def test_rounds_never_go_back_and_finish_ends_the_stream() -> None:
    p = started()
    p.on_header(Frame(Kind.ZEROS, 2, 0, 1))
    p.on_payload(Frame(Kind.ZEROS, 2, 0, 1), b"")
    with pytest.raises(WireError, match="round 1 after round 2"):
        p.on_header(Frame(Kind.ZEROS, 1, 0, 1))
    p = started()
    f, body = json_frame(Kind.FINISH, {"rounds": 1})
    p.on_header(f)
    p.on_payload(f, body)
    assert p.state is RxState.FINISHED and p.finish_body == {"rounds": 1}
    with pytest.raises(WireError, match="after the stream finished"):
        p.on_header(Frame(Kind.ZEROS, 3, 0, 1))


def test_abort_and_bad_json() -> None:
    p = started()
    f = Frame(Kind.ABORT, payload_len=4, checksum=checksum(b"gone"))
    p.on_header(f)
    p.on_payload(f, b"gone")
    assert p.state is RxState.FAILED and p.abort_reason == "gone"
    p = started()
    garbage = b"{not json"
    f = Frame(Kind.FINISH, payload_len=len(garbage), checksum=checksum(garbage))
    p.on_header(f)
    with pytest.raises(WireError, match="not JSON"):
        p.on_payload(f, garbage)


def test_fill_frames_carry_one_value_for_many_pages() -> None:
    from fph.transfer.wire import fill_frame, fill_value

    p = started()
    f, payload = fill_frame(0, 10, 200, 0xAAAA_AAAA_AAAA_AAAA)
    wire = parse_header(f.pack())
    assert wire.kind is Kind.FILL and wire.payload_len == 8
    target = p.on_header(wire)
    assert target is not None and target.length == 200 * PAGE_SIZE
    p.on_payload(wire, payload)
    assert fill_value(payload) == 0xAAAA_AAAA_AAAA_AAAA and p.counters.fill_pages == 200
    bad = Frame(Kind.FILL, 0, 10, 1, 16, 0)
    with pytest.raises(WireError, match="carries 16 bytes"):
        started().on_header(bad)
    corrupt = started()
    assert corrupt.on_header(wire) is not None
    with pytest.raises(ChecksumError):
        corrupt.on_payload(wire, b"\x00" * 8)
