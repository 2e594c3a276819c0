"""Lab VMs for fph-mode migrations: a source with fph's balloon and the TCG write log, and its destination.

The source's RAM is a file both QEMU and fph map; the TCG plugin logs every guest store; fph's balloon
device is served in-process (``ThreadedHintReceiver``). The destination starts with ``-incoming defer``,
its own RAM file and no balloon (the balloon is unplugged before switchover), and a second balloon
back-end already listening for the re-plug. RAM files and sockets live under /dev/shm when it exists:
a disk-backed RAM file would make the host write guest RAM back to disk.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fph.hint_receiver import BalloonControl, ThreadedHintReceiver
from fph.migration.fph_mode import Balloon, FphConfig, FphMigration, FphReport
from fph.ram_layout import RamLayout
from fph.writelog.base import WriteLog
from fph.writelog.tcg import TcgWriteLog
from fph_lab.pair import PairBase
from fph_lab.provision import Lab
from fph_lab.vm import VM, VMConfig, run_base

MiB = 1 << 20


@dataclass
class FphPair(PairBase):
    """``with FphPair(lab) as p: p.src.guest.fill(700); p.migrate(); p.check().raise_for_problems()``."""

    lab: Lab
    mem_mib: int = 1024
    init_on_alloc: int | None = None
    balloon: bool = True
    reporting: bool = False
    """fph's source balloon offers free page reporting (the device gets its 5th queue)."""
    append: str = ""
    extra_args: tuple[str, ...] = ()
    """More QEMU arguments for both VMs (a shared read-only disk, say)."""
    dst_extra_args: tuple[str, ...] | None = None
    """The destination's instead (None: ``extra_args``), e.g. a NIC whose backend forwards no host port."""
    src: VM = field(init=False)
    dst: VM = field(init=False)
    hints: ThreadedHintReceiver = field(init=False)
    control: BalloonControl | None = field(init=False, default=None)
    dst_control: BalloonControl | None = field(init=False, default=None)
    writelog: TcgWriteLog = field(init=False)
    keep_logs: Path | None = None
    receiver_procs: list[subprocess.Popen[str]] = field(init=False, default_factory=list)
    prepared_receiver: tuple[str, int] | None = field(init=False, default=None)
    """A receiver process started by ``prepare_incoming`` and not yet used by a migration."""

    def __post_init__(self) -> None:
        os.environ["FPH_RUN_DIR"] = run_base()
        self.layout = RamLayout.pc(self.mem_mib * MiB)
        self.hints = ThreadedHintReceiver()
        # Two throwaway VMs only to get run directories first: the sockets and log live in src's.
        src_cfg = VMConfig(
            mem_mib=self.mem_mib,
            balloon="none",
            ram_backend="file",
            init_on_alloc=self.init_on_alloc,
            append=self.append,
            extra_args=self.extra_args,
        )
        self.dst_config = src_cfg.destination(
            extra_args=self.extra_args if self.dst_extra_args is None else self.dst_extra_args
        )
        self.src = VM(self.lab, src_cfg, name="src")
        self.dst = VM(self.lab, self.dst_config, name="dst")
        self.src_socket = str(self.src.run_dir / "balloon.sock")
        self.dst_socket = str(self.src.run_dir / "balloon-dst.sock")  # the destination host's fph
        self.writelog = TcgWriteLog(self.src.run_dir / "wlog.bin", self.layout)
        self.src.config = VMConfig(
            mem_mib=self.mem_mib,
            balloon="fph" if self.balloon else "none",
            vhost_user_socket=self.src_socket if self.balloon else None,
            balloon_queues=5 if self.reporting else 4,
            ram_backend="file",
            init_on_alloc=self.init_on_alloc,
            append=self.append,
            plugins=(self.writelog.plugin_arg,),
            extra_args=self.extra_args,
        )

    def start(self, ready_timeout: float = 180.0) -> float:
        if self.balloon:
            self.control = self.hints.add_vm(self.src_socket, reporting=self.reporting)
            self.dst_control = self.hints.add_vm(self.dst_socket)
        self.src.start()
        self.dst.start()
        return self.src.wait_ready(ready_timeout)

    def new_destination(self) -> VM:
        """A fresh destination QEMU, after an aborted migration tore the last one down."""
        self.dst.stop()
        self.dst = VM(self.lab, self.dst_config, name="dst")
        self.dst.start()
        return self.dst

    def fresh_writelog(self) -> TcgWriteLog:
        """A new consumer of the source's plugin log (a write log is started once per migration)."""
        old = self.writelog
        old.close()
        self.writelog = TcgWriteLog(old.path, self.layout, plugin=old.plugin, create=False)
        return self.writelog

    def ring_ranges(self) -> list[tuple[int, int]]:
        """GPA ranges of the source balloon's used rings (fph writes them; the plugin cannot see it)."""
        return self.control.used_ring_ranges() if self.control is not None else []

    def start_receiver_process(self, timeout: float = 600.0) -> tuple[str, int]:
        """The destination's receiver as its own process (as on a destination host); ended at stop()."""
        assert self.dst.ram_path is not None
        cmd = [sys.executable, "-m", "fph.transfer.receiver", "--ram", str(self.dst.ram_path),
               "--mem-mib", str(self.mem_mib), "--timeout", str(timeout)]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.receiver_procs.append(proc)
        assert proc.stdout is not None
        words = proc.stdout.readline().split()
        if words[:1] != ["FPH-RECEIVER"]:
            proc.kill()
            raise RuntimeError(f"receiver process did not start: {proc.communicate()[1].strip()}")
        return words[1], int(words[2])

    def prepare_incoming(self) -> tuple[str, int]:
        """Start the destination's receiver now, as the daemon does at AcceptIncoming: it allocates the
        destination RAM file before the migration is asked for, off the migration's clock. The next
        ``migration(receiver_process=True)`` uses it."""
        self.prepared_receiver = self.start_receiver_process()
        return self.prepared_receiver

    def migration(
        self,
        config: FphConfig | None = None,
        *,
        writelog: WriteLog | None = None,
        receiver_process: bool = False,
        **kwargs: Any,
    ) -> FphMigration:
        assert self.src.ram_path is not None and self.dst.ram_path is not None
        address = None
        if receiver_process:
            address, self.prepared_receiver = self.prepared_receiver, None
            address = address or self.start_receiver_process()
        balloon = None
        if self.balloon and self.control is not None:
            balloon = Balloon(self.control, ring_ranges=self.ring_ranges, destination_socket=self.dst_socket)
        return FphMigration(
            src_qmp=str(self.src.qmp_socket),
            dst_qmp=str(self.dst.qmp_socket),
            uri=f"unix:{self.dst.migration_socket}",
            layout=self.layout,
            src_ram=self.src.ram_path,
            dst_ram=None if receiver_process else self.dst.ram_path,
            receiver_address=address,
            writelog=writelog or self.writelog,
            balloon=balloon,
            config=config,
            **kwargs,
        )

    def migrate(self, config: FphConfig | None = None, **kwargs: Any) -> FphReport:
        return asyncio.run(self.migration(config, **kwargs).run())

    def stop(self) -> None:
        for proc in self.receiver_procs:  # only the processes this pair started, by their Popen
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        super().stop()
        self.hints.close()
        self.writelog.close()
