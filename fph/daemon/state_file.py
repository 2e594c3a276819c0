"""The daemon's persisted registry: which VMs it serves and which migrations are in flight.

Written atomically (a temporary file, fsync, rename, fsync of the directory) after every change, so a
daemon killed at any moment leaves either the old or the new file, never half of one. A restarted daemon
reads it to know its VMs again and to roll back what a crash interrupted (``fph.daemon.recovery``).
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fph.daemon.migration_mode import MigrationMode
from fph.daemon.vm_state import VmState

VERSION = 1


class StateFileError(ValueError):
    """The state file exists but cannot be used (not JSON, another version, missing fields, an unknown state
    or mode)."""


@dataclass(frozen=True)
class PersistedVm:
    name: str
    qmp_socket: str
    ram_file: str
    balloon_socket: str
    memory_bytes: int
    write_log: str
    state: VmState
    free_page_reporting: bool = False


@dataclass(frozen=True)
class PersistedMigration:
    """An outgoing migration that had started: what a restarted daemon must roll back."""

    id: str
    vm: str
    mode: MigrationMode
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
                vms=[PersistedVm(**{**v, "state": VmState(v.get("state"))}) for v in raw.get("vms", [])],
                migrations=[
                    PersistedMigration(**{**m, "mode": MigrationMode(m.get("mode"))})
                    for m in raw.get("migrations", [])
                ],
            )
        except (TypeError, ValueError) as exc:
            raise StateFileError(f"{self.path}: {exc}") from exc

    def save(self, state: PersistedState) -> None:
        body: dict[str, Any] = {"version": VERSION, **asdict(state)}
        write_atomically(self.path, json.dumps(body, indent=1, default=_enum_value).encode())


def _enum_value(obj: object) -> object:
    """States and modes go into the file by their names."""
    if isinstance(obj, enum.Enum):
        return obj.value
    raise TypeError(f"{type(obj).__name__} is not a state file value")


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
