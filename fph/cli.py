"""``fph`` command line. ``fph migrate --mode fph|native|none`` runs one lab migration with progress, or with
``--socket`` asks a daemon to migrate a registered VM; ``fph serve`` runs the daemon; ``fph vm``, ``fph hint``
and ``fph migration`` talk to it."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fph.daemon.cli import add_migrate_daemon_args, add_parsers
from fph.lab.migrate import MODES, lab_migration
from fph.lab.provision import provision
from fph.lab.workload import WORKLOADS
from fph.report import rounds_table, side_by_side


def _migrate(args: argparse.Namespace) -> int:
    if args.socket:
        from fph.daemon.cli import migrate_via_daemon

        return migrate_via_daemon(args)
    lab = provision(log=lambda m: print(f"[lab] {m}", file=sys.stderr))
    result = lab_migration(
        lab,
        args.mode,
        args.workload,
        mem_mib=args.mem_mib,
        init_on_alloc=args.init_on_alloc,
        bandwidth=args.bandwidth,
        progress=lambda line: print(line, flush=True),
    )
    print()
    print(
        side_by_side(
            {args.mode: result.report},
            {"lower bound (MiB)": {args.mode: f"{result.lower_bound_bytes / (1 << 20):.1f}"}},
        )
    )
    rounds = getattr(result.report, "rounds", None)
    if rounds:
        print()
        print(rounds_table(rounds))
    if args.json:
        args.json.write_text(json.dumps(result.as_dict(), indent=1, default=str) + "\n")
    return 0 if result.check.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fph", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("migrate", help="boot a lab source and destination, run a workload, migrate, check")
    m.add_argument("--mode", choices=MODES, default="fph")
    m.add_argument("--workload", choices=WORKLOADS, default="memhog-exit")
    m.add_argument("--mem-mib", type=int, default=1024)
    m.add_argument("--init-on-alloc", type=int, choices=(0, 1), default=None, help="default: the kernel's")
    m.add_argument("--bandwidth", type=int, default=None, help="bytes/s (default unlimited)")
    m.add_argument("--json", type=Path, help="write the full report here")
    add_migrate_daemon_args(m)
    m.set_defaults(func=_migrate)
    add_parsers(sub)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
