"""The main job's demo: one guest workload migrated with fph and with QEMU's own free page hinting.

Provisions the lab (QEMU 11.1, a Debian guest kernel), then for each mode boots a 1 GiB source and its
destination, lets the guest write ~700 MiB and free it (free memory that still holds data), migrates,
checks the destination guest, and prints both reports side by side with the lower bound (pages the
guest had allocated when the migration started). Raw reports go to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fph.migration.tables import rounds_table, side_by_side
from fph_lab.migrate import LabMigration, lab_migration
from fph_lab.provision import provision

MiB = 1 << 20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="fph,native", help="comma-separated: fph, native, none")
    ap.add_argument("--workload", default="memhog-exit")
    ap.add_argument("--json", type=Path, default=Path("demo-report.json"))
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    lab = provision(log=lambda m: print(f"[lab] {m}", flush=True))
    results: dict[str, LabMigration] = {}
    for mode in args.modes.split(","):
        results[mode] = lab_migration(lab, mode, args.workload, progress=lambda line: print(line, flush=True))
    print()
    print(f"workload {args.workload}, 1 GiB guest, QEMU {lab.qemu.version}, TCG")
    extra = {
        "lower bound (MiB)": {m: f"{r.lower_bound_bytes / MiB:.1f}" for m, r in results.items()},
        "destination check": {m: "ok" if r.check.ok else "FAILED" for m, r in results.items()},
    }
    print(side_by_side({m: r.report for m, r in results.items()}, extra))
    fph = results.get("fph")
    if fph is not None:
        print("\nfph rounds:")
        print(rounds_table(getattr(fph.report, "rounds", [])))
    args.json.write_text(
        json.dumps({m: r.as_dict() for m, r in results.items()}, indent=1, default=str) + "\n"
    )
    print(f"\nfull reports: {args.json}; demo took {time.monotonic() - t0:.0f} s")
    return 0 if all(r.check.ok for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
