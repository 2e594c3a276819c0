"""An in-process fph daemon for tests: a DaemonServer on its own event-loop thread, sync stubs on a real
gRPC channel to its Unix socket."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import grpc

from fph.api.v1 import fph_pb2_grpc as pbg
from fph.daemon.server import DaemonConfig, DaemonServer


class RunningDaemon:
    """A DaemonServer on its own event-loop thread, and sync stubs on a real channel to its socket."""

    def __init__(self, cfg: DaemonConfig) -> None:
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.srv: DaemonServer = self.run(self._start())
        self.channel = grpc.insecure_channel(f"unix:{cfg.socket}")
        self.vms = pbg.VmServiceStub(self.channel)
        self.hints = pbg.HintingServiceStub(self.channel)
        self.migrations = pbg.MigrationServiceStub(self.channel)
        self.stopped = False

    async def _start(self) -> DaemonServer:
        srv = DaemonServer(self.cfg)
        await srv.start()
        return srv

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.channel.close()
        self.run(self.srv.stop(0.5, stop_workers=True), 40)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
