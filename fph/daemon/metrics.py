"""Prometheus metrics of one daemon, per VM, on an opt-in HTTP endpoint.

Hint figures are read from the devices at scrape time (a custom collector: no polling loop, never stale);
migration figures are set when a migration ends (and its live figures while it runs). Names follow
Prometheus conventions with units; the migration ones mirror KubeVirt's libvirt-derived gauges.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from fph.daemon.jobs import MigrationJob
    from fph.daemon.registry import Registry

log = logging.getLogger("fph.daemon")


class _HintCollector(Collector):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        hinted = GaugeMetricFamily(
            "fph_hint_run_hinted_bytes", "Bytes hinted free in the current or last hint run", labels=["vm"]
        )
        held = GaugeMetricFamily(
            "fph_guest_held_bytes",
            "Bytes hinted since the last DONE (held by the guest, upper bound)",
            labels=["vm"],
        )
        stale = GaugeMetricFamily(
            "fph_hint_dropped", "Hint buffers the device dropped (stale id or no run)", labels=["vm"]
        )
        for rec in list(self.registry.vms.values()):
            if rec.control is None:
                continue
            try:
                st = rec.control.status()
            except Exception as e:  # a scrape must not fail because one device is gone
                log.warning("metrics: no status for %s: %s", rec.name, e)
                continue
            hinted.add_metric([rec.name], st.hinted_bytes)
            held.add_metric([rec.name], st.held_bytes)
            stale.add_metric([rec.name], st.dropped)
        yield from (hinted, held, stale)


class Metrics:
    def __init__(self, registry: Registry) -> None:
        self.prom = CollectorRegistry()
        self.prom.register(_HintCollector(registry))
        r = self.prom
        self.migrations = Counter("fph_migrations", "Migrations ended", ["vm", "mode", "result"], registry=r)
        self.migration_bytes = Counter(
            "fph_migration_bytes",
            "Bytes sent by ended migrations (memory_processed)",
            ["vm", "mode"],
            registry=r,
        )
        self.hinted_bytes = Counter(
            "fph_migration_hinted_bytes",
            "Bytes skipped because the guest hinted them free",
            ["vm"],
            registry=r,
        )
        self.stale_hints = Counter(
            "fph_migration_stale_hints_dropped",
            "Hints dropped because their round had ended",
            ["vm"],
            registry=r,
        )
        self.rounds = Gauge(
            "fph_migration_rounds", "Rounds of the last migration (memory_iteration)", ["vm"], registry=r
        )
        self.downtime = Gauge(
            "fph_migration_downtime_seconds", "Downtime of the last migration", ["vm"], registry=r
        )
        self.dirty_rate = Gauge(
            "fph_migration_dirty_rate_pages",
            "Dirty rate (pages/s) of the last or running migration",
            ["vm"],
            registry=r,
        )
        self.processed = Gauge(
            "fph_migration_data_processed_bytes",
            "Bytes sent so far by the running or last migration",
            ["vm"],
            registry=r,
        )
        self.remaining = Gauge(
            "fph_migration_data_remaining_bytes",
            "Bytes still dirty in the running migration",
            ["vm"],
            registry=r,
        )
        self.start_time = Gauge(
            "fph_migration_start_time_seconds", "Start of the last migration", ["vm"], registry=r
        )
        self.end_time = Gauge(
            "fph_migration_end_time_seconds", "End of the last migration", ["vm"], registry=r
        )
        self.hint_runs = Counter(
            "fph_hint_runs_started", "Hint runs started through the API", ["vm"], registry=r
        )
        self._server: Any = None

    def live(self, job: MigrationJob, stats: dict[str, int]) -> None:
        self.processed.labels(job.vm).set(stats.get("memory_processed", 0))
        self.remaining.labels(job.vm).set(stats.get("memory_remaining", 0))
        self.dirty_rate.labels(job.vm).set(stats.get("memory_dirty_rate", 0))
        self.start_time.labels(job.vm).set(job.start_time)

    def ended(self, job: MigrationJob) -> None:
        vm, mode = job.vm, job.params.mode.value
        self.migrations.labels(vm, mode, "succeeded" if job.report is not None else job.status).inc()
        self.end_time.labels(vm).set(job.end_time or time.time())
        if job.report is None:
            return
        s = job.report.job_stats
        self.migration_bytes.labels(vm, mode).inc(s.get("memory_processed", 0))
        self.rounds.labels(vm).set(s.get("memory_iteration", 0))
        self.downtime.labels(vm).set(s.get("downtime", 0) / 1e3)
        self.dirty_rate.labels(vm).set(s.get("memory_dirty_rate", 0))
        self.processed.labels(vm).set(s.get("memory_processed", 0))
        self.remaining.labels(vm).set(0)
        fph = getattr(job.report, "fph", None)
        if fph:
            self.hinted_bytes.labels(vm).inc(int(fph.get("hinted_bytes", 0)))
            self.stale_hints.labels(vm).inc(int(fph.get("stale_hints_dropped", 0)))

    def serve(self, address: str) -> tuple[str, int]:
        """Start the HTTP endpoint (``host:port``; port 0 = any); returns the bound address."""
        host, _, port = address.rpartition(":")
        server, _thread = start_http_server(
            int(port), addr=host.strip("[]") or "127.0.0.1", registry=self.prom
        )
        self._server = server
        bound = server.server_address
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
