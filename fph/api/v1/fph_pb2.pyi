from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VmState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VM_STATE_UNSPECIFIED: _ClassVar[VmState]
    VM_STATE_REGISTERED: _ClassVar[VmState]
    VM_STATE_MIGRATING: _ClassVar[VmState]
    VM_STATE_MIGRATED: _ClassVar[VmState]
    VM_STATE_INCOMING: _ClassVar[VmState]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_FPH: _ClassVar[Mode]
    MODE_NATIVE: _ClassVar[Mode]
    MODE_NONE: _ClassVar[Mode]

class OutDirtyPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUT_DIRTY_POLICY_UNSPECIFIED: _ClassVar[OutDirtyPolicy]
    OUT_DIRTY_POLICY_THROTTLE: _ClassVar[OutDirtyPolicy]
    OUT_DIRTY_POLICY_ITERATE: _ClassVar[OutDirtyPolicy]
    OUT_DIRTY_POLICY_FAIL: _ClassVar[OutDirtyPolicy]

class FirstHintRun(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FIRST_HINT_RUN_UNSPECIFIED: _ClassVar[FirstHintRun]
    FIRST_HINT_RUN_AUTO: _ClassVar[FirstHintRun]
    FIRST_HINT_RUN_WAIT: _ClassVar[FirstHintRun]
    FIRST_HINT_RUN_OVERLAP: _ClassVar[FirstHintRun]

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PHASE_PENDING: _ClassVar[Phase]
    PHASE_PREPARING_TARGET: _ClassVar[Phase]
    PHASE_TARGET_READY: _ClassVar[Phase]
    PHASE_RUNNING: _ClassVar[Phase]
    PHASE_SUCCEEDED: _ClassVar[Phase]
    PHASE_FAILED: _ClassVar[Phase]
VM_STATE_UNSPECIFIED: VmState
VM_STATE_REGISTERED: VmState
VM_STATE_MIGRATING: VmState
VM_STATE_MIGRATED: VmState
VM_STATE_INCOMING: VmState
MODE_UNSPECIFIED: Mode
MODE_FPH: Mode
MODE_NATIVE: Mode
MODE_NONE: Mode
OUT_DIRTY_POLICY_UNSPECIFIED: OutDirtyPolicy
OUT_DIRTY_POLICY_THROTTLE: OutDirtyPolicy
OUT_DIRTY_POLICY_ITERATE: OutDirtyPolicy
OUT_DIRTY_POLICY_FAIL: OutDirtyPolicy
FIRST_HINT_RUN_UNSPECIFIED: FirstHintRun
FIRST_HINT_RUN_AUTO: FirstHintRun
FIRST_HINT_RUN_WAIT: FirstHintRun
FIRST_HINT_RUN_OVERLAP: FirstHintRun
PHASE_UNSPECIFIED: Phase
PHASE_PENDING: Phase
PHASE_PREPARING_TARGET: Phase
PHASE_TARGET_READY: Phase
PHASE_RUNNING: Phase
PHASE_SUCCEEDED: Phase
PHASE_FAILED: Phase

class VmSpec(_message.Message):
    __slots__ = ("name", "qmp_socket", "ram_file", "balloon_socket", "memory_bytes", "write_log", "free_page_reporting")
    NAME_FIELD_NUMBER: _ClassVar[int]
    QMP_SOCKET_FIELD_NUMBER: _ClassVar[int]
    RAM_FILE_FIELD_NUMBER: _ClassVar[int]
    BALLOON_SOCKET_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    WRITE_LOG_FIELD_NUMBER: _ClassVar[int]
    FREE_PAGE_REPORTING_FIELD_NUMBER: _ClassVar[int]
    name: str
    qmp_socket: str
    ram_file: str
    balloon_socket: str
    memory_bytes: int
    write_log: str
    free_page_reporting: bool
    def __init__(self, name: _Optional[str] = ..., qmp_socket: _Optional[str] = ..., ram_file: _Optional[str] = ..., balloon_socket: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., write_log: _Optional[str] = ..., free_page_reporting: _Optional[bool] = ...) -> None: ...

class Vm(_message.Message):
    __slots__ = ("spec", "state", "balloon_connected", "free_page_hint_negotiated", "plugin_arg", "migration_id", "degraded", "incoming", "balloon_worker_pid")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BALLOON_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    FREE_PAGE_HINT_NEGOTIATED_FIELD_NUMBER: _ClassVar[int]
    PLUGIN_ARG_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    INCOMING_FIELD_NUMBER: _ClassVar[int]
    BALLOON_WORKER_PID_FIELD_NUMBER: _ClassVar[int]
    spec: VmSpec
    state: VmState
    balloon_connected: bool
    free_page_hint_negotiated: bool
    plugin_arg: str
    migration_id: str
    degraded: str
    incoming: str
    balloon_worker_pid: int
    def __init__(self, spec: _Optional[_Union[VmSpec, _Mapping]] = ..., state: _Optional[_Union[VmState, str]] = ..., balloon_connected: _Optional[bool] = ..., free_page_hint_negotiated: _Optional[bool] = ..., plugin_arg: _Optional[str] = ..., migration_id: _Optional[str] = ..., degraded: _Optional[str] = ..., incoming: _Optional[str] = ..., balloon_worker_pid: _Optional[int] = ...) -> None: ...

class RegisterVmRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: VmSpec
    def __init__(self, spec: _Optional[_Union[VmSpec, _Mapping]] = ...) -> None: ...

class ListVmsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListVmsResponse(_message.Message):
    __slots__ = ("vms",)
    VMS_FIELD_NUMBER: _ClassVar[int]
    vms: _containers.RepeatedCompositeFieldContainer[Vm]
    def __init__(self, vms: _Optional[_Iterable[_Union[Vm, _Mapping]]] = ...) -> None: ...

class GetVmRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnregisterVmRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnregisterVmResponse(_message.Message):
    __slots__ = ("done_sent",)
    DONE_SENT_FIELD_NUMBER: _ClassVar[int]
    done_sent: bool
    def __init__(self, done_sent: _Optional[bool] = ...) -> None: ...

class UpgradeBalloonWorkerRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UpgradeBalloonWorkerResponse(_message.Message):
    __slots__ = ("vm", "previous_pid", "seconds")
    VM_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_PID_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    vm: Vm
    previous_pid: int
    seconds: float
    def __init__(self, vm: _Optional[_Union[Vm, _Mapping]] = ..., previous_pid: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class StartHintingRequest(_message.Message):
    __slots__ = ("vm", "acknowledge_on_stop")
    VM_FIELD_NUMBER: _ClassVar[int]
    ACKNOWLEDGE_ON_STOP_FIELD_NUMBER: _ClassVar[int]
    vm: str
    acknowledge_on_stop: bool
    def __init__(self, vm: _Optional[str] = ..., acknowledge_on_stop: _Optional[bool] = ...) -> None: ...

class StopHintingRequest(_message.Message):
    __slots__ = ("vm",)
    VM_FIELD_NUMBER: _ClassVar[int]
    vm: str
    def __init__(self, vm: _Optional[str] = ...) -> None: ...

class GetHintingStatusRequest(_message.Message):
    __slots__ = ("vm",)
    VM_FIELD_NUMBER: _ClassVar[int]
    vm: str
    def __init__(self, vm: _Optional[str] = ...) -> None: ...

class WatchHintingStatusRequest(_message.Message):
    __slots__ = ("vm", "interval_ms")
    VM_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    vm: str
    interval_ms: int
    def __init__(self, vm: _Optional[str] = ..., interval_ms: _Optional[int] = ...) -> None: ...

class HintingStatus(_message.Message):
    __slots__ = ("vm", "state", "host_cmd_id", "guest_cmd_id", "hinted_bytes", "guest_held_bytes", "run_seconds", "blocks", "rejected", "stale_dropped", "acknowledge_on_stop", "broken")
    VM_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HOST_CMD_ID_FIELD_NUMBER: _ClassVar[int]
    GUEST_CMD_ID_FIELD_NUMBER: _ClassVar[int]
    HINTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    GUEST_HELD_BYTES_FIELD_NUMBER: _ClassVar[int]
    RUN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    STALE_DROPPED_FIELD_NUMBER: _ClassVar[int]
    ACKNOWLEDGE_ON_STOP_FIELD_NUMBER: _ClassVar[int]
    BROKEN_FIELD_NUMBER: _ClassVar[int]
    vm: str
    state: str
    host_cmd_id: int
    guest_cmd_id: int
    hinted_bytes: int
    guest_held_bytes: int
    run_seconds: float
    blocks: int
    rejected: int
    stale_dropped: int
    acknowledge_on_stop: bool
    broken: str
    def __init__(self, vm: _Optional[str] = ..., state: _Optional[str] = ..., host_cmd_id: _Optional[int] = ..., guest_cmd_id: _Optional[int] = ..., hinted_bytes: _Optional[int] = ..., guest_held_bytes: _Optional[int] = ..., run_seconds: _Optional[float] = ..., blocks: _Optional[int] = ..., rejected: _Optional[int] = ..., stale_dropped: _Optional[int] = ..., acknowledge_on_stop: _Optional[bool] = ..., broken: _Optional[str] = ...) -> None: ...

class GetGuestStatsRequest(_message.Message):
    __slots__ = ("vm", "refresh")
    VM_FIELD_NUMBER: _ClassVar[int]
    REFRESH_FIELD_NUMBER: _ClassVar[int]
    vm: str
    refresh: bool
    def __init__(self, vm: _Optional[str] = ..., refresh: _Optional[bool] = ...) -> None: ...

class GuestStats(_message.Message):
    __slots__ = ("vm", "values", "age_seconds")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    VM_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    vm: str
    values: _containers.ScalarMap[str, int]
    age_seconds: float
    def __init__(self, vm: _Optional[str] = ..., values: _Optional[_Mapping[str, int]] = ..., age_seconds: _Optional[float] = ...) -> None: ...

class SetBalloonTargetRequest(_message.Message):
    __slots__ = ("vm", "target_bytes")
    VM_FIELD_NUMBER: _ClassVar[int]
    TARGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    vm: str
    target_bytes: int
    def __init__(self, vm: _Optional[str] = ..., target_bytes: _Optional[int] = ...) -> None: ...

class BalloonTarget(_message.Message):
    __slots__ = ("vm", "target_bytes")
    VM_FIELD_NUMBER: _ClassVar[int]
    TARGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    vm: str
    target_bytes: int
    def __init__(self, vm: _Optional[str] = ..., target_bytes: _Optional[int] = ...) -> None: ...

class Check(_message.Message):
    __slots__ = ("name", "ok", "detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    ok: bool
    detail: str
    def __init__(self, name: _Optional[str] = ..., ok: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class PrepareMigrationRequest(_message.Message):
    __slots__ = ("vm", "mode", "destination")
    VM_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    vm: str
    mode: Mode
    destination: IncomingTarget
    def __init__(self, vm: _Optional[str] = ..., mode: _Optional[_Union[Mode, str]] = ..., destination: _Optional[_Union[IncomingTarget, _Mapping]] = ...) -> None: ...

class PrepareMigrationResponse(_message.Message):
    __slots__ = ("ready", "checks", "memory_total", "estimated_bytes", "estimate_basis")
    READY_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_BASIS_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    checks: _containers.RepeatedCompositeFieldContainer[Check]
    memory_total: int
    estimated_bytes: int
    estimate_basis: str
    def __init__(self, ready: _Optional[bool] = ..., checks: _Optional[_Iterable[_Union[Check, _Mapping]]] = ..., memory_total: _Optional[int] = ..., estimated_bytes: _Optional[int] = ..., estimate_basis: _Optional[str] = ...) -> None: ...

class PrepareIncomingRequest(_message.Message):
    __slots__ = ("vm", "mode")
    VM_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    vm: str
    mode: Mode
    def __init__(self, vm: _Optional[str] = ..., mode: _Optional[_Union[Mode, str]] = ...) -> None: ...

class IncomingTarget(_message.Message):
    __slots__ = ("daemon_socket", "vm", "qmp_socket", "ram_file", "balloon_socket", "migration_uri", "data_address", "credential", "tls", "mode")
    DAEMON_SOCKET_FIELD_NUMBER: _ClassVar[int]
    VM_FIELD_NUMBER: _ClassVar[int]
    QMP_SOCKET_FIELD_NUMBER: _ClassVar[int]
    RAM_FILE_FIELD_NUMBER: _ClassVar[int]
    BALLOON_SOCKET_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_URI_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    daemon_socket: str
    vm: str
    qmp_socket: str
    ram_file: str
    balloon_socket: str
    migration_uri: str
    data_address: str
    credential: str
    tls: bool
    mode: Mode
    def __init__(self, daemon_socket: _Optional[str] = ..., vm: _Optional[str] = ..., qmp_socket: _Optional[str] = ..., ram_file: _Optional[str] = ..., balloon_socket: _Optional[str] = ..., migration_uri: _Optional[str] = ..., data_address: _Optional[str] = ..., credential: _Optional[str] = ..., tls: _Optional[bool] = ..., mode: _Optional[_Union[Mode, str]] = ...) -> None: ...

class MigrateRequest(_message.Message):
    __slots__ = ("vm", "mode", "destination", "bandwidth_bytes_per_second", "downtime_limit_ms", "max_rounds", "progress_interval_ms", "out_dirty_policy", "time_budget_s", "first_hint_run")
    VM_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_LIMIT_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    OUT_DIRTY_POLICY_FIELD_NUMBER: _ClassVar[int]
    TIME_BUDGET_S_FIELD_NUMBER: _ClassVar[int]
    FIRST_HINT_RUN_FIELD_NUMBER: _ClassVar[int]
    vm: str
    mode: Mode
    destination: IncomingTarget
    bandwidth_bytes_per_second: int
    downtime_limit_ms: int
    max_rounds: int
    progress_interval_ms: int
    out_dirty_policy: OutDirtyPolicy
    time_budget_s: int
    first_hint_run: FirstHintRun
    def __init__(self, vm: _Optional[str] = ..., mode: _Optional[_Union[Mode, str]] = ..., destination: _Optional[_Union[IncomingTarget, _Mapping]] = ..., bandwidth_bytes_per_second: _Optional[int] = ..., downtime_limit_ms: _Optional[int] = ..., max_rounds: _Optional[int] = ..., progress_interval_ms: _Optional[int] = ..., out_dirty_policy: _Optional[_Union[OutDirtyPolicy, str]] = ..., time_budget_s: _Optional[int] = ..., first_hint_run: _Optional[_Union[FirstHintRun, str]] = ...) -> None: ...

class MigrationProgress(_message.Message):
    __slots__ = ("migration_id", "phase", "status", "fph_phase", "time_elapsed_ms", "memory_total", "memory_processed", "memory_remaining", "memory_iteration", "memory_dirty_rate", "memory_bps", "memory_constant", "memory_normal", "hinted_bytes", "stale_hints_dropped", "message")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FPH_PHASE_FIELD_NUMBER: _ClassVar[int]
    TIME_ELAPSED_MS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_REMAINING_FIELD_NUMBER: _ClassVar[int]
    MEMORY_ITERATION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_DIRTY_RATE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BPS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_CONSTANT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_NORMAL_FIELD_NUMBER: _ClassVar[int]
    HINTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    STALE_HINTS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    phase: Phase
    status: str
    fph_phase: str
    time_elapsed_ms: float
    memory_total: int
    memory_processed: int
    memory_remaining: int
    memory_iteration: int
    memory_dirty_rate: int
    memory_bps: int
    memory_constant: int
    memory_normal: int
    hinted_bytes: int
    stale_hints_dropped: int
    message: str
    def __init__(self, migration_id: _Optional[str] = ..., phase: _Optional[_Union[Phase, str]] = ..., status: _Optional[str] = ..., fph_phase: _Optional[str] = ..., time_elapsed_ms: _Optional[float] = ..., memory_total: _Optional[int] = ..., memory_processed: _Optional[int] = ..., memory_remaining: _Optional[int] = ..., memory_iteration: _Optional[int] = ..., memory_dirty_rate: _Optional[int] = ..., memory_bps: _Optional[int] = ..., memory_constant: _Optional[int] = ..., memory_normal: _Optional[int] = ..., hinted_bytes: _Optional[int] = ..., stale_hints_dropped: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class CancelMigrationRequest(_message.Message):
    __slots__ = ("vm",)
    VM_FIELD_NUMBER: _ClassVar[int]
    vm: str
    def __init__(self, vm: _Optional[str] = ...) -> None: ...

class CancelMigrationResponse(_message.Message):
    __slots__ = ("migration_id",)
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    def __init__(self, migration_id: _Optional[str] = ...) -> None: ...

class GetMigrationReportRequest(_message.Message):
    __slots__ = ("vm", "migration_id")
    VM_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    vm: str
    migration_id: str
    def __init__(self, vm: _Optional[str] = ..., migration_id: _Optional[str] = ...) -> None: ...

class MigrationReport(_message.Message):
    __slots__ = ("migration_id", "vm", "mode", "phase", "status", "job_stats", "fph", "rounds", "error", "cleanup", "destination_vm", "start_time", "end_time", "json")
    class JobStatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class FphEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    VM_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    JOB_STATS_FIELD_NUMBER: _ClassVar[int]
    FPH_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CLEANUP_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_VM_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    vm: str
    mode: Mode
    phase: Phase
    status: str
    job_stats: _containers.ScalarMap[str, int]
    fph: _containers.ScalarMap[str, float]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundStats]
    error: str
    cleanup: _containers.RepeatedScalarFieldContainer[str]
    destination_vm: str
    start_time: float
    end_time: float
    json: str
    def __init__(self, migration_id: _Optional[str] = ..., vm: _Optional[str] = ..., mode: _Optional[_Union[Mode, str]] = ..., phase: _Optional[_Union[Phase, str]] = ..., status: _Optional[str] = ..., job_stats: _Optional[_Mapping[str, int]] = ..., fph: _Optional[_Mapping[str, float]] = ..., rounds: _Optional[_Iterable[_Union[RoundStats, _Mapping]]] = ..., error: _Optional[str] = ..., cleanup: _Optional[_Iterable[str]] = ..., destination_vm: _Optional[str] = ..., start_time: _Optional[float] = ..., end_time: _Optional[float] = ..., json: _Optional[str] = ...) -> None: ...

class RoundStats(_message.Message):
    __slots__ = ("round", "pages_data", "pages_zero_skipped", "bytes_on_wire", "hinted_pages", "ms")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PAGES_DATA_FIELD_NUMBER: _ClassVar[int]
    PAGES_ZERO_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    BYTES_ON_WIRE_FIELD_NUMBER: _ClassVar[int]
    HINTED_PAGES_FIELD_NUMBER: _ClassVar[int]
    MS_FIELD_NUMBER: _ClassVar[int]
    round: int
    pages_data: int
    pages_zero_skipped: int
    bytes_on_wire: int
    hinted_pages: int
    ms: float
    def __init__(self, round: _Optional[int] = ..., pages_data: _Optional[int] = ..., pages_zero_skipped: _Optional[int] = ..., bytes_on_wire: _Optional[int] = ..., hinted_pages: _Optional[int] = ..., ms: _Optional[float] = ...) -> None: ...
