"""The virtio-balloon device as the virtio spec and Linux's ``include/uapi/linux/virtio_balloon.h`` define it:
feature bits, the config layout, free page hint command ids, stats tags and how queues are numbered.

Constants only, so every other part of the balloon (and the daemon) can import them without pulling in
the device.
"""

from __future__ import annotations

import enum
import struct

# Feature bits.
F_MUST_TELL_HOST = 1 << 0
F_STATS_VQ = 1 << 1
F_DEFLATE_ON_OOM = 1 << 2
F_FREE_PAGE_HINT = 1 << 3
F_PAGE_POISON = 1 << 4
F_REPORTING = 1 << 5

#: ``free_page_hint_cmd_id`` values with a fixed meaning; a run's id is CMD_ID_MIN..CMD_ID_MAX.
CMD_ID_STOP = 0
CMD_ID_DONE = 1
CMD_ID_MIN = 0x8000_0000
CMD_ID_MAX = 0xFFFF_FFFF

CONFIG = struct.Struct("<IIII")  # num_pages, actual, free_page_hint_cmd_id, poison_val
CONFIG_SIZE = CONFIG.size
WRITABLE_CONFIG = (range(4, 8), range(12, 16))  # actual, poison_val: the driver's fields

STAT = struct.Struct("<HQ")
STAT_NAMES = (
    "swap_in", "swap_out", "major_faults", "minor_faults", "free_memory", "total_memory",
    "available_memory", "disk_caches", "hugetlb_allocations", "hugetlb_failures", "oom_kills",
    "alloc_stall", "async_scan", "direct_scan", "async_reclaim", "direct_reclaim",
)  # fmt: skip

#: Inflate/deflate buffers carry 32-bit PFNs of 4 KiB pages whatever the guest's page size.
BALLOON_PFN_SHIFT = 12


class QueueRole(enum.Enum):
    INFLATE = "inflate"
    DEFLATE = "deflate"
    STATS = "stats"
    FREE_PAGE = "free_page"
    REPORTING = "reporting"


def queue_roles(features: int) -> dict[int, QueueRole]:
    """Queue index -> role, compacted over the queues that exist, as Linux ``init_vqs()`` numbers them
    from the *negotiated* features (a missing queue takes no index)."""
    roles = [QueueRole.INFLATE, QueueRole.DEFLATE]
    if features & F_STATS_VQ:
        roles.append(QueueRole.STATS)
    if features & F_FREE_PAGE_HINT:
        roles.append(QueueRole.FREE_PAGE)
    if features & F_REPORTING:
        roles.append(QueueRole.REPORTING)
    return dict(enumerate(roles))
