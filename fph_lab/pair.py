"""A source VM and its migration destination, started together, torn down together.

Tests and benchmarks all need the same sequence: boot the source, start an identical destination with
``-incoming defer`` (in parallel: it has nothing to boot), run a workload, migrate, check the destination.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from fph.migration_hook import HookListener, MigrationReport, NativeMigration
from fph_lab.check import DestinationCheck, check_destination
from fph_lab.guest import Heartbeat
from fph_lab.provision import Lab
from fph_lab.vm import VM, VMConfig


class PairBase:
    """What every source/destination pair does the same way: heartbeat, destination check, teardown."""

    src: VM
    dst: VM
    keep_logs: Path | None

    def start(self, ready_timeout: float = 120.0) -> float:
        raise NotImplementedError

    def last_source_heartbeat(self) -> Heartbeat:
        hb = self.src.guest.last_heartbeat()
        if hb is None:
            raise AssertionError("no heartbeat on the source: start the hold program first")
        return hb

    def check(self, source_heartbeat: Heartbeat | None = None, timeout: float = 30.0) -> DestinationCheck:
        """The destination check against the source's last heartbeat."""
        hb = source_heartbeat or self.last_source_heartbeat()
        return check_destination(self.dst, hb, src=self.src, timeout=timeout)

    def stop(self) -> None:
        if self.keep_logs is not None:
            self.src.save_logs(self.keep_logs)
            self.dst.save_logs(self.keep_logs)
        self.src.stop()
        self.dst.stop()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class VMPair(PairBase):
    """``with VMPair(lab, cfg) as p: p.src.guest.fill(100); hb = ...; report = p.migrate_native()``."""

    lab: Lab
    config: VMConfig
    src: VM = field(init=False)
    dst: VM = field(init=False)
    keep_logs: Path | None = None

    def __post_init__(self) -> None:
        self.src = VM(self.lab, self.config, name="src")
        self.dst = VM(self.lab, self.config.destination(), name="dst")

    def start(self, ready_timeout: float = 120.0) -> float:
        """Start both QEMUs; return the source guest's uptime at its ready line."""
        self.src.start()
        self.dst.start()
        return self.src.wait_ready(ready_timeout)

    @property
    def uri(self) -> str:
        return f"unix:{self.dst.migration_socket}"

    def migrate_native(
        self,
        *,
        max_bandwidth: int | None = None,
        downtime_limit_ms: int = 300,
        timeout: float = 600.0,
        hooks: tuple[HookListener, ...] = (),
    ) -> MigrationReport:
        """QEMU-native migration src → dst (synchronous wrapper around :class:`NativeMigration`)."""
        mig = NativeMigration(
            str(self.src.qmp_socket),
            str(self.dst.qmp_socket),
            self.uri,
            max_bandwidth=max_bandwidth,
            downtime_limit_ms=downtime_limit_ms,
            hooks=hooks,
        )
        return asyncio.run(mig.run(timeout))
