"""Property tests: hostile input never escapes the error tree, never hangs, never leaks fds.

* any descriptor table walk either yields a chain whose buffers all lie in guest memory (readable before
  writable, bounded length) or raises VirtQueueError;
* any byte stream fed through the frame decoder and the handler either works or raises a ProtocolError --
  no other exception reaches the transport.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fph.hint_receiver import BalloonDevice
from fph.vhost_user import message as m
from fph.vhost_user.errors import ProtocolError, VirtQueueError
from fph.vhost_user.handler import VhostUserHandler
from fph.virtio.chain import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, VRING_DESC, walk_chain
from fph.virtio.memory import GuestMemory, memfd_region

MiB = 1 << 20
GPA = 0x20_0000
SIZE = 2 * MiB
TABLE = GPA + 0x1000
QSIZE = 16


@pytest.fixture(scope="module")
def mem() -> Iterator[GuestMemory]:
    fd, spec = memfd_region(SIZE, gpa=GPA)
    g = GuestMemory.from_fds([spec], [fd])
    os.close(fd)
    yield g
    g.close()


addresses = st.one_of(
    st.integers(GPA, GPA + SIZE - 1),  # inside
    st.sampled_from([0, GPA - 16, GPA + SIZE - 8, GPA + SIZE, 2**64 - 16]),  # edges and beyond
)
descriptors = st.tuples(
    addresses,
    st.one_of(st.integers(0, 4096), st.sampled_from([0xFFFF_FFFF, 16 * QSIZE, 17])),
    st.integers(0, 7) | st.just(DESC_F_NEXT | DESC_F_WRITE) | st.just(DESC_F_INDIRECT),
    st.integers(0, QSIZE + 2),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    table=st.lists(descriptors, min_size=QSIZE, max_size=QSIZE),
    head=st.integers(0, QSIZE),
    indirect=st.booleans(),
)
def test_chain_walk_is_total(
    mem: GuestMemory, table: list[tuple[int, int, int, int]], head: int, indirect: bool
) -> None:
    for i, (addr, length, flags, nxt) in enumerate(table):
        mem.write_struct(VRING_DESC, TABLE + 16 * i, addr, length, flags, nxt)
    try:
        chain = walk_chain(mem, TABLE, QSIZE, head, indirect_ok=indirect)
    except VirtQueueError:
        return
    bufs = chain.readable + chain.writable
    assert all(mem.contains(a, n) for a, n in bufs)
    assert chain.readable_len + chain.writable_len <= 0xFFFF_FFFF
    assert len(bufs) <= QSIZE + 1024  # at most a ring's worth plus one indirect table


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


messages = st.tuples(
    st.sampled_from([int(r) for r in m.FrontendReq] + [0, 99, 26]),
    st.sampled_from([m.VERSION, m.VERSION | m.NEED_REPLY, 0, m.REPLY_FLAGS, 0xFF]),
    st.one_of(  # biased towards the sizes requests really have, so fuzzing gets past the size check
        st.binary(max_size=64),
        *(st.binary(min_size=n, max_size=n) for n in (8, 16, 28, 40, 8 + 32)),
    ),
    st.integers(0, 3),  # fds attached
)


@settings(max_examples=300, deadline=None)
@given(stream=st.lists(messages, max_size=12))
def test_handler_only_raises_protocol_errors(stream: list[tuple[int, int, bytes, int]]) -> None:
    dev = BalloonDevice()
    h = VhostUserHandler(dev, name="fuzz")
    before = _open_fds()
    try:
        for req, flags, payload, nfds in stream:
            fds = [os.eventfd(0) for _ in range(nfds)]
            dec = m.FrameDecoder()
            data = struct.pack("<III", req, flags, len(payload)) + payload
            try:
                msg = None
                pos = 0
                while msg is None and pos < len(data):
                    n = dec.bytes_needed
                    msg = dec.feed(data[pos : pos + n], fds if pos == 0 else ())
                    pos += n
                if msg is None:
                    for fd in dec.take_fds():
                        os.close(fd)
                    continue
                h.handle(msg)
            except ProtocolError:
                for fd in dec.take_fds():
                    os.close(fd)
                continue
    finally:
        h.close()
    # Whatever the handler kept (eventfds as kick/call/err, a backend channel fd) is released on close,
    # except an adopted back-end channel fd, which belongs to the transport.
    leaked = _open_fds() - before
    assert leaked <= sum(1 for req, _, _, n in stream if req == m.FrontendReq.SET_BACKEND_REQ_FD and n)
