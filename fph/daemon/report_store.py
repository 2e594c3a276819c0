"""Finished migrations' reports on disk: what an orchestrator reads after the daemon restarted.

The orchestrator acts on a report (a failed migration is retried on the source, a completed one's source is
torn down), so a restart of fph must not turn a report into NOT_FOUND, nor "aborted: back-end restarted"
into nothing after a second restart. Each finished report is written once, atomically, to
``<state dir>/reports/<migration id>.json`` (the API's MigrationReport in protobuf's JSON form); the newest
``KEEP_PER_VM`` of each VM are kept, and a VM's reports go with it at UnregisterVm.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from fph.api.v1 import fph_pb2 as pb
from fph.daemon.state_file import write_atomically

log = logging.getLogger("fph.daemon")

KEEP_PER_VM = 16
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")
"""A migration id that is safe as a file name (the daemon makes ``mig-<12 hex>``)."""


class ReportStore:
    """The finished reports of this daemon's VMs, in memory and under ``<state dir>/reports``. Used from
    the daemon's event loop only."""

    def __init__(self, state_dir: Path, keep_per_vm: int = KEEP_PER_VM) -> None:
        self.dir = Path(state_dir) / "reports"
        self.keep_per_vm = keep_per_vm
        self._reports: dict[str, Any] = {}

    def load(self) -> None:
        """Every report a previous daemon left. One that cannot be read is logged and left where it is."""
        if not self.dir.is_dir():
            return
        for path in sorted(self.dir.glob("*.json")):
            try:
                report = json_format.Parse(path.read_bytes(), pb.MigrationReport())
            except (OSError, json_format.ParseError) as exc:
                log.warning("migration report not loaded", extra={"path": str(path), "error": str(exc)})
                continue
            if report.migration_id != path.stem:
                log.warning("migration report not loaded", extra={"path": str(path), "error": "id mismatch"})
                continue
            self._reports[report.migration_id] = report

    def save(self, report: Any) -> None:
        """Keep a finished migration's report, on disk first; then drop the VM's oldest over the limit."""
        mid = report.migration_id
        if not ID_RE.fullmatch(mid):
            log.error("migration report not saved", extra={"migration": mid, "error": "not a file name"})
            return
        try:
            self.dir.mkdir(mode=0o700, exist_ok=True)
            write_atomically(self._path(mid), json_format.MessageToJson(report).encode())
        except OSError as exc:  # the report stays in memory: only a restart would lose it
            log.error("migration report not saved", extra={"migration": mid, "error": str(exc)})
        self._reports[mid] = report
        for old in self._of(report.vm)[self.keep_per_vm :]:
            self._drop(old.migration_id)

    def get(self, migration_id: str) -> Any | None:
        return self._reports.get(migration_id)

    def latest(self, vm: str) -> Any | None:
        """The VM's newest finished report (by end time), if any."""
        reports = self._of(vm)
        return reports[0] if reports else None

    def forget_vm(self, vm: str) -> None:
        """The VM was unregistered: its reports go with it (a VM registered later under its name starts
        with none)."""
        for r in self._of(vm):
            self._drop(r.migration_id)

    def _of(self, vm: str) -> list[Any]:
        return sorted(
            (r for r in self._reports.values() if r.vm == vm),
            key=lambda r: (r.end_time, r.migration_id),
            reverse=True,
        )

    def _drop(self, migration_id: str) -> None:
        self._reports.pop(migration_id, None)
        with contextlib.suppress(OSError):
            self._path(migration_id).unlink()

    def _path(self, migration_id: str) -> Path:
        return self.dir / f"{migration_id}.json"
