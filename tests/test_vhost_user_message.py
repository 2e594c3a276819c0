"""Wire format: header validation, payload codecs, request size/fd table, incremental framing."""

from __future__ import annotations

import pytest

from fph.vhost_user import message as m
from fph.vhost_user.errors import MessageError, UnknownRequestError
from fph.vhost_user.message import FrontendReq as R


def test_header_roundtrip_and_reply_flags() -> None:
    h = m.Header.unpack(m.HEADER.pack(R.GET_FEATURES, m.VERSION | m.NEED_REPLY, 0))
    assert h.request == R.GET_FEATURES and h.need_reply and not h.is_reply
    reply = m.encode_reply(R.GET_FEATURES, m.encode_u64(5))
    assert m.HEADER.unpack_from(reply) == (R.GET_FEATURES, 0x5, 8)


@pytest.mark.parametrize(
    ("flags", "size", "match"),
    [
        (0x0, 0, "version"),
        (0x2, 0, "version"),
        (0x1 | 0x10, 0, "unknown flag"),
        (0x1, m.MAX_PAYLOAD + 1, "exceeds"),
    ],
)
def test_malformed_headers(flags: int, size: int, match: str) -> None:
    with pytest.raises(MessageError, match=match):
        m.Header.unpack(m.HEADER.pack(1, flags, size))


def test_short_header() -> None:
    with pytest.raises(MessageError):
        m.Header.unpack(b"\x01\x00\x00")


def _check(req: int, payload: bytes = b"", fds: tuple[int, ...] = (), flags: int = m.VERSION) -> R:
    return m.check_request(m.Header(req, flags, len(payload)), payload, fds)


def test_request_table_sizes_and_fds() -> None:
    assert _check(R.SET_FEATURES, bytes(8)) == R.SET_FEATURES
    with pytest.raises(MessageError, match="payload size 4, expected 8"):
        _check(R.SET_FEATURES, bytes(4))
    with pytest.raises(MessageError, match="fds attached"):
        _check(R.SET_FEATURES, bytes(8), (99,))
    with pytest.raises(MessageError, match="fds attached"):
        _check(R.SET_BACKEND_REQ_FD)  # needs exactly one fd
    with pytest.raises(MessageError, match="REPLY flag"):
        _check(R.GET_FEATURES, flags=m.REPLY_FLAGS)


@pytest.mark.parametrize("req", [0, 19, 26, 41, 99, 0xFFFF_FFFF])
def test_unknown_requests(req: int) -> None:
    with pytest.raises(UnknownRequestError):
        _check(req)


def test_mem_table_codec() -> None:
    regions = [
        m.MemoryRegionMsg(0, 1 << 30, 0x7F00_0000_0000, 0),
        m.MemoryRegionMsg(1 << 32, 1 << 20, 0x7F80_0000_0000, 4096),
    ]
    payload = m.encode_mem_table(regions)
    assert m.decode_mem_table(payload, 2) == regions
    padded = payload + bytes(32 * 6)  # QEMU's fixed 8-slot table
    assert m.decode_mem_table(padded, 2) == regions
    with pytest.raises(MessageError, match="fds for 2 regions"):
        m.decode_mem_table(payload, 1)
    with pytest.raises(MessageError, match="payload"):
        m.decode_mem_table(payload[:-1], 2)
    with pytest.raises(MessageError, match="regions, at most"):
        m.decode_mem_table(m.MEM_TABLE_HEAD.pack(9, 0), 9)


def test_config_codec() -> None:
    msg = m.ConfigMsg(8, 4, 0, b"\x01\x02\x03\x04")
    assert m.ConfigMsg.decode(msg.encode(), with_data=True) == msg
    with pytest.raises(MessageError, match="size 0"):
        m.ConfigMsg.decode(m.CONFIG_HEAD.pack(0, 0, 0), with_data=False)
    with pytest.raises(MessageError, match="payload"):
        m.ConfigMsg.decode(m.CONFIG_HEAD.pack(0, 16, 0) + bytes(4), with_data=True)


def test_vring_payloads() -> None:
    addr = m.VringAddr(3, 1, 0x1000, 0x3000, 0x2000, 0x4000)
    data = addr.encode()
    assert len(data) == 40 and m.VringAddr.decode(data) == addr
    assert m.VringState.decode(m.VringState(2, 256).encode()) == m.VringState(2, 256)


def test_frame_decoder_byte_by_byte_keeps_fds_with_their_message() -> None:
    dec = m.FrameDecoder()
    wire = m.encode(R.SET_VRING_KICK, m.encode_u64(1)) + m.encode(R.GET_FEATURES)
    msgs = []
    fds_for_first = [42]
    pos = 0
    while pos < len(wire):
        n = dec.bytes_needed
        chunk = wire[pos : pos + 1]
        assert n >= 1
        msg = dec.feed(chunk, fds_for_first if pos == 0 else ())
        pos += 1
        if msg:
            msgs.append(msg)
    assert [x.header.request for x in msgs] == [R.SET_VRING_KICK, R.GET_FEATURES]
    assert msgs[0].fds == (42,) and msgs[1].fds == ()
    assert not dec.mid_message


def test_frame_decoder_rejects_overfeed_and_reports_mid_message() -> None:
    dec = m.FrameDecoder()
    with pytest.raises(MessageError):
        dec.feed(bytes(13), [7])
    assert dec.take_fds() == [7]
    dec = m.FrameDecoder()
    assert dec.feed(m.HEADER.pack(R.SET_FEATURES, 1, 8)) is None
    assert dec.mid_message and dec.bytes_needed == 8
