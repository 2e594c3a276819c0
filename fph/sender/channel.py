"""The data plane over TCP: :class:`SourceChannel` sends frames, :class:`Receiver` writes them into RAM.

Blocking sockets with timeouts, one thread per end: page payloads go from the source's RAM mapping to
the kernel with ``sendmsg`` and from the kernel into the destination's RAM mapping with ``recv_into``,
never through a Python bytes object. Memory stays bounded by one frame (1 MiB) on each side.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import select
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fph.ram_layout import PAGE_SIZE
from fph.sender.ram import RamFile
from fph.sender.wire import (
    HEADER_SIZE,
    MAX_FRAME_PAGES,
    Frame,
    Kind,
    ReceiverProtocol,
    RxState,
    WireError,
    checksum,
    decode_json,
    hello_body,
    json_frame,
    pages_frame,
    parse_header,
)

log = logging.getLogger(__name__)


class ChannelError(RuntimeError):
    """The data connection failed or the other end reported an error; the migration must abort."""


class ChannelState(enum.Enum):
    IDLE = "idle"
    CONNECTED = "connected"
    FINISHED = "finished"
    FAILED = "failed"
    CLOSED = "closed"


@dataclass
class WireCounters:
    frames: int = 0
    bytes_on_wire: int = 0
    pages: int = 0
    zero_pages: int = 0


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ChannelError(f"peer closed the data connection after {got} of {len(view)} bytes")
        got += n


class _Pacer:
    """Token bucket for ``bandwidth`` bytes/s (None: unlimited), like QEMU's max-bandwidth."""

    def __init__(self, bandwidth: int | None) -> None:
        self.bandwidth = bandwidth
        self._start = time.monotonic()
        self._sent = 0

    def account(self, nbytes: int) -> None:
        if not self.bandwidth:
            return
        self._sent += nbytes
        ahead = self._sent / self.bandwidth - (time.monotonic() - self._start)
        if ahead > 0.001:
            time.sleep(ahead)


class SourceChannel:
    """Source end: connect, HELLO, PAGES/ZEROS per round, FINISH, then wait for the destination's ACK."""

    def __init__(
        self, address: tuple[str, int], ram: RamFile, *, bandwidth: int | None = None, timeout: float = 30.0
    ) -> None:
        self.address = address
        self.ram = ram
        self.timeout = timeout
        self.state = ChannelState.IDLE
        self.counters = WireCounters()
        self._pacer = _Pacer(bandwidth)
        self._sock: socket.socket | None = None

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
        self._sock = sock
        self.state = ChannelState.CONNECTED
        self._send(*json_frame(Kind.HELLO, hello_body(self.ram.layout)))

    def _send(self, frame: Frame, payload: bytes | memoryview = b"") -> None:
        if self.state is not ChannelState.CONNECTED or self._sock is None:
            raise ChannelError(f"cannot send {frame.kind.name}: channel is {self.state.value}")
        header = frame.pack()
        total = len(header) + len(payload)
        try:
            sent = self._sock.sendmsg([header, payload] if payload else [header])
            if sent < len(header):  # a partial scatter send: finish it
                self._sock.sendall(header[sent:])
                sent = len(header)
            if sent < total:
                self._sock.sendall(memoryview(payload)[sent - len(header) :])
        except OSError as exc:
            self.state = ChannelState.FAILED
            raise ChannelError(
                f"data connection to {self.address} failed while sending {frame.kind.name}: {exc}"
            ) from None
        self.counters.frames += 1
        self.counters.bytes_on_wire += total
        self._pacer.account(total)

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
            peek = self._sock.recv(1, socket.MSG_PEEK)
        except OSError as exc:
            self.state = ChannelState.FAILED
            raise ChannelError(f"data connection to {self.address} failed: {exc}") from None
        if peek == b"":
            self.state = ChannelState.FAILED
            raise ChannelError(f"the destination receiver at {self.address} closed the connection")
        ack = self._read_ack()
        self.state = ChannelState.FAILED
        raise ChannelError(f"the destination receiver stopped the migration: {ack.get('error', ack)}")

    def _read_ack(self) -> dict[str, Any]:
        assert self._sock is not None
        header = bytearray(HEADER_SIZE)
        _recv_exact(self._sock, memoryview(header))
        frame = parse_header(header)
        if frame.kind is not Kind.ACK or frame.payload_len > 1 << 20:
            raise ChannelError(f"destination replied with {frame.kind.name}, expected ACK")
        payload = bytearray(frame.payload_len)
        _recv_exact(self._sock, memoryview(payload))
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


@dataclass
class ReceiverResult:
    ok: bool
    error: str | None
    counters: dict[str, Any]
    finish: dict[str, Any] | None
    seconds: float


class Receiver:
    """Destination end: accepts one source, writes its pages into the RAM file, verifies every payload.

    ``holds_data[p]`` is 1 for pages this migration wrote with data: the rest are known to be zero
    in a fresh destination file.
    """

    def __init__(
        self,
        ram: RamFile,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        timeout: float = 60.0,
        prepare: bool = True,
    ) -> None:
        if not ram.writable:
            raise ChannelError("the receiver needs the destination RAM file mapped writable")
        self.ram = ram
        self.protocol = ReceiverProtocol(ram.layout)
        self.holds_data = np.zeros(ram.layout.span_pages, dtype=np.uint8)
        self.timeout = timeout
        self._listener = socket.create_server((host, port))
        self._listener.settimeout(timeout)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._thread = threading.Thread(
            target=self._serve, name=f"fph-receiver-{self.address[1]}", daemon=True
        )
        self._conn: socket.socket | None = None
        self._done = threading.Event()
        self.result: ReceiverResult | None = None
        self.prepare = prepare
        self.prepare_s = 0.0
        self._prepared = threading.Event()

    def start(self) -> tuple[str, int]:
        self._thread.start()
        return self.address

    def _serve(self) -> None:
        t0 = time.monotonic()
        error: str | None = None
        try:
            try:  # meanwhile the source may connect (backlog) and start sending (buffered)
                if self.prepare:
                    self.prepare_s = self.ram.prepare_destination()
            finally:
                self._prepared.set()
            conn, _peer = self._listener.accept()
            self._conn = conn
            conn.settimeout(self.timeout)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            self._loop(conn)
        except (OSError, WireError, ChannelError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.error("receiver on %s: %s", self.address, error)
            self._reply({"ok": False, "error": error})
        finally:
            self._listener.close()
            p = self.protocol
            ok = error is None and p.state is RxState.FINISHED
            if error is None and not ok:
                error = f"stream ended in state {p.state.value}" + (
                    f": {p.abort_reason}" if p.abort_reason else ""
                )
            self.result = ReceiverResult(ok, error, asdict(p.counters), p.finish_body, time.monotonic() - t0)
            if self._conn is not None:
                self._conn.close()
            self._done.set()

    def _loop(self, conn: socket.socket) -> None:
        header = bytearray(HEADER_SIZE)
        hview = memoryview(header)
        small = bytearray(1 << 20)
        p = self.protocol
        while p.state in (RxState.WAIT_HELLO, RxState.RECEIVING):
            _recv_exact(conn, hview)
            frame = parse_header(header)
            target = p.on_header(frame)
            if frame.kind is Kind.PAGES and target is not None:
                dest = self.ram.view[target.offset : target.offset + target.length]
                _recv_exact(conn, dest)
                p.on_payload(frame, dest)
                self.holds_data[frame.first_page : frame.first_page + frame.npages] = 1
            elif frame.kind is Kind.ZEROS and target is not None:
                self.ram.buf[target.offset : target.offset + target.length] = 0
                p.on_payload(frame, b"")
                self.holds_data[frame.first_page : frame.first_page + frame.npages] = 0
            else:
                payload = memoryview(small)[: frame.payload_len]
                _recv_exact(conn, payload)
                p.on_payload(frame, payload)
        if p.state is RxState.FINISHED:
            self._reply(
                {"ok": True, "counters": asdict(p.counters), "pages_holding_data": int(self.holds_data.sum())}
            )

    def _reply(self, body: dict[str, Any]) -> None:
        if self._conn is None:
            return
        frame, payload = json_frame(Kind.ACK, body)
        with contextlib.suppress(OSError):
            self._conn.sendall(frame.pack() + payload)

    def wait_prepared(self, timeout: float | None = None) -> float:
        """Block until the destination RAM file is allocated and mapped; returns the seconds it took.

        A source that streams before that waits on a full socket while the kernel allocates pages: the
        engine calls this just before round 0 sends, after the wait for the guest's hints."""
        if not self._prepared.wait(timeout):
            raise ChannelError(f"receiver on {self.address} still preparing after {timeout} s")
        return self.prepare_s

    def wait(self, timeout: float | None = None) -> ReceiverResult:
        if not self._done.wait(timeout):
            raise ChannelError(f"receiver on {self.address} still running after {timeout} s")
        assert self.result is not None
        return self.result

    def stop(self) -> None:
        """Tear down: close the sockets (the serving thread ends with an error if it was mid-stream)."""
        self._listener.close()
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.shutdown(socket.SHUT_RDWR)
        if self._thread.is_alive():
            self._thread.join(5)
