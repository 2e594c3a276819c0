"""The gRPC calls an orchestrator makes to move one VM between two hosts, each running ``fph serve``.

    python examples/orchestrator.py --src unix:/run/fph/fph.sock --dst unix:/run/fph-dst/fph.sock \\
        --vm src --dest-vm dst [--mode fph] [--bandwidth BYTES_PER_S]

Both VMs are registered with their host's daemon and their QEMUs started by the orchestrator (the
destination with ``-incoming defer``; in fph mode without the balloon device). In order:

1. source daemon ``PrepareMigration``: readiness checks of the source and an estimate of the bytes;
2. destination daemon ``PrepareIncoming``: its QEMU listens, its RAM receiver waits for the holder of the
   returned one-time credential; the answer is the ``IncomingTarget``;
3. source daemon ``Migrate`` with that target: a stream of progress until SUCCEEDED (or ABORTED, rolled
   back: the source keeps running);
4. source daemon ``GetMigrationReport``: figures, per-round table, what the destination daemon said;
5. destination daemon ``GetVm``: the incoming outcome (resumed, or failed with the reason) and its balloon.

Each call and its answer are printed (the credential elided). Only the generated stubs and grpc are used:
this is what any client of the API does. Exit status 0 when the migration succeeded.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import grpc
from google.protobuf import json_format

from fph.api.v1 import fph_pb2 as pb
from fph.api.v1 import fph_pb2_grpc as pbg

MODES = {"fph": pb.MODE_FPH, "native": pb.MODE_NATIVE, "none": pb.MODE_NONE}


def show(call: str, answer: Any) -> None:
    body = json_format.MessageToDict(answer, preserving_proto_field_name=True)
    if "credential" in body:
        body["credential"] = "<one-time secret>"
    if "json" in body:
        body["json"] = "<the engine's full report, JSON>"
    print(f"> {call}\n{json.dumps(body, indent=1)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="the source daemon: unix:PATH (or HOST:PORT with TLS)")
    ap.add_argument("--dst", required=True, help="the destination daemon")
    ap.add_argument("--vm", required=True)
    ap.add_argument("--dest-vm", required=True)
    ap.add_argument("--mode", choices=MODES, default="fph")
    ap.add_argument("--bandwidth", type=int, default=0, help="bytes/s on the wire (0: unlimited)")
    args = ap.parse_args(argv)
    mode = MODES[args.mode]
    src_ch, dst_ch = grpc.insecure_channel(args.src), grpc.insecure_channel(args.dst)
    src = pbg.MigrationServiceStub(src_ch)
    dst = pbg.MigrationServiceStub(dst_ch)
    dst_vms = pbg.VmServiceStub(dst_ch)
    try:
        prep = src.PrepareMigration(pb.PrepareMigrationRequest(vm=args.vm, mode=mode))
        show(f"source PrepareMigration(vm={args.vm}, mode={args.mode})", prep)
        if not prep.ready:
            print("not ready: see the failed checks", file=sys.stderr)
            return 1
        target = dst.PrepareIncoming(pb.PrepareIncomingRequest(vm=args.dest_vm, mode=mode))
        show(f"destination PrepareIncoming(vm={args.dest_vm}, mode={args.mode})", target)
        request = pb.MigrateRequest(
            vm=args.vm, mode=mode, destination=target, bandwidth_bytes_per_second=args.bandwidth
        )
        print("> source Migrate(destination=<the IncomingTarget above>) -> stream", flush=True)
        last = None
        for p in src.Migrate(request):
            last = p
            print(f"  {pb.Phase.Name(p.phase):16} {p.status:10} {p.fph_phase:12} {p.message}", flush=True)
        show(
            f"source GetMigrationReport(vm={args.vm})",
            src.GetMigrationReport(pb.GetMigrationReportRequest(vm=args.vm)),
        )
        show(f"destination GetVm({args.dest_vm})", dst_vms.GetVm(pb.GetVmRequest(name=args.dest_vm)))
        return 0 if last is not None and last.phase == pb.PHASE_SUCCEEDED else 1
    except grpc.RpcError as e:
        print(f"{e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    finally:
        src_ch.close()
        dst_ch.close()


if __name__ == "__main__":
    sys.exit(main())
