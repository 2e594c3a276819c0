"""``fph``: the daemon (``fph serve``) and the commands that talk to it (``fph status``, ``fph vm``,
``fph hint``, ``fph migration``, ``fph migrate``).

Parsing needs nothing but argparse; a command imports the gRPC client (fph.daemon.client) or the daemon
(fph.daemon.server) only when it runs, so ``fph --help`` is instant. Lab migrations (real guests booted for
you) are ``python -m fph_lab.migrate``, beside this package.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from fph.daemon.migration_mode import MigrationMode
from fph.migration.convergence import OutDirtyPolicy
from fph.migration.first_hint_run import FirstHintRun

MODES = tuple(m.value for m in MigrationMode)
DEFAULT_SOCKET = "/run/fph/fph.sock"


def _client(name: str) -> Any:
    """A command of fph.daemon.client, imported when it runs."""

    def run(args: argparse.Namespace) -> int:
        from fph.daemon import client

        return client.call(args, getattr(client, name))

    return run


def _migrate(args: argparse.Namespace) -> int:
    from fph.daemon import client

    return client.migrate(args)


def _serve(args: argparse.Namespace) -> int:
    from fph.daemon.server import ConfigError, DaemonConfig, serve, setup_logging

    overrides = {
        "socket": args.socket,
        "socket_mode": args.socket_mode,
        "socket_group": args.socket_group,
        "state_dir": args.state_dir,
        "metrics_address": args.metrics_address,
        "log_format": args.log_format,
        "log_level": args.log_level,
        "tcp_address": args.tcp,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_client_ca": args.tls_client_ca,
        "data_address": args.data_address,
        "data_tls": args.data_tls,
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


def _with_socket(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--socket", default=DEFAULT_SOCKET, help=f"the daemon's socket (default {DEFAULT_SOCKET})")
    return p


def _add_daemon_parsers(sub: Any) -> None:
    s = sub.add_parser("serve", help="run the fph daemon (gRPC API on a Unix socket)")
    s.add_argument("--config", type=Path, help="TOML config file (flags override it)")
    s.add_argument("--socket", help="Unix socket to serve on (default /run/fph/fph.sock)")
    s.add_argument("--socket-mode", help="octal mode of the socket (default 0600; 0660 for a group)")
    s.add_argument("--socket-group", help="group (name or gid) of the socket, for clients in that group")
    s.add_argument("--state-dir", help="every VM path must be inside it (default /run/fph)")
    s.add_argument("--metrics-address", help="HOST:PORT for Prometheus /metrics (off by default)")
    s.add_argument("--tcp", help="also serve TCP HOST:PORT, only with --tls-cert/--tls-key/--tls-client-ca")
    s.add_argument("--tls-cert")
    s.add_argument("--tls-key")
    s.add_argument("--tls-client-ca", help="CA that signs client certificates (mutual TLS)")
    s.add_argument(
        "--data-address", help="IP incoming migrations listen on (default 127.0.0.1; another host's: TLS)"
    )
    s.add_argument(
        "--data-tls",
        choices=("auto", "on", "off"),
        help="mutual TLS on the data plane (auto: with the TLS files)",
    )
    s.add_argument("--log-format", choices=("json", "text"))
    s.add_argument("--log-level")
    s.set_defaults(func=_serve)

    vm = sub.add_parser("vm", help="VMs registered with a daemon").add_subparsers(
        dest="vm_command", required=True
    )
    r = _with_socket(vm.add_parser("register", help="register a VM (before starting QEMU with its balloon)"))
    r.add_argument("name")
    r.add_argument("--qmp-socket", required=True)
    r.add_argument("--ram-file", required=True)
    r.add_argument("--balloon-socket")
    r.add_argument("--memory-mib", type=int, required=True)
    r.add_argument("--write-log")
    r.add_argument(
        "--free-page-reporting",
        action="store_true",
        help="the balloon offers free page reporting (give QEMU's device num_vqs=5)",
    )
    _with_socket(vm.add_parser("list"))
    for name in ("get", "unregister"):
        _with_socket(vm.add_parser(name)).add_argument("name")
    _with_socket(
        vm.add_parser(
            "upgrade-worker",
            help="replace the VM's balloon worker by one running this fph (QEMU stays connected)",
        )
    ).add_argument("name")
    for p in (vm.choices[n] for n in ("register", "list", "get", "unregister", "upgrade-worker")):
        p.set_defaults(func=_client("vm"))

    hint = sub.add_parser("hint", help="free page hinting runs").add_subparsers(
        dest="hint_command", required=True
    )
    p = _with_socket(hint.add_parser("start"))
    p.add_argument("vm")
    p.add_argument("--acknowledge-on-stop", action="store_true", help="stop also sends DONE")
    _with_socket(hint.add_parser("stop")).add_argument("vm")
    p = _with_socket(hint.add_parser("status"))
    p.add_argument("vm")
    p.add_argument("--watch", action="store_true")
    p.add_argument("--interval-ms", type=int, default=1000)
    p = _with_socket(hint.add_parser("stats", help="guest memory statistics"))
    p.add_argument("vm")
    p.add_argument("--refresh", action="store_true")
    p = _with_socket(hint.add_parser("target", help="balloon target"))
    p.add_argument("vm")
    p.add_argument("--target-mib", type=int, required=True)
    for p in hint.choices.values():
        p.set_defaults(func=_client("hint"))

    mig = sub.add_parser("migration", help="prepare, incoming, cancel, report").add_subparsers(
        dest="migration_command", required=True
    )
    p = _with_socket(mig.add_parser("prepare", help="readiness checks and an estimate"))
    p.add_argument("vm")
    p.add_argument("--mode", choices=MODES, default=MigrationMode.FPH.value)
    p = _with_socket(
        mig.add_parser("incoming", help="prepare an incoming VM as a target (destination daemon)")
    )
    p.add_argument("vm")
    p.add_argument(
        "--mode", choices=MODES, default=MigrationMode.FPH.value, help="the mode the source will migrate with"
    )
    _with_socket(mig.add_parser("cancel")).add_argument("vm")
    p = _with_socket(mig.add_parser("report"))
    p.add_argument("vm")
    p.add_argument("--id")
    p.add_argument(
        "--plot",
        type=Path,
        metavar="PATH",
        help="also draw its bytes per round and timeline to this PNG (needs matplotlib: fph[bench])",
    )
    for p in mig.choices.values():
        p.set_defaults(func=_client("migration"))


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line and exit status 2 (argparse's own also prints the whole usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="fph", description=__doc__.split("\n\n")[0])
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)
    _with_socket(
        sub.add_parser("status", help="every VM of a daemon: balloon, hinting, migration")
    ).set_defaults(func=_client("status"))
    _add_daemon_parsers(sub)
    m = _with_socket(sub.add_parser("migrate", help="migrate a registered VM, with live progress"))
    m.add_argument("--mode", choices=MODES, default=MigrationMode.FPH.value)
    m.add_argument("--vm", required=True, help="source VM name")
    m.add_argument(
        "--dest-vm", required=True, help="destination VM name (registered with the destination daemon)"
    )
    m.add_argument("--dest-socket", help="the destination daemon's socket (default: --socket)")
    m.add_argument("--bandwidth", type=int, default=None, help="bytes/s (default unlimited)")
    m.add_argument("--downtime-ms", type=int)
    m.add_argument("--max-rounds", type=int)
    m.add_argument(
        "--out-dirty-policy",
        choices=[p.value for p in OutDirtyPolicy],
        default=OutDirtyPolicy.THROTTLE.value,
        help="when the guest dirties memory faster than the link carries it: throttle its vCPUs "
        "(native/none: QEMU's auto-converge), iterate until the time budget, or fail at once (fph mode "
        "only); the source keeps running when a migration gives up",
    )
    m.add_argument(
        "--first-hint-run",
        choices=[r.value for r in FirstHintRun],
        default=FirstHintRun.AUTO.value,
        help="fph mode: round 0 waits for the guest's first hint run (wait: fewest bytes), sends while it "
        "hints (overlap: shortest time; pages hinted after they went are waste), or waits only while the "
        "run outpaces the bandwidth (auto)",
    )
    m.add_argument(
        "--time-budget-s",
        type=int,
        help="seconds before the migration gives up, source running (default: fph 300 s of rounds, "
        "native/none 600 s)",
    )
    m.add_argument("--json", type=Path, help="write the full report here")
    m.set_defaults(func=_migrate)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
