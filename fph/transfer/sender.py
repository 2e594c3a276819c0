"""The source end of the data plane: :class:`RamSender` reads pages from the source RAM file and sends
frames (wire.py) to a :class:`fph.transfer.receiver.RamReceiver`, paced to a bandwidth cap.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
from typing import Any

import numpy as np
import numpy.typing as npt

from fph.ram_layout import PAGE_SIZE
from fph.transfer.channel import ChannelError, ChannelState, WireCounters, recv_exact
from fph.transfer.pacer import TokenBucket, WindowMeter, slice_bytes
from fph.transfer.ram_file import RamFile
from fph.transfer.security import DataPlaneSecurity, SecurityError
from fph.transfer.wire import (
    HEADER_SIZE,
    MAX_FRAME_PAGES,
    Frame,
    Kind,
    WireError,
    checksum,
    decode_json,
    fill_frame,
    hello_body,
    json_frame,
    pages_frame,
    parse_header,
)

log = logging.getLogger(__name__)


class RamSender:
    """Source end: connect, HELLO, PAGES/ZEROS per round, FINISH, then wait for the destination's ACK."""

    def __init__(
        self,
        address: tuple[str, int],
        ram: RamFile,
        *,
        bandwidth: int | None = None,
        timeout: float = 30.0,
        security: DataPlaneSecurity | None = None,
    ) -> None:
        """``security``: TLS and the credential the destination's daemon handed out (None: a local
        receiver that asks for neither)."""
        self.address = address
        self.security = security
        self.ram = ram
        self.timeout = timeout
        self.state = ChannelState.IDLE
        self.counters = WireCounters()
        self.bandwidth = bandwidth
        self._bucket = TokenBucket(bandwidth) if bandwidth else None
        self._slice = slice_bytes(bandwidth) if bandwidth else 0
        self.meter = WindowMeter()
        """Bytes as they left through the socket: the cap is judged on its 100 ms windows."""
        self._sock: socket.socket | None = None
        self._tls = False

    def connect(self) -> None:
        if self.state is not ChannelState.IDLE:
            raise ChannelError(f"connect() in state {self.state.value}")
        try:
            sock = socket.create_connection(self.address, timeout=self.timeout)
        except OSError as exc:
            self.state = ChannelState.FAILED
            raise ChannelError(f"cannot reach the destination receiver at {self.address}: {exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sec = self.security
        if sec is not None and sec.tls is not None:
            try:
                sock = sec.tls.client_context().wrap_socket(sock)
            except (OSError, SecurityError) as exc:
                sock.close()
                self.state = ChannelState.FAILED
                raise ChannelError(
                    f"TLS with the destination receiver at {self.address} failed: {exc}"
                ) from None
        self._sock = sock
        self._tls = isinstance(sock, ssl.SSLSocket)
        self.state = ChannelState.CONNECTED
        self._send(
            *json_frame(Kind.HELLO, hello_body(self.ram.layout, None if sec is None else sec.credential))
        )

    def _send(self, frame: Frame, payload: bytes | memoryview = b"") -> None:
        if self.state is not ChannelState.CONNECTED or self._sock is None:
            raise ChannelError(f"cannot send {frame.kind.name}: channel is {self.state.value}")
        header = frame.pack()
        total = len(header) + len(payload)
        try:
            if self._bucket is None:
                self._send_unpaced(header, payload)
            else:
                self._send_paced(header, payload)
        except OSError as exc:
            self.state = ChannelState.FAILED
            raise ChannelError(
                f"data connection to {self.address} failed while sending {frame.kind.name}: {exc}"
            ) from None
        self.counters.frames += 1
        self.counters.bytes_on_wire += total

    def _send_unpaced(self, header: bytes, payload: bytes | memoryview) -> None:
        assert self._sock is not None
        total = len(header) + len(payload)
        if self._tls:  # TLS has no scatter send: one record each
            self._sock.sendall(header)
            if payload:
                self._sock.sendall(payload)
            self.meter.add(total)
            return
        sent = self._sock.sendmsg([header, payload] if payload else [header])
        if sent < len(header):  # a partial scatter send: finish it
            self._sock.sendall(header[sent:])
            sent = len(header)
        if sent < total:
            self._sock.sendall(memoryview(payload)[sent - len(header) :])
        self.meter.add(total)

    def _send_paced(self, header: bytes, payload: bytes | memoryview) -> None:
        """Slice by slice, each after its tokens: the cap holds over every window, not on average."""
        assert self._sock is not None and self._bucket is not None
        for part in (memoryview(header), memoryview(payload).cast("B")):
            for off in range(0, len(part), self._slice):
                piece = part[off : off + self._slice]
                self._bucket.take(len(piece))
                self._sock.sendall(piece)
                self.meter.add(len(piece))

    def send_pages(
        self,
        round_: int,
        first_page: int,
        payload: npt.NDArray[np.uint8],
        fingerprints: npt.NDArray[np.uint64],
    ) -> None:
        """Send one frame of whole pages from a bounce buffer (never from live guest RAM: the guest keeps
        running, and the checksum, the payload and the sender's fingerprints must describe the same bytes)."""
        npages = payload.nbytes // PAGE_SIZE
        if not 0 < npages <= MAX_FRAME_PAGES or payload.nbytes % PAGE_SIZE:
            raise ChannelError(
                f"send_pages takes 1..{MAX_FRAME_PAGES} whole pages, got {payload.nbytes} bytes"
            )
        view = memoryview(payload.data)
        self._send(pages_frame(round_, first_page, view, fingerprints), view)
        self.counters.pages += npages

    def send_zeros(self, round_: int, first_page: int, npages: int) -> None:
        for start in range(first_page, first_page + npages, MAX_FRAME_PAGES):
            n = min(MAX_FRAME_PAGES, first_page + npages - start)
            self._send(Frame(Kind.ZEROS, round_, start, n))
            self.counters.zero_pages += n

    def send_fill(self, round_: int, first_page: int, npages: int, value: int) -> None:
        """Pages that each hold ``value`` in every 8-byte word (a poisoned free page): a marker each run."""
        for start in range(first_page, first_page + npages, MAX_FRAME_PAGES):
            n = min(MAX_FRAME_PAGES, first_page + npages - start)
            self._send(*fill_frame(round_, start, n, value))
            self.counters.fill_pages += n

    def end_round(self, round_: int, body: dict[str, Any]) -> None:
        self._send(*json_frame(Kind.ROUND_END, body, round_))
        self._check_early_reply()

    def _check_early_reply(self) -> None:
        """A destination that failed says so at once: surface it at the next round boundary."""
        assert self._sock is not None
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
            if not readable:
                return
            # The receiver only ever writes a reply (no TLS session tickets either): read it, or the close.
            ack = self._read_ack()
        except (OSError, WireError) as exc:
            self.state = ChannelState.FAILED
            raise ChannelError(f"data connection to {self.address} failed: {exc}") from None
        except ChannelError:
            self.state = ChannelState.FAILED
            raise ChannelError(f"the destination receiver at {self.address} closed the connection") from None
        self.state = ChannelState.FAILED
        raise ChannelError(f"the destination receiver stopped the migration: {ack.get('error', ack)}")

    def _read_ack(self, kind: Kind = Kind.ACK) -> dict[str, Any]:
        assert self._sock is not None
        header = bytearray(HEADER_SIZE)
        recv_exact(self._sock, memoryview(header))
        frame = parse_header(header)
        if frame.kind is not kind or frame.payload_len > 1 << 20:
            raise ChannelError(f"destination replied with {frame.kind.name}, expected {kind.name}")
        payload = bytearray(frame.payload_len)
        recv_exact(self._sock, memoryview(payload))
        return decode_json(frame, payload)

    def finish(self, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send FINISH and return the destination's ACK once every page is in its RAM."""
        self._send(*json_frame(Kind.FINISH, body))
        assert self._sock is not None
        self._sock.settimeout(timeout or self.timeout)
        try:
            ack = self._read_ack()
        except (OSError, WireError) as exc:
            self.state = ChannelState.FAILED
            raise ChannelError(f"no ACK from the destination receiver: {exc}") from None
        if not ack.get("ok"):
            self.state = ChannelState.FAILED
            raise ChannelError(f"the destination receiver rejected the migration: {ack.get('error')}")
        self.state = ChannelState.FINISHED
        return ack

    def wait_resumed(self, timeout: float) -> dict[str, Any]:
        """After :meth:`finish` and QEMU's device state: the destination daemon's word on its QEMU (a
        receiver with ``hold_for_resume``), e.g. ``{"resumed": true, "status": "running"}``."""
        if self.state is not ChannelState.FINISHED or self._sock is None:
            raise ChannelError(f"wait_resumed() in state {self.state.value}")
        self._sock.settimeout(timeout)
        try:
            return self._read_ack(Kind.RESUMED)
        except (OSError, WireError) as exc:
            raise ChannelError(f"no word from the destination after its device state: {exc}") from None

    def abort(self, reason: str) -> None:
        """Tell the destination to give up (best effort), then close."""
        if self.state is ChannelState.CONNECTED and self._sock is not None:
            payload = reason.encode()[:4096]
            with contextlib.suppress(ChannelError):
                self._send(Frame(Kind.ABORT, payload_len=len(payload), checksum=checksum(payload)), payload)
        self.state = ChannelState.FAILED
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.state in (ChannelState.CONNECTED, ChannelState.IDLE):
            self.state = ChannelState.CLOSED
