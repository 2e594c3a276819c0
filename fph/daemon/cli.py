"""The daemon's side of the ``fph`` command line: ``fph serve`` and the commands that talk to a daemon
(``fph vm``, ``fph hint``, ``fph migration``, ``fph migrate --socket``). Answers are printed as JSON
(protobuf field names), so scripts and people read the same thing; a gRPC error becomes
``fph: CODE: message`` on stderr and exit status 1 (2 for INVALID_ARGUMENT)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from fph.api.v1 import fph_pb2 as pb
from fph.api.v1 import fph_pb2_grpc as pbg

MODE = {"fph": pb.MODE_FPH, "native": pb.MODE_NATIVE, "none": pb.MODE_NONE}
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


def show(msg: Any) -> None:
    print(json.dumps(MessageToDict(msg, preserving_proto_field_name=True), indent=1))


def _call(args: argparse.Namespace, fn: Callable[[Client, argparse.Namespace], int]) -> int:
    client = Client(args.socket)
    try:
        return fn(client, args)
    except grpc.RpcError as e:
        print(f"fph: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2 if e.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()


# -------------------------------------------------------------------------------------------------- serve


def serve_main(args: argparse.Namespace) -> int:
    from fph.daemon.server import ConfigError, DaemonConfig, serve, setup_logging

    overrides = {
        "socket": args.socket,
        "socket_mode": int(args.socket_mode, 8) if args.socket_mode else None,
        "state_dir": args.state_dir,
        "metrics_address": args.metrics_address,
        "log_format": args.log_format,
        "log_level": args.log_level,
        "tcp_address": args.tcp,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_client_ca": args.tls_client_ca,
    }
    try:
        cfg = DaemonConfig.load(args.config, overrides)
    except (ConfigError, ValueError) as e:
        print(f"fph serve: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg)
    sys.setswitchinterval(0.0005)  # the balloon thread waits for the GIL otherwise (hint_receiver)
    try:
        asyncio.run(serve(cfg))
    except ConfigError as e:
        print(f"fph serve: {e}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------------------------------- vms


def _vm(c: Client, a: argparse.Namespace) -> int:
    if a.vm_command == "list":
        show(c.vms.ListVms(pb.ListVmsRequest()))
    elif a.vm_command == "get":
        show(c.vms.GetVm(pb.GetVmRequest(name=a.name)))
    elif a.vm_command == "unregister":
        show(c.vms.UnregisterVm(pb.UnregisterVmRequest(name=a.name)))
    else:
        spec = pb.VmSpec(
            name=a.name,
            qmp_socket=a.qmp_socket,
            ram_file=a.ram_file,
            balloon_socket=a.balloon_socket or "",
            memory_bytes=a.memory_mib * MiB,
            write_log=a.write_log or "",
        )
        show(c.vms.RegisterVm(pb.RegisterVmRequest(spec=spec)))
    return 0


def _hint(c: Client, a: argparse.Namespace) -> int:
    h = c.hints
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


def _target(a: argparse.Namespace) -> Any:
    dest = Client(a.dest_socket or a.socket)
    try:
        return dest.migrations.AcceptIncoming(pb.AcceptIncomingRequest(vm=a.dest_vm))
    finally:
        dest.close()


def _migration(c: Client, a: argparse.Namespace) -> int:
    m = c.migrations
    if a.migration_command == "prepare":
        req = pb.PrepareMigrationRequest(vm=a.vm, mode=MODE[a.mode])
        if a.dest_vm:
            # readiness only: describe the target without reserving it
            vm = Client(a.dest_socket or a.socket)
            try:
                d = vm.vms.GetVm(pb.GetVmRequest(name=a.dest_vm)).spec
            finally:
                vm.close()
            req.destination.CopyFrom(
                pb.IncomingTarget(
                    vm=d.name,
                    qmp_socket=d.qmp_socket,
                    ram_file=d.ram_file,
                    balloon_socket=d.balloon_socket,
                    migration_uri=f"unix:{Path(d.qmp_socket).parent / 'mig.sock'}",
                )
            )
        resp = m.PrepareMigration(req)
        show(resp)
        return 0 if resp.ready else 1
    if a.migration_command == "accept":
        show(c.migrations.AcceptIncoming(pb.AcceptIncomingRequest(vm=a.vm)))
    elif a.migration_command == "cancel":
        show(m.CancelMigration(pb.CancelMigrationRequest(vm=a.vm)))
    else:
        show(m.GetMigrationReport(pb.GetMigrationReportRequest(vm=a.vm, migration_id=a.id or "")))
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


def migrate_via_daemon(args: argparse.Namespace) -> int:
    def run(c: Client, a: argparse.Namespace) -> int:
        if not a.vm or not a.dest_vm:
            print("fph migrate --socket: --vm and --dest-vm are required", file=sys.stderr)
            return 2
        target = _target(a)
        req = pb.MigrateRequest(
            vm=a.vm,
            mode=MODE[a.mode],
            destination=target,
            bandwidth_bytes_per_second=a.bandwidth or 0,
            downtime_limit_ms=a.downtime_ms or 0,
            max_rounds=a.max_rounds or 0,
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
            a.json.write_text(
                json.dumps(MessageToDict(rep, preserving_proto_field_name=True), indent=1) + "\n"
            )
        return 0

    return _call(args, run)


# ------------------------------------------------------------------------------------------------ parsers


def add_parsers(sub: Any) -> None:
    s = sub.add_parser("serve", help="run the fph daemon (gRPC API on a Unix socket)")
    s.add_argument("--config", type=Path, help="TOML config file (flags override it)")
    s.add_argument("--socket", help="Unix socket to serve on (default /run/fph/fph.sock)")
    s.add_argument("--socket-mode", help="octal mode of the socket (default 0600; 0660 for a group)")
    s.add_argument("--state-dir", help="every VM path must be inside it (default /run/fph)")
    s.add_argument("--metrics-address", help="HOST:PORT for Prometheus /metrics (off by default)")
    s.add_argument("--tcp", help="also serve TCP HOST:PORT, only with --tls-cert/--tls-key/--tls-client-ca")
    s.add_argument("--tls-cert")
    s.add_argument("--tls-key")
    s.add_argument("--tls-client-ca", help="CA that signs client certificates (mutual TLS)")
    s.add_argument("--log-format", choices=("json", "text"))
    s.add_argument("--log-level")
    s.set_defaults(func=serve_main)

    def with_socket(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--socket", default="/run/fph/fph.sock", help="the daemon's socket")
        return p

    vm = sub.add_parser("vm", help="VMs registered with a daemon").add_subparsers(
        dest="vm_command", required=True
    )
    r = with_socket(vm.add_parser("register", help="register a VM (before starting QEMU with its balloon)"))
    r.add_argument("name")
    r.add_argument("--qmp-socket", required=True)
    r.add_argument("--ram-file", required=True)
    r.add_argument("--balloon-socket")
    r.add_argument("--memory-mib", type=int, required=True)
    r.add_argument("--write-log")
    with_socket(vm.add_parser("list"))
    for name in ("get", "unregister"):
        with_socket(vm.add_parser(name)).add_argument("name")
    for p in (vm.choices[n] for n in ("register", "list", "get", "unregister")):
        p.set_defaults(func=lambda a: _call(a, _vm))

    hint = sub.add_parser("hint", help="free page hinting runs").add_subparsers(
        dest="hint_command", required=True
    )
    p = with_socket(hint.add_parser("start"))
    p.add_argument("vm")
    p.add_argument("--acknowledge-on-stop", action="store_true", help="stop also sends DONE")
    with_socket(hint.add_parser("stop")).add_argument("vm")
    p = with_socket(hint.add_parser("status"))
    p.add_argument("vm")
    p.add_argument("--watch", action="store_true")
    p.add_argument("--interval-ms", type=int, default=1000)
    p = with_socket(hint.add_parser("stats", help="guest memory statistics"))
    p.add_argument("vm")
    p.add_argument("--refresh", action="store_true")
    p = with_socket(hint.add_parser("target", help="balloon target"))
    p.add_argument("vm")
    p.add_argument("--target-mib", type=int, required=True)
    for p in hint.choices.values():
        p.set_defaults(func=lambda a: _call(a, _hint))

    mig = sub.add_parser("migration", help="prepare, accept, cancel, report").add_subparsers(
        dest="migration_command", required=True
    )
    p = with_socket(mig.add_parser("prepare", help="readiness checks and an estimate"))
    p.add_argument("vm")
    p.add_argument("--mode", choices=tuple(MODE), default="fph")
    p.add_argument("--dest-vm")
    p.add_argument("--dest-socket")
    with_socket(mig.add_parser("accept", help="reserve an incoming VM (destination daemon)")).add_argument(
        "vm"
    )
    with_socket(mig.add_parser("cancel")).add_argument("vm")
    p = with_socket(mig.add_parser("report"))
    p.add_argument("vm")
    p.add_argument("--id")
    for p in mig.choices.values():
        p.set_defaults(func=lambda a: _call(a, _migration))


def add_migrate_daemon_args(m: argparse.ArgumentParser) -> None:
    g = m.add_argument_group("through a daemon (with --socket; without it: a lab migration)")
    g.add_argument("--socket", help="the source daemon's socket")
    g.add_argument("--vm", help="source VM name")
    g.add_argument("--dest-vm", help="destination VM name (registered with the destination daemon)")
    g.add_argument("--dest-socket", help="the destination daemon's socket (default: --socket)")
    g.add_argument("--downtime-ms", type=int)
    g.add_argument("--max-rounds", type=int)
