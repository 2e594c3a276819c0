"""A minimal QMP server (QEMU's side of a monitor socket) for daemon tests without a guest.

Answers the greeting and capability negotiation like QEMU, then each command from ``replies``: a value
is returned as ``{"return": value}``, an ``Exception`` instance as ``{"error": {"class": "GenericError",
"desc": str(exc)}}``; unknown commands get QEMU's CommandNotFound. Serves one client at a time, as a QEMU
monitor does.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from pathlib import Path
from typing import Any

GREETING = {
    "QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 11}, "package": ""}, "capabilities": []}
}


class FakeQMP:
    def __init__(self, path: Path, replies: dict[str, Any]) -> None:
        self.path = path
        self.replies = {"qmp_capabilities": {}, **replies}
        self.commands: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conn = conn
            with conn:
                self._client(conn)

    def _client(self, conn: socket.socket) -> None:
        conn.settimeout(None)
        try:
            conn.sendall(json.dumps(GREETING).encode() + b"\r\n")
        except OSError:
            return  # a client that only probed the socket and left (as QEMU, serve the next one)
        buf = ""
        decoder = json.JSONDecoder()
        while not self._stop.is_set():
            # QMP is a JSON stream, not lines: qemu.qmp sends no newline after a command
            try:
                msg, end = decoder.raw_decode(buf.lstrip())
                buf = buf.lstrip()[end:]
            except json.JSONDecodeError:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk.decode()
                continue
            cmd = msg.get("execute", "")
            self.commands.append(cmd)
            reply: dict[str, Any]
            if cmd not in self.replies:
                reply = {
                    "error": {"class": "CommandNotFound", "desc": f"The command {cmd} has not been found"}
                }
            elif isinstance(self.replies[cmd], Exception):
                reply = {"error": {"class": "GenericError", "desc": str(self.replies[cmd])}}
            else:
                reply = {"return": self.replies[cmd]}
            if "id" in msg:
                reply["id"] = msg["id"]
            try:
                conn.sendall(json.dumps(reply).encode() + b"\r\n")
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        conn = getattr(self, "_conn", None)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(2)
