"""vhost-user wire format: request ids, flags, feature bits, payload codecs and a frame decoder.

Everything here is pure: bytes in, dataclasses out (and back). Sizes and fd counts are checked against the
table in ``REQUESTS`` so that a malformed message is rejected before any state changes (rust-vmm's
``is_valid()``). Byte order is the machine's (vhost-user says "native"); fph runs on x86-64, so ``<``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from fph.vhost_user.errors import MessageError, UnknownRequestError

HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size
#: VHOST_MEMORY_BASELINE_NREGIONS: the regions of a SET_MEM_TABLE, and the most fds any message carries.
MAX_FDS = 8
#: Largest payload any request may carry (a full memory table is 8 + 32 * 8 bytes); 4 KiB leaves room
#: without letting a peer make us buffer megabytes.
MAX_PAYLOAD = 4096
MAX_CONFIG_SIZE = 256

VERSION = 0x1
VERSION_MASK = 0x3
REPLY = 0x4
NEED_REPLY = 0x8
#: Replies carry exactly this (QEMU rejects anything else, and never wants NEED_REPLY echoed).
REPLY_FLAGS = VERSION | REPLY

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
MEM_REGION = struct.Struct("<QQQQ")
MEM_TABLE_HEAD = struct.Struct("<II")
LOG_BASE = struct.Struct("<QQ")
CONFIG_HEAD = struct.Struct("<III")

VRING_INDEX_MASK = 0xFF
VRING_NOFD = 0x100
VRING_F_LOG = 0x1


class FrontendReq(enum.IntEnum):
    """Front-end (QEMU) -> back-end request ids."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class BackendReq(enum.IntEnum):
    """Back-end -> front-end request ids (on the SET_BACKEND_REQ_FD socket)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5


class ProtocolFeature(enum.IntFlag):
    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


# Transport feature bits carried in GET/SET_FEATURES next to the device's own bits.
F_NOTIFY_ON_EMPTY = 1 << 24
F_LOG_ALL = 1 << 26
F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_PROTOCOL_FEATURES = 1 << 30
F_VERSION_1 = 1 << 32
F_ACCESS_PLATFORM = 1 << 33
F_RING_PACKED = 1 << 34


@dataclass(frozen=True)
class RequestSpec:
    """What a request may carry: exact payload size (None = variable), fd count range, always replied."""

    size: int | None
    min_fds: int = 0
    max_fds: int = 0
    replies: bool = False


_FR = FrontendReq
REQUESTS: dict[FrontendReq, RequestSpec] = {
    _FR.GET_FEATURES: RequestSpec(0, replies=True),
    _FR.SET_FEATURES: RequestSpec(8),
    _FR.SET_OWNER: RequestSpec(0),
    _FR.RESET_OWNER: RequestSpec(0),
    _FR.SET_MEM_TABLE: RequestSpec(None, 0, MAX_FDS),
    _FR.SET_LOG_BASE: RequestSpec(16, 1, 1),
    _FR.SET_LOG_FD: RequestSpec(8, 0, 1),
    _FR.SET_VRING_NUM: RequestSpec(8),
    _FR.SET_VRING_ADDR: RequestSpec(40),
    _FR.SET_VRING_BASE: RequestSpec(8),
    _FR.GET_VRING_BASE: RequestSpec(8, replies=True),
    _FR.SET_VRING_KICK: RequestSpec(8, 0, 1),
    _FR.SET_VRING_CALL: RequestSpec(8, 0, 1),
    _FR.SET_VRING_ERR: RequestSpec(8, 0, 1),
    _FR.GET_PROTOCOL_FEATURES: RequestSpec(0, replies=True),
    _FR.SET_PROTOCOL_FEATURES: RequestSpec(8),
    _FR.GET_QUEUE_NUM: RequestSpec(0, replies=True),
    _FR.SET_VRING_ENABLE: RequestSpec(8),
    _FR.SET_BACKEND_REQ_FD: RequestSpec(0, 1, 1),
    _FR.GET_CONFIG: RequestSpec(None, replies=True),
    _FR.SET_CONFIG: RequestSpec(None),
    _FR.RESET_DEVICE: RequestSpec(0),
    _FR.VRING_KICK: RequestSpec(8),
    _FR.GET_MAX_MEM_SLOTS: RequestSpec(0, replies=True),
    _FR.SET_STATUS: RequestSpec(8),
    _FR.GET_STATUS: RequestSpec(0, replies=True),
}


@dataclass(frozen=True)
class Header:
    request: int
    flags: int
    size: int

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & REPLY)

    def pack(self) -> bytes:
        return HEADER.pack(self.request, self.flags, self.size)

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        if len(data) != HEADER_SIZE:
            raise MessageError(f"header is {len(data)} bytes, expected {HEADER_SIZE}")
        request, flags, size = HEADER.unpack(data)
        if flags & VERSION_MASK != VERSION:
            raise MessageError(f"request {request}: unsupported version in flags {flags:#x}")
        if flags & ~(VERSION_MASK | REPLY | NEED_REPLY):
            raise MessageError(f"request {request}: unknown flag bits {flags:#x}")
        if size > MAX_PAYLOAD:
            raise MessageError(f"request {request}: payload size {size} exceeds {MAX_PAYLOAD}")
        return cls(request, flags, size)


@dataclass(frozen=True)
class Message:
    header: Header
    payload: bytes
    fds: tuple[int, ...] = field(default=())


def encode(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes) -> bytes:
    return encode(request, payload, REPLY_FLAGS)


def check_request(header: Header, payload: bytes, fds: tuple[int, ...]) -> FrontendReq:
    """Validate size and fd count for a front-end request; raise before any state changes."""
    try:
        request = FrontendReq(header.request)
        spec = REQUESTS[request]
    except (ValueError, KeyError):
        raise UnknownRequestError(f"unknown or unsupported request id {header.request}") from None
    if header.is_reply:
        raise MessageError(f"{request.name}: front-end request carries the REPLY flag")
    if len(payload) != header.size:
        raise MessageError(f"{request.name}: payload is {len(payload)} bytes, header says {header.size}")
    if spec.size is not None and header.size != spec.size:
        raise MessageError(f"{request.name}: payload size {header.size}, expected {spec.size}")
    if not spec.min_fds <= len(fds) <= spec.max_fds:
        raise MessageError(
            f"{request.name}: {len(fds)} fds attached, expected {spec.min_fds}..{spec.max_fds}"
        )
    return request


def decode_u64(payload: bytes) -> int:
    return int(U64.unpack(payload)[0])


def encode_u64(value: int) -> bytes:
    return U64.pack(value & 0xFFFF_FFFF_FFFF_FFFF)


@dataclass(frozen=True)
class VringState:
    index: int
    num: int

    @classmethod
    def decode(cls, payload: bytes) -> VringState:
        return cls(*VRING_STATE.unpack(payload))

    def encode(self) -> bytes:
        return VRING_STATE.pack(self.index, self.num)


@dataclass(frozen=True)
class VringAddr:
    """Ring addresses as the front-end sends them: QEMU virtual addresses (log_guest_addr is a GPA)."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int

    @classmethod
    def decode(cls, payload: bytes) -> VringAddr:
        return cls(*VRING_ADDR.unpack(payload))

    def encode(self) -> bytes:
        return VRING_ADDR.pack(
            self.index,
            self.flags,
            self.desc_user_addr,
            self.used_user_addr,
            self.avail_user_addr,
            self.log_guest_addr,
        )


@dataclass(frozen=True)
class MemoryRegionMsg:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def encode(self) -> bytes:
        return MEM_REGION.pack(self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset)


def decode_mem_table(payload: bytes, nfds: int) -> list[MemoryRegionMsg]:
    if len(payload) < MEM_TABLE_HEAD.size:
        raise MessageError(f"SET_MEM_TABLE: payload {len(payload)} bytes is shorter than its head")
    nregions, _padding = MEM_TABLE_HEAD.unpack_from(payload)
    if nregions > MAX_FDS:
        raise MessageError(f"SET_MEM_TABLE: {nregions} regions, at most {MAX_FDS}")
    expected = MEM_TABLE_HEAD.size + nregions * MEM_REGION.size
    # QEMU sends the full fixed-size table (8 slots) but counts only the used ones.
    full = MEM_TABLE_HEAD.size + MAX_FDS * MEM_REGION.size
    if len(payload) not in (expected, full):
        raise MessageError(f"SET_MEM_TABLE: payload {len(payload)} bytes for {nregions} regions")
    if nfds != nregions:
        raise MessageError(f"SET_MEM_TABLE: {nfds} fds for {nregions} regions")
    return [
        MemoryRegionMsg(*MEM_REGION.unpack_from(payload, MEM_TABLE_HEAD.size + i * MEM_REGION.size))
        for i in range(nregions)
    ]


def encode_mem_table(regions: list[MemoryRegionMsg]) -> bytes:
    return MEM_TABLE_HEAD.pack(len(regions), 0) + b"".join(r.encode() for r in regions)


@dataclass(frozen=True)
class ConfigMsg:
    offset: int
    size: int
    flags: int
    data: bytes

    @classmethod
    def decode(cls, payload: bytes, *, with_data: bool) -> ConfigMsg:
        if len(payload) < CONFIG_HEAD.size:
            raise MessageError(f"config payload {len(payload)} bytes is shorter than its head")
        offset, size, flags = CONFIG_HEAD.unpack_from(payload)
        if size == 0 or size > MAX_CONFIG_SIZE:
            raise MessageError(f"config size {size} outside 1..{MAX_CONFIG_SIZE}")
        if len(payload) != CONFIG_HEAD.size + size:
            raise MessageError(f"config payload {len(payload)} bytes for size {size}")
        data = payload[CONFIG_HEAD.size :] if with_data else b""
        return cls(offset, size, flags, data)

    def encode(self) -> bytes:
        return CONFIG_HEAD.pack(self.offset, self.size, self.flags) + self.data


class FrameDecoder:
    """Incremental framing for a stream socket; says how many bytes to read next so that one read never
    spans two messages (fds arrive with the first byte of their message, so they stay attached to it)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._fds: list[int] = []
        self._header: Header | None = None

    @property
    def bytes_needed(self) -> int:
        if self._header is None:
            return HEADER_SIZE - len(self._buf)
        return self._header.size - len(self._buf)

    @property
    def mid_message(self) -> bool:
        return bool(self._buf) or self._header is not None or bool(self._fds)

    def take_fds(self) -> list[int]:
        """Hand back fds of an incomplete message (the caller closes them)."""
        fds, self._fds = self._fds, []
        return fds

    def feed(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> Message | None:
        """Feed at most ``bytes_needed`` bytes; return a message when one is complete."""
        self._fds.extend(fds)
        if len(data) > self.bytes_needed:
            raise MessageError(f"fed {len(data)} bytes, only {self.bytes_needed} belong to this message")
        self._buf += data
        if self._header is None:
            if len(self._buf) < HEADER_SIZE:
                return None
            self._header = Header.unpack(bytes(self._buf))
            self._buf.clear()
        if len(self._buf) < self._header.size:
            return None
        msg = Message(self._header, bytes(self._buf), tuple(self._fds))
        self._header, self._buf, self._fds = None, bytearray(), []
        return msg
