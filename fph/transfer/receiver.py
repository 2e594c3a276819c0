"""The destination end of the data plane: :class:`RamReceiver` accepts one source, writes its pages into
the destination RAM file and verifies every payload.

As its own process, on the destination host next to the destination QEMU (``-incoming defer``, RAM in
``PATH``): ``python -m fph.transfer.receiver --ram PATH --mem-mib N`` maps and pre-faults the RAM file,
listens, prints ``FPH-RECEIVER <host> <port>`` once it is ready for a source, takes one migration stream,
prints the result as JSON and exits 0 only if every page arrived and verified. The source's migration is
given that address (``FphMigration(receiver_address=...)``).
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from fph.ram_layout import RamLayout
from fph.transfer.channel import ChannelError, recv_exact
from fph.transfer.pacer import WindowMeter
from fph.transfer.ram_file import RamFile, RamFileError
from fph.transfer.security import DataPlaneSecurity, SecurityError, TlsFiles
from fph.transfer.wire import (
    HEADER_SIZE,
    AuthError,
    Kind,
    ReceiverProtocol,
    RxState,
    WireError,
    fill_value,
    json_frame,
    parse_header,
)

log = logging.getLogger(__name__)

AUTH_TIMEOUT_S = 10.0
"""A connecting peer has this long for TLS and its HELLO; a silent one cannot hold the destination."""
MAX_REFUSED_PEERS = 64


@dataclass
class ReceiverResult:
    ok: bool
    error: str | None
    counters: dict[str, Any]
    finish: dict[str, Any] | None
    seconds: float


class FilePrep(enum.Enum):
    """How the receiver prepares the destination RAM file (see ``RamFile.prepare_destination``)."""

    NONE = "none"
    """Pages are allocated as they land."""
    ALLOCATE = "allocate"
    """fallocate only (0.25 s for 1 GiB on tmpfs): the memory is taken up front, each landing page still
    costs a page fault in the receiver. For a receiver that takes pages as soon as it is prepared (the
    destination daemon's): a populate running while pages land took the CPU from the receiver and cut
    round 0's rate at the wire from 120 to 15-74 MB/s for its last 0.6 s (bench/results/twohost_bench*)."""
    POPULATE = "populate"
    """fallocate, then map every page (1.2 s for 1 GiB with an idle host): fastest once done, for a
    source that waits for it (``wait_prepared``) before it sends."""


class RamReceiver:
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
        prepare: FilePrep = FilePrep.POPULATE,
        accept_timeout: float | None = None,
        security: DataPlaneSecurity | None = None,
        hold_for_resume: bool = False,
    ) -> None:
        """``timeout``: for the stream once a source connected; ``accept_timeout`` (default: ``timeout``):
        how long to wait for the source at all (a receiver prepared ahead of the migration waits longer).
        ``security``: TLS and the credential a source must present (None: any local source).
        ``hold_for_resume``: after the ACK, keep the connection for :meth:`send_resumed` (the destination
        daemon tells the source what became of the destination QEMU)."""
        if not ram.writable:
            raise ChannelError("the receiver needs the destination RAM file mapped writable")
        self.ram = ram
        self.security = security
        self._tls = None if security is None or security.tls is None else security.tls.server_context()
        self.hold_for_resume = hold_for_resume
        self.protocol = ReceiverProtocol(ram.layout, None if security is None else security.credential)
        self.refused: list[str] = []
        """Peers refused before any page (no TLS certificate of the CA, no credential): who and why."""
        self.holds_data = np.zeros(ram.layout.span_pages, dtype=np.uint8)
        self.timeout = timeout
        self._listener = socket.create_server((host, port))
        self._listener.settimeout(accept_timeout or timeout)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._thread = threading.Thread(
            target=self._serve, name=f"fph-receiver-{self.address[1]}", daemon=True
        )
        self._conn: socket.socket | None = None
        self._done = threading.Event()
        self.result: ReceiverResult | None = None
        self.meter = WindowMeter()
        """Bytes as they arrived at the socket (the other side of the sender's cap)."""
        self.prepare = prepare
        self.prepare_s = 0.0
        self._prepared = threading.Event()
        self._stopping = False

    def start(self) -> tuple[str, int]:
        self._thread.start()
        return self.address

    def _prepare_file(self) -> None:
        """At the lowest CPU priority (this thread only): on a busy host, pages landing come first."""
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            self.prepare_s = self.ram.prepare_destination(populate=self.prepare is FilePrep.POPULATE)
        except OSError as exc:  # the first write to each page then faults it in: slower, not wrong
            log.warning("receiver on %s: destination RAM file not prepared: %s", self.address, exc)
        finally:
            self._prepared.set()

    def _serve(self) -> None:
        t0 = time.monotonic()
        error: str | None = None
        # The file is prepared while the source connects, authenticates and sends: allocation and
        # MADV_POPULATE_WRITE keep what is in the file, so a page that lands first is not lost, and a source
        # that connects right after PrepareIncoming no longer waits seconds for its TLS handshake.
        preparing = None
        if self.prepare is not FilePrep.NONE:
            preparing = threading.Thread(
                target=self._prepare_file, name=f"{self._thread.name}-prep", daemon=True
            )
            preparing.start()
        else:
            self._prepared.set()
        try:
            conn = self._accept_source()
            self._loop(conn)
        except (OSError, WireError, ChannelError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            if self._stopping:
                error = f"stopped ({error})"
                log.info("receiver on %s stopped", self.address)
            else:
                log.error("receiver on %s: %s", self.address, error)
            self._reply({"ok": False, "error": error})
        finally:
            self._listener.close()
            if preparing is not None:  # nobody unmaps the file under it
                preparing.join()
            p = self.protocol
            ok = error is None and p.state is RxState.FINISHED
            if error is None and not ok:
                error = f"stream ended in state {p.state.value}" + (
                    f": {p.abort_reason}" if p.abort_reason else ""
                )
            counters = {**asdict(p.counters), "refused_peers": len(self.refused)}
            self.result = ReceiverResult(ok, error, counters, p.finish_body, time.monotonic() - t0)
            if self._conn is not None and not (ok and self.hold_for_resume):
                self._conn.close()
            self._done.set()

    def _accept_source(self) -> socket.socket:
        """The first peer that completes TLS (if required) and sends a HELLO with this migration's
        credential. Anyone else is refused, logged and closed, and the receiver waits on: a stray or hostile
        connection must not cost the real migration its destination."""
        deadline = time.monotonic() + (self._listener.gettimeout() or self.timeout)
        while True:
            self._listener.settimeout(max(0.001, deadline - time.monotonic()))
            raw, peer = self._listener.accept()
            raw.settimeout(min(self.timeout, AUTH_TIMEOUT_S))
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            conn: socket.socket = raw
            try:
                if self._tls is not None:
                    conn = self._tls.wrap_socket(raw, server_side=True)
                self._conn = conn
                self._read_hello(conn)
            except (OSError, AuthError, ChannelError) as exc:  # a source that got in but sent a bad
                # HELLO (another layout) is this migration's failure, not a stranger: that propagates
                reason = f"{peer[0]}:{peer[1]}: {type(exc).__name__}: {exc}"
                log.warning("receiver on %s refused a peer before any page: %s", self.address, reason)
                self.refused.append(reason)
                self._conn = None
                conn.close()
                self.protocol = ReceiverProtocol(self.ram.layout, self.protocol.credential)
                if len(self.refused) >= MAX_REFUSED_PEERS:
                    raise ChannelError(f"{len(self.refused)} peers refused; the last: {reason}") from None
                continue
            conn.settimeout(self.timeout)
            return conn

    def _read_hello(self, conn: socket.socket) -> None:
        """The first frame, which must be HELLO with the credential (the protocol checks both)."""
        header = bytearray(HEADER_SIZE)
        recv_exact(conn, memoryview(header), self.meter.add)
        try:
            frame = parse_header(header)
            self.protocol.on_header(frame)
        except WireError as exc:  # not an fph source at all
            raise AuthError(f"not an fph data stream: {exc}") from None
        payload = bytearray(frame.payload_len)
        recv_exact(conn, memoryview(payload), self.meter.add)
        self.protocol.on_payload(frame, payload)

    def _loop(self, conn: socket.socket) -> None:
        header = bytearray(HEADER_SIZE)
        hview = memoryview(header)
        meter = self.meter.add
        small = bytearray(1 << 20)
        p = self.protocol
        while p.state in (RxState.WAIT_HELLO, RxState.RECEIVING):
            recv_exact(conn, hview, meter)
            frame = parse_header(header)
            target = p.on_header(frame)
            if frame.kind is Kind.PAGES and target is not None:
                dest = self.ram.view[target.offset : target.offset + target.length]
                recv_exact(conn, dest, meter)
                p.on_payload(frame, dest)
                self.holds_data[frame.first_page : frame.first_page + frame.npages] = 1
            elif frame.kind is Kind.FILL and target is not None:
                payload = memoryview(small)[: frame.payload_len]
                recv_exact(conn, payload, meter)
                p.on_payload(frame, payload)
                self.ram.buf[target.offset : target.offset + target.length].view(np.uint64)[:] = fill_value(
                    payload
                )
                self.holds_data[frame.first_page : frame.first_page + frame.npages] = 1
            elif frame.kind is Kind.ZEROS and target is not None:
                self.ram.buf[target.offset : target.offset + target.length] = 0
                p.on_payload(frame, b"")
                self.holds_data[frame.first_page : frame.first_page + frame.npages] = 0
            else:
                payload = memoryview(small)[: frame.payload_len]
                recv_exact(conn, payload, meter)
                p.on_payload(frame, payload)
        if p.state is RxState.FINISHED:
            self._reply(
                {"ok": True, "counters": asdict(p.counters), "pages_holding_data": int(self.holds_data.sum())}
            )

    def _reply(self, body: dict[str, Any], kind: Kind = Kind.ACK) -> None:
        if self._conn is None:
            return
        frame, payload = json_frame(kind, body)
        with contextlib.suppress(OSError):
            self._conn.sendall(frame.pack() + payload)

    def send_resumed(self, body: dict[str, Any]) -> None:
        """After a successful stream (``hold_for_resume``): tell the source what the destination did once
        QEMU's device state arrived (``{"resumed": true, ...}`` or why not), then close the connection."""
        if not self._done.is_set():
            raise ChannelError("send_resumed() before the stream finished")
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            frame, payload = json_frame(Kind.RESUMED, body)
            with contextlib.suppress(OSError):
                conn.sendall(frame.pack() + payload)
        finally:
            conn.close()

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
        """Tear down: close the sockets (the serving thread ends with an error if it was mid-stream). The
        listener is shut down first: closing it alone does not wake a thread blocked in accept()."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.shutdown(socket.SHUT_RDWR)
        if self._thread.is_alive():
            self._thread.join(5)
        if self._done.is_set() and self._conn is not None:  # held for send_resumed, which never came
            conn, self._conn = self._conn, None
            conn.close()


MiB = 1 << 20


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ram", required=True, help="the destination guest's RAM file")
    ap.add_argument("--mem-mib", type=int, required=True, help="guest RAM size (QEMU -m)")
    ap.add_argument("--machine", choices=("pc", "q35"), default="pc")
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the whole stream")
    ap.add_argument("--credential-file", type=Path, help="the one-time credential the source must present")
    ap.add_argument(
        "--tls-cert", type=Path, help="this host's certificate (mutual TLS; with --tls-key/--tls-ca)"
    )
    ap.add_argument("--tls-key", type=Path)
    ap.add_argument("--tls-ca", type=Path, help="the CA every source's certificate must chain to")
    args = ap.parse_args(argv)
    tls_args = (args.tls_cert, args.tls_key, args.tls_ca)
    if any(tls_args) and not all(tls_args):
        print("fph receiver: --tls-cert, --tls-key and --tls-ca go together", file=sys.stderr)
        return 2
    security = None
    if args.credential_file is not None or all(tls_args):
        try:
            cred = args.credential_file.read_text().strip() if args.credential_file else ""
        except OSError as exc:
            print(f"fph receiver: {exc}", file=sys.stderr)
            return 2
        tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_ca) if all(tls_args) else None
        security = DataPlaneSecurity(cred, tls)
    host, _, port = args.listen.rpartition(":")
    layout = (RamLayout.pc if args.machine == "pc" else RamLayout.q35)(args.mem_mib * MiB)
    try:
        ram = RamFile(args.ram, layout, writable=True)
    except RamFileError as exc:
        print(f"fph receiver: {exc}", file=sys.stderr)
        return 2
    try:
        receiver = RamReceiver(
            ram, host or "127.0.0.1", int(port or 0), timeout=args.timeout, security=security
        )
    except SecurityError as exc:
        ram.close()
        print(f"fph receiver: {exc}", file=sys.stderr)
        return 2

    def stop(signum: int, _frame: FrameType | None) -> None:
        receiver.stop()

    signal.signal(signal.SIGTERM, stop)
    addr = receiver.start()
    receiver.wait_prepared()  # "ready" means the RAM file is allocated and mapped, not just listening
    print(f"FPH-RECEIVER {addr[0]} {addr[1]}", flush=True)
    result = receiver.wait(args.timeout + 60)
    print(json.dumps(asdict(result)), flush=True)
    ram.close()
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
