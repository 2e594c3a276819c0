"""The destination end as its own process: ``python -m fph.sender.receive --ram PATH --mem-mib N``.

On the destination host, next to the destination QEMU (``-incoming defer``, RAM in ``PATH``): maps and
pre-faults the RAM file, listens, prints ``FPH-RECEIVER <host> <port>`` once it is ready for a source, takes
one migration stream, prints the result as JSON and exits 0 only if every page arrived and verified.
The source's engine is given that address (``FphMigration(receiver_address=...)``).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict
from types import FrameType

from fph.ram_layout import RamLayout
from fph.sender.channel import Receiver
from fph.sender.ram import RamFile, RamFileError

MiB = 1 << 20


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ram", required=True, help="the destination guest's RAM file")
    ap.add_argument("--mem-mib", type=int, required=True, help="guest RAM size (QEMU -m)")
    ap.add_argument("--machine", choices=("pc", "q35"), default="pc")
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the whole stream")
    args = ap.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    layout = (RamLayout.pc if args.machine == "pc" else RamLayout.q35)(args.mem_mib * MiB)
    try:
        ram = RamFile(args.ram, layout, writable=True)
    except RamFileError as exc:
        print(f"fph receive: {exc}", file=sys.stderr)
        return 2
    receiver = Receiver(ram, host or "127.0.0.1", int(port or 0), timeout=args.timeout)

    def stop(signum: int, _frame: FrameType | None) -> None:
        receiver.stop()

    signal.signal(signal.SIGTERM, stop)
    addr = receiver.start()
    receiver.wait_prepared()  # "ready" means the RAM file is allocated and mapped, not just listening
    print(f"FPH-RECEIVER {addr[0]} {addr[1]}", flush=True)
    result = receiver.wait(args.timeout + 60)
    print(json.dumps(asdict(result)), flush=True)
    ram.close()
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
