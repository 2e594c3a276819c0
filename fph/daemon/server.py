"""``fph serve``: the daemon process. Config from a TOML file, then flags; grpc.aio on a Unix socket created
0600 (file permissions are the access control); TCP only with mutual TLS; JSON-lines logs; SIGTERM/SIGINT
stop it cleanly: running migrations are cancelled (each rolls back), then every guest still holding hinted
pages gets DONE before the balloon sockets close.

Config file (every key optional; flags win)::

    socket = "/run/fph/fph.sock"
    socket_mode = "0600"
    socket_group = "kvm"                   # group of the socket (with socket_mode "0660")
    state_dir = "/run/fph"
    metrics_address = "127.0.0.1:9477"     # opt-in Prometheus endpoint
    log_format = "json"                    # or "text"
    log_level = "info"
    [tcp]                                  # opt-in; refused without all three files
    address = "0.0.0.0:7443"
    cert = "/etc/fph/server.pem"
    key = "/etc/fph/server.key"
    client_ca = "/etc/fph/clients-ca.pem"
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import grp
import ipaddress
import json
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from fph.daemon.incoming import DataPlane
from fph.daemon.service import SERVICE_NAMES, Daemon, add_services
from fph.daemon.state_file import StateFileError
from fph.migration.fph_mode import warm_kernels
from fph.transfer.security import SecurityError, TlsFiles

log = logging.getLogger("fph.daemon")


class ConfigError(ValueError):
    """A config file or flag the daemon cannot start with; the message says which and why."""


@dataclass
class DaemonConfig:
    socket: str = "/run/fph/fph.sock"
    socket_mode: int = 0o600
    socket_group: str = ""
    """A group name or gid for the socket (empty: the daemon's own group)."""
    state_dir: str = "/run/fph"
    metrics_address: str = ""
    log_format: str = "json"
    log_level: str = "info"
    tcp_address: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    data_address: str = "127.0.0.1"
    """The IP this host's incoming migrations listen on (RAM receivers and QEMU's device-state stream)."""
    data_tls: str = "auto"
    """Mutual TLS on the data plane: "auto" (on when the TLS files are given), "on" or "off"."""

    @classmethod
    def load(cls, path: Path | None, overrides: dict[str, Any]) -> DaemonConfig:
        cfg = cls()
        if path is not None:
            try:
                data = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise ConfigError(f"config {path}: {e}") from e
            tcp = data.pop("tcp", {})
            flat = {**data, **{f"tcp_{k}" if k == "address" else f"tls_{k}": v for k, v in tcp.items()}}
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = set(flat) - known
            if unknown:
                raise ConfigError(f"config {path}: unknown keys {sorted(unknown)}")
            for k, v in flat.items():
                setattr(cfg, k, v)
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
        if isinstance(cfg.socket_mode, str):
            try:
                cfg.socket_mode = int(cfg.socket_mode, 8)
            except ValueError as e:
                raise ConfigError(f"socket_mode {cfg.socket_mode!r} is not an octal mode") from e
        defaults = cls()
        for f in dataclasses.fields(cls):
            value, want = getattr(cfg, f.name), type(getattr(defaults, f.name))
            if type(value) is not want:
                kind = "an integer" if want is int else "a string"
                raise ConfigError(f"{f.name} = {value!r}: must be {kind}")
        cfg.validate()
        return cfg

    def data_plane(self) -> DataPlane:
        """Where incoming migrations listen and with which TLS files (None: in the clear)."""
        tls_on = self.data_tls == "on" or (self.data_tls == "auto" and bool(self.tls_cert))
        tls = TlsFiles(Path(self.tls_cert), Path(self.tls_key), Path(self.tls_client_ca)) if tls_on else None
        if tls is not None:
            try:
                tls.server_context()
                tls.client_context()
            except SecurityError as exc:
                raise ConfigError(str(exc)) from exc
        return DataPlane(self.data_address, tls)

    def socket_gid(self) -> int | None:
        """The socket's group as a gid (None: leave the daemon's); ConfigError if there is no such group."""
        if not self.socket_group:
            return None
        if self.socket_group.isdigit():
            return int(self.socket_group)
        try:
            return grp.getgrnam(self.socket_group).gr_gid
        except KeyError:
            raise ConfigError(f"socket_group {self.socket_group!r}: no such group") from None

    def validate(self) -> None:
        if not self.socket and not self.tcp_address:
            raise ConfigError("nothing to listen on: give --socket PATH (or --tcp with mutual TLS)")
        if self.socket and not os.path.isabs(self.socket):
            raise ConfigError(f"socket {self.socket!r} must be an absolute path")
        if self.socket_mode & 0o7077 & ~0o070:
            raise ConfigError(f"socket_mode {self.socket_mode:o}: others may not get access (0600 or 0660)")
        if self.tcp_address:
            missing = [n for n in ("tls_cert", "tls_key", "tls_client_ca") if not getattr(self, n)]
            if missing:
                raise ConfigError(
                    f"TCP ({self.tcp_address}) is served only with mutual TLS: also give "
                    + ", ".join("--" + n.replace("_", "-") for n in missing)
                )
        try:
            loopback = ipaddress.ip_address(self.data_address).is_loopback
        except ValueError:
            raise ConfigError(f"data_address {self.data_address!r} is not an IP address") from None
        if self.data_tls not in ("auto", "on", "off"):
            raise ConfigError(f"data_tls {self.data_tls!r}: auto, on or off")
        tls_files = all((self.tls_cert, self.tls_key, self.tls_client_ca))
        if self.data_tls == "on" and not tls_files:
            raise ConfigError("data_tls on needs tls_cert, tls_key and tls_client_ca")
        if not loopback and self.data_tls == "auto" and not tls_files:
            raise ConfigError(
                f"data_address {self.data_address} leaves this host: guest memory crosses the network only "
                'under mutual TLS: give tls_cert, tls_key and tls_client_ca (or data_tls = "off" to send '
                "it in the clear on a network you trust)"
            )
        if self.log_format not in ("json", "text"):
            raise ConfigError(f"log_format {self.log_format!r}: json or text")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"log_level {self.log_level!r}: debug, info, warning, error or critical")
        self.socket_gid()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and every ``extra`` field."""

    _std = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in self._std:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(cfg: DaemonConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if cfg.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.log_level.upper())


class DaemonServer:
    """The daemon's gRPC server and state; ``await start()``, then ``await stop()``."""

    def __init__(self, cfg: DaemonConfig) -> None:
        self.cfg = cfg
        state = Path(cfg.state_dir)
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd: int | None = _lock_state_dir(state)
        self._socket_ino: int | None = None
        self.daemon = Daemon(state, cfg.socket, cfg.data_plane())
        self.server: Any = None
        self.health: Any = None
        self.metrics_address: tuple[str, int] | None = None
        self.tcp_port: int | None = None
        self.kernels_warm = threading.Event()
        """Set once the migration kernels are loaded (``warm_kernels`` at start, on a thread of its own)."""

    async def start(self) -> None:
        cfg = self.cfg
        try:
            await self.daemon.restore()  # the previous daemon's VMs; its interrupted migrations rolled back
        except StateFileError as exc:
            raise ConfigError(f"cannot restore the saved state: {exc}") from exc
        self.server = grpc.aio.server()
        self.health = add_services(self.server, self.daemon)
        if cfg.socket:
            _bind_unix(self.server, cfg.socket, cfg.socket_mode)
        if cfg.tcp_address:
            creds = grpc.ssl_server_credentials(
                [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())],
                root_certificates=Path(cfg.tls_client_ca).read_bytes(),
                require_client_auth=True,
            )
            self.tcp_port = self.server.add_secure_port(cfg.tcp_address, creds)
        await self.server.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if cfg.socket:
            os.chmod(cfg.socket, cfg.socket_mode)
            gid = cfg.socket_gid()
            if gid is not None:
                os.chown(cfg.socket, -1, gid)
            self._socket_ino = os.lstat(cfg.socket).st_ino
        if cfg.metrics_address:
            self.metrics_address = self.daemon.metrics.serve(cfg.metrics_address)
        # a daemon thread: a cold compile (no numba cache yet) never holds up a SIGTERM'd daemon's exit
        threading.Thread(target=self._warm_kernels, name="fph-warm-kernels", daemon=True).start()
        log.info(
            "serving",
            extra={
                "socket": cfg.socket,
                "tcp": cfg.tcp_address or None,
                "state_dir": str(self.daemon.state_dir),
                "metrics": self.metrics_address,
            },
        )

    def _warm_kernels(self) -> None:
        """The migration kernels, loaded while nothing waits for them: a daemon's first fph migration spent
        426 ms loading them in its setup (twohost_bench). A failure here is the migration's to report."""
        t0 = time.monotonic()
        try:
            warm_kernels()
        except Exception as exc:
            log.warning("migration kernels not warmed", extra={"error": str(exc)})
            return
        self.kernels_warm.set()
        log.info("migration kernels warm", extra={"ms": round((time.monotonic() - t0) * 1e3, 1)})

    async def stop(self, grace: float = 0.3, *, stop_workers: bool = False) -> None:
        """Cancel migrations, DONE to guests holding hinted pages, then stop serving and remove the socket.
        The VMs' balloon workers keep running for the next daemon unless ``stop_workers``."""
        log.info("shutting down")
        if self.server is not None:
            await self.health.enter_graceful_shutdown()  # probes see NOT_SERVING from now on
        await self.daemon.close(stop_workers=stop_workers)
        if self.server is not None:
            await self.server.stop(grace)
        if self.cfg.socket and self._socket_ino is not None:
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(self.cfg.socket).st_ino == self._socket_ino:  # still ours, not a successor's
                    os.unlink(self.cfg.socket)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the state directory's lock
            self._lock_fd = None
        log.info("stopped")


def _lock_state_dir(state: Path) -> int:
    """One daemon per state directory: an flock on ``fph.lock`` held for the daemon's life (the kernel
    drops it when the process dies, so a crash leaves nothing stale). The file holds the holder's pid."""
    path = state / "fph.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(f"another fph daemon (pid {holder}) uses the state directory {state}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _bind_unix(server: Any, path: str, mode: int) -> None:
    """Bind with a umask that leaves the socket no wider than ``mode`` from its creation on (no window)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(p)
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
        if _socket_is_live(path):
            raise ConfigError(f"{path}: another process serves this socket; refusing to replace it")
        os.unlink(p)  # a stale socket of an earlier run: nobody accepts on it
    old = os.umask(0o777 & ~mode)
    try:
        server.add_insecure_port(f"unix:{path}")
    finally:
        os.umask(old)


def _socket_is_live(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True  # e.g. EAGAIN (a full backlog) or a timeout: someone is there
        return True


async def serve(cfg: DaemonConfig, ready: asyncio.Event | None = None) -> None:
    srv = DaemonServer(cfg)
    await srv.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await srv.stop()
