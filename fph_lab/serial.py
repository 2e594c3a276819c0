"""Serial control of a lab guest: commands in over QEMU's socket chardev, output read back from its log file.

The guest's /init runs ``stty -echo; while read -r line; do eval "$line"; done`` on ttyS0. Every command
is sent as one line followed by our own end marker ``FPH-END <n> rc=<status>``, so the host knows exactly
where a command's output ends. QEMU writes everything the guest prints (boot messages included) to the
chardev's log file whether or not we are connected; parsing the log instead of the socket means nothing is
ever missed. A daemon thread drains the socket so QEMU never blocks on a full socket buffer.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from pathlib import Path

from fph.waiting import poll_until, retry_until
from fph_lab.errors import GuestConsoleError

# Kernel trouble that fails the destination check (and every guest test).
KERNEL_ERROR = re.compile(
    r"(Oops|BUG:|BUG |Kernel panic|general protection fault|Fatal exception|"
    r"Unable to handle kernel|FPH-HB-MISMATCH|segfault at)"
)


class SerialConsole:
    """Send commands to the guest and wait for lines in its serial log."""

    def __init__(self, socket_path: str, log_path: str) -> None:
        self.socket_path = socket_path
        self.log_path = log_path
        self._sock: socket.socket | None = None
        self._seq = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def connect(self, timeout: float = 10.0) -> None:
        """Connect to QEMU's serial socket (QEMU is the server)."""

        def attempt() -> socket.socket:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.socket_path)
            except OSError:
                s.close()
                raise
            return s

        try:
            self._sock = retry_until(attempt, timeout, (OSError,))
        except OSError as e:
            raise GuestConsoleError(f"cannot connect to serial socket {self.socket_path}: {e}") from e
        self._thread = threading.Thread(
            target=self._drain, name=f"serial-drain {self.socket_path}", daemon=True
        )
        self._thread.start()

    def _drain(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._closed.is_set():
            try:
                if not sock.recv(65536):
                    return
            except OSError:
                return

    def close(self) -> None:
        self._closed.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None

    # -- reading

    def text(self, since: int = 0) -> str:
        """The serial log from byte offset ``since`` (CR removed)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    def offset(self) -> int:
        """Current end of the log: pass as ``since`` to look only at what comes after now."""
        try:
            return Path(self.log_path).stat().st_size
        except FileNotFoundError:
            return 0

    def wait_for(
        self,
        pattern: str | re.Pattern[str],
        timeout: float,
        since: int = 0,
        fail_on_kernel_error: bool = True,
    ) -> re.Match[str]:
        """Wait until ``pattern`` appears in the log after ``since``; fail early on a kernel Oops/panic."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        text = ""

        def search() -> re.Match[str] | None:
            nonlocal text
            text = self.text(since)
            m = rx.search(text)
            if m is None and fail_on_kernel_error:
                bad = KERNEL_ERROR.search(text)
                if bad:
                    line = text[text.rfind("\n", 0, bad.start()) + 1 :].split("\n", 1)[0]
                    raise GuestConsoleError(
                        f"guest kernel error while waiting for {rx.pattern!r}: {line}\n(log: {self.log_path})"
                    )
            return m

        m = poll_until(search, timeout, 0.02)
        if m is None:
            tail = "\n".join(text.strip().splitlines()[-8:])
            raise GuestConsoleError(
                f"timeout ({timeout:.0f} s) waiting for {rx.pattern!r} on the serial console "
                f"({self.log_path}); last lines:\n{tail}"
            )
        return m

    # -- commands

    def send_line(self, line: str) -> None:
        """Send one raw line to the guest's command loop."""
        if "\n" in line:
            raise ValueError("one command per line")
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        try:
            self._sock.sendall(line.encode() + b"\n")
        except OSError as e:
            raise GuestConsoleError(f"serial socket {self.socket_path}: {e}") from e

    def run(self, command: str, timeout: float = 60.0, check: bool = True) -> str:
        """Run a shell command in the guest; return its output (lines between the send and the end marker)."""
        with self._lock:
            self._seq += 1
            seq = self._seq
            since = self.offset()
            quoted = "'" + command.replace("'", "'\\''") + "'"
            self.send_line(f'eval {quoted}; echo "FPH-END {seq} rc=$?"')
            m = self.wait_for(re.compile(rf"FPH-END {seq} rc=(\d+)"), timeout, since)
        out = self.text(since)[: m.start()]
        rc = int(m.group(1))
        if check and rc != 0:
            raise GuestConsoleError(f"guest command {command!r} exited {rc}:\n{out.strip()}")
        return out
