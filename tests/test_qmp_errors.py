"""QEMU's errors reach the caller with QEMU's own description, in fph's one error tree.

A small QMP server speaking the real wire format (greeting, capabilities, id-matched replies, events)
stands in for QEMU so the error paths run without a guest; the lab tests cover real QEMU.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fph.migration_hook import NativeMigration
from fph.qmp import (
    MigrationError,
    QMPCommandError,
    QMPConnectError,
    QMPConnection,
    QMPError,
    qmp_call,
)

Handler = Callable[[dict[str, Any]], list[dict[str, Any]]]
GREETING = {
    "QMP": {"version": {"qemu": {"micro": 2, "minor": 1, "major": 11}, "package": ""}, "capabilities": []}
}


class FakeQMP:
    """Serves QMP on a unix socket; ``handler(request)`` returns the messages to send back."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.requests: list[dict[str, Any]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        # QMP is a JSON stream, not lines: qemu.qmp sends no newline after a command.
        with conn:
            conn.sendall(json.dumps(GREETING).encode() + b"\r\n")
            buf = ""
            dec = json.JSONDecoder()
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data.decode()
                while buf.strip():
                    try:
                        req, end = dec.raw_decode(buf.lstrip())
                    except ValueError:
                        break
                    buf = buf.lstrip()[end:]
                    self.requests.append(req)
                    out = [{"return": {}}] if req["execute"] == "qmp_capabilities" else self.handler(req)
                    for msg in out:
                        if ("return" in msg or "error" in msg) and "id" in req:
                            msg = {**msg, "id": req["id"]}
                        conn.sendall(json.dumps(msg).encode() + b"\r\n")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake_qmp(tmp_path: Path) -> Iterator[Callable[[str, Handler], FakeQMP]]:
    servers: list[FakeQMP] = []

    def make(name: str, handler: Handler) -> FakeQMP:
        s = FakeQMP(tmp_path / name, handler)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def _error(desc: str, cls: str = "GenericError") -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}


def test_sync_call_surfaces_qemu_description(fake_qmp: Callable[[str, Handler], FakeQMP]) -> None:
    desc = "Parameter 'downtime-limit' expects an integer in the range of 0 to 2000000 milliseconds"
    srv = fake_qmp("q.sock", lambda req: [_error(desc, "GenericError")])
    with pytest.raises(QMPCommandError) as ei:
        qmp_call(str(srv.path), "migrate-set-parameters", {"downtime-limit": -1})
    e = ei.value
    assert e.desc == desc
    assert e.error_class == "GenericError"
    assert e.command == "migrate-set-parameters"
    assert e.arguments == {"downtime-limit": -1}
    assert desc in str(e)
    assert isinstance(e, QMPError)


def test_sync_call_skips_events_and_returns_value(fake_qmp: Callable[[str, Handler], FakeQMP]) -> None:
    ev = {"event": "RESUME", "data": {}, "timestamp": {"seconds": 1, "microseconds": 0}}
    srv = fake_qmp("q.sock", lambda req: [ev, {"return": {"status": "running", "running": True}}])
    assert qmp_call(str(srv.path), "query-status") == {"status": "running", "running": True}


def test_connect_error_names_the_socket(tmp_path: Path) -> None:
    with pytest.raises(QMPConnectError) as ei:
        qmp_call(str(tmp_path / "absent.sock"), "query-status", timeout=0.3)
    assert "absent.sock" in str(ei.value)
    assert isinstance(ei.value, QMPError)


def test_async_execute_surfaces_qemu_description(fake_qmp: Callable[[str, Handler], FakeQMP]) -> None:
    desc = "Could not open 'device': No such file"
    srv = fake_qmp("q.sock", lambda req: [_error(desc, "DeviceNotFound")])

    async def go() -> QMPCommandError:
        conn = QMPConnection(str(srv.path))
        await conn.connect()
        try:
            with pytest.raises(QMPCommandError) as ei:
                await conn.execute("device_del", {"id": "bal0"})
            return ei.value
        finally:
            await conn.close()

    e = asyncio.run(go())
    assert (e.desc, e.error_class, e.command) == (desc, "DeviceNotFound", "device_del")


def _dst_handler(req: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"return": {}}]


def test_native_migration_refused_by_qemu(fake_qmp: Callable[[str, Handler], FakeQMP]) -> None:
    desc = "Migration is disabled when VirtIO 'vhost-user-test-device' is in use"

    def src(req: dict[str, Any]) -> list[dict[str, Any]]:
        return [_error(desc)] if req["execute"] == "migrate" else [{"return": {}}]

    s, d = fake_qmp("src.sock", src), fake_qmp("dst.sock", _dst_handler)
    mig = NativeMigration(str(s.path), str(d.path), "unix:/nonexistent/mig.sock")
    with pytest.raises(QMPCommandError) as ei:
        asyncio.run(mig.run(timeout=10))
    assert ei.value.desc == desc and ei.value.command == "migrate"
    sent = [r["execute"] for r in s.requests]
    # Capabilities and the explicit bandwidth go out before migrate.
    assert (
        sent.index("migrate-set-capabilities") < sent.index("migrate-set-parameters") < sent.index("migrate")
    )
    params = next(r for r in s.requests if r["execute"] == "migrate-set-parameters")["arguments"]
    assert params["max-bandwidth"] > 0 and params["downtime-limit"] == 300


def test_native_migration_failure_carries_error_desc(fake_qmp: Callable[[str, Handler], FakeQMP]) -> None:
    desc = "Unable to write to socket: Broken pipe"

    def src(req: dict[str, Any]) -> list[dict[str, Any]]:
        if req["execute"] == "migrate":
            ts = {"seconds": 1, "microseconds": 0}
            return [
                {"return": {}},
                {"event": "MIGRATION", "data": {"status": "setup"}, "timestamp": ts},
                {"event": "MIGRATION", "data": {"status": "failed"}, "timestamp": ts},
            ]
        if req["execute"] == "query-migrate":
            return [{"return": {"status": "failed", "error-desc": desc}}]
        return [{"return": {}}]

    s, d = fake_qmp("src.sock", src), fake_qmp("dst.sock", _dst_handler)
    mig = NativeMigration(str(s.path), str(d.path), "unix:/x/mig.sock")
    with pytest.raises(MigrationError) as ei:
        asyncio.run(mig.run(timeout=10))
    assert ei.value.status == "failed"
    assert ei.value.desc == desc
    assert desc in str(ei.value)
    assert [h.point.value for h in mig.dispatcher.history] == ["setup", "cleanup"]
