"""What an orchestrator's out-dirty policy, time budget and first-hint-run choice (``MigrateRequest``
fields 8, 9 and 10) become in each mode: fph mode's convergence config, and QEMU's auto-converge capability
and the native run's timeout. The daemon's refusals (FAIL or a first-hint-run choice for native, an
out-of-range budget) are in ``tests/test_daemon.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from fph.daemon.client import FIRST_HINT_RUN, OUT_DIRTY_POLICY
from fph.daemon.jobs import Params, Target, fph_migration, native_migration
from fph.daemon.migration_mode import MigrationMode
from fph.migration.convergence import DEFAULT_TIME_BUDGET_S, OutDirtyPolicy
from fph.migration.first_hint_run import FirstHintRun
from fph.migration.fph_mode import FphConfig
from fph.migration.native import DEFAULT_TIMEOUT_S
from fph.ram_layout import RamLayout
from fph.transfer.security import DataPlaneSecurity

TARGET = Target("dst", "tcp:127.0.0.1:4444", data_address=("127.0.0.1", 7070), credential="c")


def params(
    mode: MigrationMode, policy: OutDirtyPolicy, budget: float | None, first: FirstHintRun = FirstHintRun.AUTO
) -> Params:
    return Params(
        mode, None, 300, 30, 0.5, out_dirty_policy=policy, time_budget_s=budget, first_hint_run=first
    )


@pytest.mark.parametrize(
    ("policy", "auto_converge"), [(OutDirtyPolicy.THROTTLE, True), (OutDirtyPolicy.ITERATE, False)]
)
def test_native_mode_throttles_with_auto_converge_and_gives_up_after_the_budget(
    policy: OutDirtyPolicy, auto_converge: bool
) -> None:
    mig = native_migration(
        src_qmp=Path("/run/none/qmp.sock"), target=TARGET, params=params(MigrationMode.NATIVE, policy, 42)
    )
    assert mig.capabilities["auto-converge"] is auto_converge
    assert mig.capabilities["x-ignore-shared"] is False
    assert mig.timeout_s == 42
    default = native_migration(
        src_qmp=Path("/run/none/qmp.sock"), target=TARGET, params=params(MigrationMode.NONE, policy, None)
    )
    assert default.timeout_s == DEFAULT_TIMEOUT_S


@pytest.mark.parametrize(("policy", "first"), list(zip(OutDirtyPolicy, FirstHintRun, strict=True)))
def test_fph_mode_takes_the_policy_the_budget_and_the_first_run_into_its_config(
    policy: OutDirtyPolicy, first: FirstHintRun
) -> None:
    def build(budget: float | None) -> FphConfig:
        return fph_migration(
            src_qmp=Path("/run/none/qmp.sock"),
            src_ram=Path("/run/none/ram"),
            layout=RamLayout.pc(1 << 30),
            writelog=None,
            control=None,
            ring_ranges=None,
            target=TARGET,
            params=params(MigrationMode.FPH, policy, budget, first),
            security=DataPlaneSecurity("c"),
        ).config

    config = build(42)
    assert config.out_dirty_policy is policy and config.first_hint_run is first
    assert config.time_budget_s == 42
    assert build(None).time_budget_s == DEFAULT_TIME_BUDGET_S


def test_the_cli_offers_every_policy() -> None:
    """``fph migrate --out-dirty-policy`` maps each engine policy to one API enum value, and no other."""
    assert set(OUT_DIRTY_POLICY) == {p.value for p in OutDirtyPolicy}
    assert len(set(OUT_DIRTY_POLICY.values())) == len(OutDirtyPolicy)
    assert set(FIRST_HINT_RUN) == {r.value for r in FirstHintRun}
    assert len(set(FIRST_HINT_RUN.values())) == len(FirstHintRun)
