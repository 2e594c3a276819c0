"""Several write logs as one: each harvest is the OR of every provider's atomic harvest.

Why: no single source sees every write (the TCG plugin misses device DMA, fph's own ring writes are
only known to fph), and the bitmap merge wants one word array per round.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from fph.writelog.base import Words, WriteLog
from fph.writelog.errors import WriteLogStateError


class CombinedWriteLog(WriteLog):
    """``CombinedWriteLog([tcg_log, device_log])``: start/harvest/close all; harvest = OR of all.

    The combination is atomic per provider: a write is in some provider's current or next harvest. Pause
    time is the sum of the providers' pauses.
    """

    kind = "combined"

    def __init__(self, logs: Sequence[WriteLog]) -> None:
        if not logs:
            raise WriteLogStateError("CombinedWriteLog needs at least one write log")
        super().__init__(logs[0].layout)
        for lg in logs:
            if lg.nwords != self.nwords or lg.nbits != self.nbits:
                raise WriteLogStateError(
                    f"cannot combine write logs of different sizes: {lg.kind} has {lg.nbits} pages, "
                    f"{logs[0].kind} {self.nbits}; build them from the same RamLayout"
                )
        self.logs = tuple(logs)
        self.atomic = all(lg.atomic for lg in logs)
        self.arms_on_guest_code = any(lg.arms_on_guest_code for lg in logs)

    def _prepare(self) -> None:
        for lg in self.logs:
            lg.prepare()

    def _start(self) -> None:
        for lg in self.logs:
            if not lg.started:
                lg.start()

    def _pause_of_last(self) -> float:
        return sum(lg.stats.pause_last_s for lg in self.logs)

    def _harvest(self, vcpus_stopped: bool) -> tuple[Words, float]:
        out = self.logs[0].harvest(vcpus_stopped=vcpus_stopped).copy()
        for lg in self.logs[1:]:
            out |= lg.harvest(vcpus_stopped=vcpus_stopped)
        return out, self._pause_of_last()

    async def aharvest(self, *, vcpus_stopped: bool = False) -> Words:
        self._check_ready()
        t0 = time.perf_counter()
        out = (await self.logs[0].aharvest(vcpus_stopped=vcpus_stopped)).copy()
        for lg in self.logs[1:]:
            out |= await lg.aharvest(vcpus_stopped=vcpus_stopped)
        self._record(out, time.perf_counter() - t0, self._pause_of_last())
        return out

    def _close(self) -> None:
        errors = []
        for lg in self.logs:
            try:
                lg.close()
            except Exception as e:  # close every provider, report the first failure
                errors.append(e)
        if errors:
            raise errors[0]

    def _details(self) -> dict[str, Any]:
        return {"providers": [lg.describe() for lg in self.logs]}
