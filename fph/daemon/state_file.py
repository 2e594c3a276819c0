"""The daemon's persisted registry: which VMs it serves and which migrations are in flight.

Written atomically (a temporary file, fsync, rename, fsync of the directory) after every change, so a
daemon killed at any moment leaves either the old or the new file, never half of one. A restarted daemon
reads it to know its VMs again and to roll back what a crash interrupted (``fph.daemon.recovery``).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

VERSION = 1


class StateFileError(ValueError):
    """The state file exists but cannot be used (not JSON, another version, missing fields)."""


@dataclass(frozen=True)
class PersistedVm:
    name: str
    qmp_socket: str
    ram_file: str
    balloon_socket: str
    memory_bytes: int
    write_log: str
    state: str
    free_page_reporting: bool = False


@dataclass(frozen=True)
class PersistedMigration:
    """An outgoing migration that had started: what a restarted daemon must roll back."""

    id: str
    vm: str
    mode: str
    source_qmp: str
    destination_vm: str
    destination_qmp: str
    started: float


@dataclass
class PersistedState:
    vms: list[PersistedVm] = field(default_factory=list)
    migrations: list[PersistedMigration] = field(default_factory=list)


class StateFile:
    """``state.json`` in the daemon's state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "state.json"

    def load(self) -> PersistedState:
        """The last saved state; empty if there is none."""
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return PersistedState()
        except (OSError, ValueError) as exc:
            raise StateFileError(f"{self.path}: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("version") != VERSION:
            raise StateFileError(f"{self.path}: not an fph state file of version {VERSION}")
        try:
            return PersistedState(
                vms=[PersistedVm(**v) for v in raw.get("vms", [])],
                migrations=[PersistedMigration(**m) for m in raw.get("migrations", [])],
            )
        except TypeError as exc:
            raise StateFileError(f"{self.path}: {exc}") from exc

    def save(self, state: PersistedState) -> None:
        body: dict[str, Any] = {"version": VERSION, **asdict(state)}
        write_atomically(self.path, json.dumps(body, indent=1).encode())


def write_atomically(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` or what it held before, never half of it, also after a crash or power loss:
    a temporary file beside it, fsync, rename, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
