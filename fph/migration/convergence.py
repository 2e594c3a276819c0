"""When to switch over: the precopy convergence policy, sans-IO (measurements in, a verdict out).

After every round the migration hands in what it measured: the pages the write log says the guest dirtied
since the previous harvest and over how long (the dirty rate), and the bytes the round put on the wire and
how long that took (the wire rate, never above the cap), and how many pages it handled in that time (the
page rate). Rates are counted in pages, not bytes: a zero or fill page costs a marker, not 4 KiB, so a
round of poisoned or zeroed pages goes much faster than its page count times 4 KiB at the wire rate would
say. The policy predicts the downtime of a switchover now: the pages still dirty plus those the guest
dirties until the vCPUs stop (the unplug runs first), at the page rate, plus the measured fixed costs
(final harvest, switchover re-check, QEMU's device state, unplug and resume). It switches over only when
that prediction fits the downtime limit; otherwise it iterates. When the guest dirties memory faster than
the link can carry it, the user's :class:`OutDirtyPolicy` decides: iterate up to a time budget, throttle
the vCPUs step by step (as QEMU's auto-converge and libvirt do), or fail at once with the source running.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from fph.ram_layout import PAGE_SIZE

DEFAULT_TIME_BUDGET_S = 300.0


class OutDirtyPolicy(enum.Enum):
    """What to do when the guest out-dirties the link."""

    ITERATE = "iterate"
    """Keep iterating until the prediction fits or ``time_budget_s`` runs out (then fail, source running)."""
    THROTTLE = "throttle"
    """Cap the vCPUs' CPU time, harder each round that still does not converge (within the time budget)."""
    FAIL = "fail"
    """Fail as soon as the guest is seen to out-dirty the link; the source keeps running."""


class ConvergenceError(RuntimeError):
    """The policy gave up (the guest out-dirtied the link, or the time budget ran out); the source keeps
    running with its memory."""


class Verdict(enum.Enum):
    ITERATE = "iterate"
    SWITCH_OVER = "switch-over"
    FAIL = "fail"


@dataclass
class ConvergenceConfig:
    downtime_limit_ms: float = 300.0
    """Switch over only when the predicted downtime is at most this."""
    out_dirty_policy: OutDirtyPolicy = OutDirtyPolicy.THROTTLE
    time_budget_s: float = DEFAULT_TIME_BUDGET_S
    """Longest precopy (all rounds) before the migration gives up with the source running."""
    min_rounds: int = 1
    max_rounds: int = 1000
    """A guard, not a policy: reaching it without convergence fails like an exhausted budget."""
    throttle_initial_pct: int = 20
    throttle_step_pct: int = 10
    throttle_max_pct: int = 99
    """Percent of CPU time taken from the vCPUs (QEMU's cpu-throttle-initial/increment/max defaults)."""
    out_dirty_ratio: float = 0.9
    """The guest out-dirties the link when its dirty rate reaches this share of the wire rate..."""
    stalled_rounds: int = 3
    """... or when the pages left have not shrunk for this many rounds."""
    settled_margin_ms: float = 2.0
    """A prediction within this of the fixed costs alone is as low as it gets: switch over. Above it, while
    the pages left still shrink, one more round runs with the guest running: a round of a few hundred pages
    takes milliseconds while the guest runs, and its pages then stay out of the stop window (measured on
    the 1 Gbit/s link with a 10 ms margin: the ~220 pages the balloon's unplug dirtied went into the final
    round, 18-32 ms of a 35-47 ms downtime)."""
    shrink_factor: float = 0.5
    """Otherwise, while a round still shrinks the pages left to at most this share of the previous
    round's, one more round (the guest running) beats a longer stop, even when the prediction fits."""

    def __post_init__(self) -> None:
        self.out_dirty_policy = OutDirtyPolicy(self.out_dirty_policy)
        if self.downtime_limit_ms <= 0:
            raise ValueError(f"downtime limit must be positive, got {self.downtime_limit_ms} ms")
        if not 0 < self.throttle_initial_pct <= self.throttle_max_pct <= 99:
            raise ValueError("throttle percentages: 0 < initial <= max <= 99")


@dataclass(frozen=True)
class RoundMeasure:
    """What one round measured (all from the write log and the sender's socket)."""

    dirtied_pages: int
    """Pages the harvest that ended this round found newly dirty: what the guest wrote while it ran."""
    dirty_interval_s: float
    """Time between that harvest and the one before it."""
    bytes_sent: int
    send_s: float
    pending_pages: int
    """Pages dirty in the bitmap now (after that harvest): what the next round must send."""
    since_harvest_s: float
    """Time since that harvest: pages dirtied meanwhile are not yet in the bitmap."""
    pages_sent: int | None = None
    """Pages the round handled in ``send_s``: data, zero and fill markers, zero pages skipped (None: all
    of them were data, ``bytes_sent / PAGE_SIZE``)."""
    pending_data_fraction: float | None = None
    """Of the pages left, the share that holds data (not zero, not one repeated word), from a sample: they
    cost wire bytes, the rest only markers. None: unknown, the last round's page rate is used."""


@dataclass
class FixedCosts:
    """Switchover costs that do not scale with the pages left, as measured (estimates until then)."""

    unplug_ms: float = 40.0
    """device_del of the balloon until DEVICE_DELETED; the guest still runs (it dirties, it is not down)."""
    final_harvest_ms: float = 2.0
    recheck_ms: float = 10.0
    """Re-reading sent pages the write log cannot vouch for (TCG's page walker)."""
    device_state_ms: float = 15.0
    """QEMU's device-state migration (x-ignore-shared) and the destination's cont."""

    def downtime_ms(self) -> float:
        return self.final_harvest_ms + self.recheck_ms + self.device_state_ms


@dataclass
class Decision:
    verdict: Verdict
    predicted_downtime_ms: float
    dirty_rate_bps: float
    wire_rate_bps: float
    throttle_pct: int
    reason: str
    page_rate_pps: float = 0.0
    """Pages per second the last rounds handled, whatever their content: what the prediction uses."""


@dataclass
class Convergence:
    """The policy's state across rounds. ``after_round`` once per round; the caller applies the throttle
    it asks for (``decision.throttle_pct``) before the next round."""

    config: ConvergenceConfig = field(default_factory=ConvergenceConfig)
    costs: FixedCosts = field(default_factory=FixedCosts)
    bandwidth: float | None = None
    """The cap in bytes/s (None: unlimited): the wire rate is never taken above it."""
    rounds: int = 0
    throttle_pct: int = 0
    out_dirtied: bool = False
    _wire_bps: float = 0.0
    _page_pps: float = 0.0
    _history: list[int] = field(default_factory=list)
    _pending: list[int] = field(default_factory=list)

    def _still_shrinking(self) -> bool:
        """True after round 0 (nothing to compare with yet) and while the pages left keep halving."""
        p = self._pending
        if len(p) < 2:
            return True
        return p[-1] <= self.config.shrink_factor * p[-2]

    def wire_rate(self, m: RoundMeasure) -> float:
        """The rate the next transfer can expect: the last round's achieved rate when it sent enough to
        tell (4 MiB or more), else the previous figure, else the cap (or 1 GB/s when unlimited)."""
        if m.bytes_sent >= (4 << 20) and m.send_s > 0:
            self._wire_bps = m.bytes_sent / m.send_s
        rate = self._wire_bps or (self.bandwidth or 1e9)
        return min(rate, self.bandwidth) if self.bandwidth else rate

    def page_rate(self, m: RoundMeasure, wire_bps: float) -> float:
        """Pages per second the next transfer can expect: the last round's when it handled enough pages to
        tell (1,024 or more), else the previous figure, else the wire rate in whole pages."""
        pages = m.pages_sent if m.pages_sent is not None else m.bytes_sent // PAGE_SIZE
        if pages >= 1024 and m.send_s > 0:
            self._page_pps = pages / m.send_s
        return self._page_pps or wire_bps / PAGE_SIZE

    def predict_ms(self, m: RoundMeasure, dirty_pps: float, page_pps: float, wire_bps: float) -> float:
        """Downtime of a switchover now: what is dirty, plus what the guest dirties until it stops.

        A page that holds data costs its bytes on the wire; a zero or fill page a marker (the last round's
        page rate). The last round's mix says nothing about the pages left (measured: a round of 944k zero
        pages ran at 2.1 M pages/s, then 15k data pages were predicted at that rate: 49 ms predicted, 533
        ms actual), so the mix of the pages left is sampled (``pending_data_fraction``)."""
        until_stop_s = m.since_harvest_s + self.costs.unplug_ms / 1e3
        left_pages = m.pending_pages + dirty_pps * until_stop_s
        frac = m.pending_data_fraction
        if frac is None:
            return left_pages / page_pps * 1e3 + self.costs.downtime_ms()
        data_pps = wire_bps / PAGE_SIZE
        marker_pps = max(page_pps, data_pps)
        return left_pages * (frac / data_pps + (1 - frac) / marker_pps) * 1e3 + self.costs.downtime_ms()

    def after_round(self, m: RoundMeasure, elapsed_s: float) -> Decision:
        cfg = self.config
        self.rounds += 1
        dirty_pps = m.dirtied_pages / m.dirty_interval_s if m.dirty_interval_s > 0 else 0.0
        dirty_bps = dirty_pps * PAGE_SIZE
        wire_bps = self.wire_rate(m)
        page_pps = self.page_rate(m, wire_bps)
        predicted = self.predict_ms(m, dirty_pps, page_pps, wire_bps)
        self._history.append(m.pending_pages + m.dirtied_pages)
        self._pending.append(m.pending_pages)

        def decide(verdict: Verdict, reason: str) -> Decision:
            return Decision(verdict, predicted, dirty_bps, wire_bps, self.throttle_pct, reason, page_pps)

        fixed = self.costs.downtime_ms()
        settled = predicted <= fixed + cfg.settled_margin_ms
        last_chance = self.rounds + 1 >= cfg.max_rounds or elapsed_s >= cfg.time_budget_s
        # Fixed costs over the limit (a large switchover check) are lowered by no round: the limit then
        # bounds what rounds can lower, the pages left and what the guest dirties until it stops.
        fixed_over = fixed + cfg.settled_margin_ms > cfg.downtime_limit_ms
        budget = fixed + cfg.downtime_limit_ms if fixed_over else cfg.downtime_limit_ms
        if self.rounds >= cfg.min_rounds and predicted <= budget:
            fits = (
                f"predicted downtime {predicted:.0f} ms fits the limit"
                if predicted <= cfg.downtime_limit_ms
                else f"the switchover's fixed costs alone ({fixed:.0f} ms: device state, the check of "
                f"{self.costs.recheck_ms:.0f} ms) exceed the limit of {cfg.downtime_limit_ms:.0f} ms; "
                f"the rest ({predicted - fixed:.0f} ms) fits it"
            )
            if settled or last_chance or not self._still_shrinking():
                return decide(Verdict.SWITCH_OVER, fits)
            shrinking = "but the pages left still shrink: one more round while the guest runs"
            return decide(Verdict.ITERATE, f"{fits}, {shrinking}")
        if elapsed_s >= cfg.time_budget_s or self.rounds >= cfg.max_rounds:
            return decide(
                Verdict.FAIL,
                f"did not converge within {cfg.time_budget_s:.0f} s / {cfg.max_rounds} rounds: predicted "
                f"downtime {predicted:.0f} ms > limit {cfg.downtime_limit_ms:.0f} ms (dirty "
                f"{dirty_bps / 2**20:.0f} MiB/s, wire {wire_bps / 2**20:.0f} MiB/s)",
            )
        stalled = len(self._history) > cfg.stalled_rounds and min(
            self._history[-cfg.stalled_rounds :]
        ) >= min(self._history[: -cfg.stalled_rounds])
        if dirty_pps >= cfg.out_dirty_ratio * page_pps or stalled:
            self.out_dirtied = True
            why = (
                f"the guest dirties {dirty_bps / 2**20:.0f} MiB/s, "
                f"the link carries {page_pps * PAGE_SIZE / 2**20:.0f} MiB/s of pages"
                if not stalled
                else f"the pages left have not shrunk in {cfg.stalled_rounds} rounds"
            )
            if cfg.out_dirty_policy is OutDirtyPolicy.FAIL:
                return decide(Verdict.FAIL, f"{why}; policy 'fail': the source keeps running")
            if cfg.out_dirty_policy is OutDirtyPolicy.THROTTLE:
                self.throttle_pct = (
                    cfg.throttle_initial_pct
                    if self.throttle_pct == 0
                    else min(cfg.throttle_max_pct, self.throttle_pct + cfg.throttle_step_pct)
                )
                return decide(Verdict.ITERATE, f"{why}; vCPUs throttled to {100 - self.throttle_pct}%")
            return decide(Verdict.ITERATE, f"{why}; policy 'iterate' within the time budget")
        return decide(Verdict.ITERATE, f"predicted downtime {predicted:.0f} ms > limit; converging")
