"""The data plane's doors: mutual TLS 1.3 and the one-time credential. Strangers are refused before any page
lands and the receiver waits on for the real source; the destination's RESUMED word reaches the source."""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fph.dirty_bitmap import DirtyBitmap
from fph.migration.precopy import Precopy
from fph.ram_layout import RamLayout
from fph.transfer.channel import ChannelError
from fph.transfer.ram_file import RamFile
from fph.transfer.receiver import RamReceiver
from fph.transfer.security import DataPlaneSecurity, new_credential
from fph.transfer.sender import RamSender
from fph.transfer.wire import AuthError, Kind, ReceiverProtocol, hello_body, json_frame
from fph_lab.certs import LabPki, make_pki

MiB = 1 << 20
LAYOUT = RamLayout.pc(16 * MiB)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return make_pki(tmp_path_factory.mktemp("pki"), {"src": "127.0.0.1", "dst": "127.0.0.1"})


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return make_pki(tmp_path_factory.mktemp("pki2"), {"src": "127.0.0.1"}, ca_name="someone-else")


@pytest.fixture
def rams(shm_files: Callable[..., list[Path]]) -> tuple[RamFile, RamFile]:
    src, dst = shm_files(16 * MiB, "src", "dst")
    data = np.random.default_rng(1).integers(0, 255, 16 * MiB, dtype=np.uint8)
    data[: 4 * MiB] = 0
    data.tofile(src)
    return RamFile(src, LAYOUT, writable=False), RamFile(dst, LAYOUT, writable=True)


def migrate(sender: RamSender) -> dict[str, object]:
    sender.connect()
    bitmap = DirtyBitmap(LAYOUT)
    zeros = np.zeros(bitmap.nwords, dtype=np.uint64)
    pc = Precopy(bitmap, sender.ram, sender, lambda: zeros)
    pc.start()
    pc.run_round()
    pc.final_round()
    return sender.finish({"rounds": pc.round})


def test_the_protocol_refuses_a_hello_without_the_credential() -> None:
    cred = new_credential()
    for presented in (None, "", new_credential(), 42):
        p = ReceiverProtocol(LAYOUT, cred)
        body = hello_body(LAYOUT)
        if presented is not None:
            body["credential"] = presented
        f, payload = json_frame(Kind.HELLO, body)
        p.on_header(f)
        with pytest.raises(AuthError, match="credential"):
            p.on_payload(f, payload)
    p = ReceiverProtocol(LAYOUT, cred)
    f, payload = json_frame(Kind.HELLO, hello_body(LAYOUT, cred))
    p.on_header(f)
    p.on_payload(f, payload)
    assert p.state.value == "receiving"


def _try_tls(address: tuple[str, int], ctx: ssl.SSLContext, hello: bytes | None = None) -> str:
    """A stranger's attempt: returns how it ended (the receiver must refuse it)."""
    with socket.create_connection(address, timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw) as s:
                if hello is not None:
                    s.sendall(hello)
                return "closed" if s.recv(1) == b"" else "answered"
        except (ssl.SSLError, OSError) as exc:
            return f"tls failed: {type(exc).__name__}"


def test_strangers_are_refused_and_the_real_source_gets_through(
    rams: tuple[RamFile, RamFile], pki: LabPki, other_pki: LabPki
) -> None:
    src, dst = rams
    cred = new_credential()
    receiver = RamReceiver(
        dst, accept_timeout=30, security=DataPlaneSecurity(cred, pki.host("dst")), hold_for_resume=True
    )
    address = receiver.start()
    receiver.wait_prepared(30)
    try:
        # 1. plain TCP, pages straight away: no TLS handshake, refused
        with socket.create_connection(address, timeout=5) as s:
            s.sendall(b"\0" * 4096)
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(1) == b""
        # 2. TLS with a certificate of another CA: the handshake fails
        assert _try_tls(address, other_pki.host("src").client_context()).startswith(("tls failed", "closed"))
        # 3. TLS with a good certificate but no credential in HELLO: refused after the handshake
        f, payload = json_frame(Kind.HELLO, hello_body(LAYOUT, new_credential()))
        assert _try_tls(address, pki.host("src").client_context(), f.pack() + payload) == "closed"
        assert not receiver.holds_data.any(), "a refused peer wrote pages"
        assert receiver.result is None, "a refused peer ended the receiver"
        # 4. the source with TLS and the credential
        sender = RamSender(address, src, security=DataPlaneSecurity(cred, pki.host("src")))
        ack = migrate(sender)
        assert ack["ok"], ack
        rx = receiver.wait(30)
        assert rx.ok and rx.counters["refused_peers"] == 3, (rx, receiver.refused)
        assert np.array_equal(src.buf, dst.buf)
        # the destination's word after its device state
        receiver.send_resumed({"resumed": True, "status": "running"})
        assert sender.wait_resumed(5) == {"resumed": True, "status": "running"}
        sender.close()
    finally:
        receiver.stop()
        src.close()
        dst.close()


def test_a_source_without_tls_cannot_reach_a_tls_receiver(rams: tuple[RamFile, RamFile], pki: LabPki) -> None:
    src, dst = rams
    cred = new_credential()
    receiver = RamReceiver(dst, accept_timeout=5, security=DataPlaneSecurity(cred, pki.host("dst")))
    address = receiver.start()
    try:
        sender = RamSender(address, src, security=DataPlaneSecurity(cred), timeout=5)
        with pytest.raises(ChannelError):
            migrate(sender)
        sender.close()
        assert receiver.wait(10).ok is False and not receiver.holds_data.any()
        assert receiver.refused and "127.0.0.1" in receiver.refused[0]
    finally:
        receiver.stop()
        src.close()
        dst.close()
