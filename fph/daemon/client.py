"""The client side of the ``fph`` command: one gRPC channel per daemon socket for the whole command, answers
printed as JSON (protobuf field names, every field, zeros and false included), a gRPC error becomes
``fph: CODE: message`` on stderr and exit status 1 (2 for INVALID_ARGUMENT).

Imported only when a command talks to a daemon: ``fph --help`` and the parsers need none of it. The plot of
one migration (``fph migration report VM --plot PATH``) is ``fph.report_plot``, imported only then.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from fph.api.v1 import fph_pb2 as pb
from fph.api.v1 import fph_pb2_grpc as pbg
from fph.daemon.migration_mode import MigrationMode
from fph.migration.convergence import OutDirtyPolicy
from fph.migration.first_hint_run import FirstHintRun

MODE = {
    MigrationMode.FPH.value: pb.MODE_FPH,
    MigrationMode.NATIVE.value: pb.MODE_NATIVE,
    MigrationMode.NONE.value: pb.MODE_NONE,
}
OUT_DIRTY_POLICY = {
    OutDirtyPolicy.THROTTLE.value: pb.OUT_DIRTY_POLICY_THROTTLE,
    OutDirtyPolicy.ITERATE.value: pb.OUT_DIRTY_POLICY_ITERATE,
    OutDirtyPolicy.FAIL.value: pb.OUT_DIRTY_POLICY_FAIL,
}
FIRST_HINT_RUN = {
    FirstHintRun.AUTO.value: pb.FIRST_HINT_RUN_AUTO,
    FirstHintRun.WAIT.value: pb.FIRST_HINT_RUN_WAIT,
    FirstHintRun.OVERLAP.value: pb.FIRST_HINT_RUN_OVERLAP,
}
MiB = 1 << 20


class Client:
    """Stubs of the three services on one channel to a daemon's Unix socket."""

    def __init__(self, socket: str) -> None:
        self.channel = grpc.insecure_channel(f"unix:{socket}")
        self.vms = pbg.VmServiceStub(self.channel)
        self.hints = pbg.HintingServiceStub(self.channel)
        self.migrations = pbg.MigrationServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()


class Clients:
    """One :class:`Client` per daemon socket for the life of a command (source and destination may be the
    same daemon: then they share its channel)."""

    def __init__(self) -> None:
        self._by_socket: dict[str, Client] = {}

    def get(self, socket: str) -> Client:
        if socket not in self._by_socket:
            self._by_socket[socket] = Client(socket)
        return self._by_socket[socket]

    def close(self) -> None:
        for c in self._by_socket.values():
            c.close()
        self._by_socket.clear()


def as_dict(msg: Any) -> dict[str, Any]:
    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def show(msg: Any) -> None:
    print(json.dumps(as_dict(msg), indent=1))


Command = Callable[[Clients, argparse.Namespace], int]


def call(args: argparse.Namespace, fn: Command) -> int:
    clients = Clients()
    try:
        return fn(clients, args)
    except grpc.RpcError as e:
        print(f"fph: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2 if e.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
    except KeyboardInterrupt:
        return 130
    finally:
        clients.close()


def status(cs: Clients, a: argparse.Namespace) -> int:
    """Every VM of the daemon with its balloon and hinting state, one JSON document."""
    c = cs.get(a.socket)
    vms = c.vms.ListVms(pb.ListVmsRequest()).vms
    out = []
    for vm in vms:
        entry = as_dict(vm)
        if vm.spec.balloon_socket:
            try:
                entry["hinting"] = as_dict(
                    c.hints.GetHintingStatus(pb.GetHintingStatusRequest(vm=vm.spec.name))
                )
            except grpc.RpcError as e:
                entry["hinting"] = {"error": f"{e.code().name}: {e.details()}"}
        out.append(entry)
    print(json.dumps({"socket": a.socket, "vms": out}, indent=1))
    return 0


def vm(cs: Clients, a: argparse.Namespace) -> int:
    c = cs.get(a.socket)
    if a.vm_command == "list":
        show(c.vms.ListVms(pb.ListVmsRequest()))
    elif a.vm_command == "get":
        show(c.vms.GetVm(pb.GetVmRequest(name=a.name)))
    elif a.vm_command == "unregister":
        show(c.vms.UnregisterVm(pb.UnregisterVmRequest(name=a.name)))
    elif a.vm_command == "upgrade-worker":
        show(c.vms.UpgradeBalloonWorker(pb.UpgradeBalloonWorkerRequest(name=a.name)))
    else:
        spec = pb.VmSpec(
            name=a.name,
            qmp_socket=a.qmp_socket,
            ram_file=a.ram_file,
            balloon_socket=a.balloon_socket or "",
            memory_bytes=a.memory_mib * MiB,
            write_log=a.write_log or "",
            free_page_reporting=a.free_page_reporting,
        )
        show(c.vms.RegisterVm(pb.RegisterVmRequest(spec=spec)))
    return 0


def hint(cs: Clients, a: argparse.Namespace) -> int:
    h = cs.get(a.socket).hints
    if a.hint_command == "start":
        show(h.StartHinting(pb.StartHintingRequest(vm=a.vm, acknowledge_on_stop=a.acknowledge_on_stop)))
    elif a.hint_command == "stop":
        show(h.StopHinting(pb.StopHintingRequest(vm=a.vm)))
    elif a.hint_command == "status" and a.watch:
        for st in h.WatchHintingStatus(pb.WatchHintingStatusRequest(vm=a.vm, interval_ms=a.interval_ms)):
            print(
                f"{a.vm}: {st.state:9s} id {st.host_cmd_id} hinted {st.hinted_bytes / MiB:8.1f} MiB "
                f"held {st.guest_held_bytes / MiB:8.1f} MiB run {st.run_seconds:6.2f} s",
                flush=True,
            )
    elif a.hint_command == "status":
        show(h.GetHintingStatus(pb.GetHintingStatusRequest(vm=a.vm)))
    elif a.hint_command == "stats":
        show(h.GetGuestStats(pb.GetGuestStatsRequest(vm=a.vm, refresh=a.refresh)))
    else:
        show(h.SetBalloonTarget(pb.SetBalloonTargetRequest(vm=a.vm, target_bytes=a.target_mib * MiB)))
    return 0


def _target(cs: Clients, a: argparse.Namespace) -> Any:
    """The destination daemon prepares its VM and says where (and with which credential) to send."""
    dest = cs.get(a.dest_socket or a.socket)
    return dest.migrations.PrepareIncoming(pb.PrepareIncomingRequest(vm=a.dest_vm, mode=MODE[a.mode]))


def migration(cs: Clients, a: argparse.Namespace) -> int:
    c = cs.get(a.socket)
    m = c.migrations
    if a.migration_command == "prepare":
        resp = m.PrepareMigration(pb.PrepareMigrationRequest(vm=a.vm, mode=MODE[a.mode]))
        show(resp)
        return 0 if resp.ready else 1
    if a.migration_command == "incoming":
        show(c.migrations.PrepareIncoming(pb.PrepareIncomingRequest(vm=a.vm, mode=MODE[a.mode])))
    elif a.migration_command == "cancel":
        show(m.CancelMigration(pb.CancelMigrationRequest(vm=a.vm)))
    else:
        plot = getattr(a, "plot", None)
        from fph.report_plot import PlotError, plot_migration, report_plot, require_matplotlib

        try:
            if plot is not None:
                require_matplotlib()  # before the call: a missing extra is a usage error, not a late surprise
            rep = m.GetMigrationReport(pb.GetMigrationReportRequest(vm=a.vm, migration_id=a.id or ""))
            show(rep)
            if plot is not None:
                path = plot_migration(report_plot(as_dict(rep)), plot)
                print(f"fph: plot written to {path}", file=sys.stderr)  # stdout stays one JSON document
        except PlotError as e:
            print(f"fph: {e}", file=sys.stderr)
            return e.status
    return 0


def progress_line(p: Any) -> str:
    phase = pb.Phase.Name(p.phase).removeprefix("PHASE_").lower()
    total = p.memory_total or 1
    return (
        f"[{p.time_elapsed_ms / 1e3:7.1f} s] {phase:9s} {p.status:10s} {p.fph_phase or '-':12s} "
        f"iter {p.memory_iteration:3d}  sent {p.memory_processed / MiB:8.1f} MiB  "
        f"remaining {p.memory_remaining / MiB:8.1f} MiB ({100 * p.memory_remaining / total:5.1f}%)  "
        f"hinted {p.hinted_bytes / MiB:7.1f} MiB  dirty {p.memory_dirty_rate} p/s"
        + (f"  {p.message}" if p.message else "")
    )


def migrate(args: argparse.Namespace) -> int:
    def run(cs: Clients, a: argparse.Namespace) -> int:
        c = cs.get(a.socket)
        target = _target(cs, a)
        req = pb.MigrateRequest(
            vm=a.vm,
            mode=MODE[a.mode],
            destination=target,
            bandwidth_bytes_per_second=a.bandwidth or 0,
            downtime_limit_ms=a.downtime_ms or 0,
            max_rounds=a.max_rounds or 0,
            out_dirty_policy=OUT_DIRTY_POLICY[a.out_dirty_policy],
            time_budget_s=a.time_budget_s or 0,
            first_hint_run=FIRST_HINT_RUN[a.first_hint_run],
        )
        tty = sys.stdout.isatty()
        last = None
        for p in c.migrations.Migrate(req):
            last = p
            line = progress_line(p)
            print(("\r\x1b[K" + line) if tty else line, end="" if tty else "\n", flush=True)
        if tty:
            print()
        rep = c.migrations.GetMigrationReport(
            pb.GetMigrationReportRequest(vm=a.vm, migration_id=last.migration_id if last else "")
        )
        js = dict(rep.job_stats)
        print(
            f"{rep.migration_id}: {rep.status}; sent {js.get('memory_processed', 0) / MiB:.1f} MiB in "
            f"{js.get('time_elapsed', 0)} ms, downtime {js.get('downtime', 0)} ms, "
            f"{js.get('memory_iteration', 0)} iterations, "
            f"hinted {rep.fph.get('hinted_bytes', 0) / MiB:.1f} MiB"
        )
        if a.json:
            a.json.write_text(json.dumps(as_dict(rep), indent=1) + "\n")
        return 0

    return call(args, run)
