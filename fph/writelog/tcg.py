"""The TCG write log: fph's QEMU plugin (``tcg_writelog.c``) and its consumer.

Why a plugin: under TCG (the lab, CI) nothing else reports guest writes to a shared RAM file; the plugin
sets a bit per guest-physical page on every instrumented store with an atomic OR in a shared log file,
and fph harvests it with one atomic exchange per word, without stopping the guest.

The plugin logs only while armed: a store callback costs the guest several times its store speed, so a
guest runs without any between migrations. ``start()`` arms it and waits until the plugin says every
vCPU runs code that logs (it retranslates all guest code: milliseconds, or up to a halted vCPU's next
interrupt); ``close()`` disarms it.

Usage::

    log = TcgWriteLog(run_dir / "wlog.bin", RamLayout.pc(mem))   # creates the log file
    VMConfig(ram_backend="file", plugins=(log.plugin_arg,))       # -plugin <so>,log=<file>,ram=<span>
    ... start QEMU ...
    log.start()                                                   # checks the plugin attached, arms
    bitmap.merge_write_log(log.harvest())

The plugin is built from source with the system C compiler by ``scripts/setup`` (``python -m
fph.writelog.build``), next to the source in the installed package: ``fph/writelog/_build/
tcg_writelog-<hash of source and flags>.so`` (never committed). At run time fph only uses that file: a missing
or stale one (built from another ``tcg_writelog.c``) is an error that says to run scripts/setup. With
``$FPH_WRITELOG_CACHE`` set (tests, development) fph instead builds on demand into that directory.
The same .so is loaded into fph with ctypes for the harvest helper (the QEMU API symbols are weak).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import logging
import mmap
import os
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fph.ram_layout import PAGE_SHIFT, RamLayout
from fph.writelog.base import Words, WriteLog, full_words, words_for
from fph.writelog.errors import (
    PluginBuildError,
    PluginNotAttachedError,
    WriteLogArmTimeoutError,
    WriteLogError,
    WriteLogFormatError,
    WriteLogStateError,
)

log = logging.getLogger(__name__)


class PluginNotBuiltError(PluginBuildError):
    """The plugin scripts/setup builds is missing or was built from another source: run scripts/setup."""


PLUGIN_SOURCE = Path(__file__).with_name("tcg_writelog.c")
PLUGIN_BUILD_DIR = Path(__file__).with_name("_build")
"""Where scripts/setup builds the plugin (inside the installed package tree; ``*.so`` is gitignored)."""
CFLAGS = ("-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra", "-std=gnu11")
MAGIC = b"WLOGv002"
VERSION = 2
HEADER_SIZE = 4096
HEADER_FORMAT = "<8sIIQQQQIIQQQQQQQQQQQ"
"""struct wlog_header of tcg_writelog.c (144 bytes, then zeros up to HEADER_SIZE)."""
ARM_TIMEOUT_S = 10.0
"""How long ``start()`` waits for the plugin to arm. It arms at the next translation block a vCPU runs:
31-336 ms on an idle 1 GiB guest (bench/results/writelog_bench.json), 9-25 ms in fph migrations, which
wake the guest as they ask (twohost_bench-s20-wake, -4g-s20); a paused guest never does."""
_HEADER_FIELDS = (
    "magic",
    "version",
    "page_shift",
    "nbits",
    "bitmap_off",
    "bitmap_bytes",
    "ram_span",
    "attach_pid",
    "attach_count",
    "stores",
    "io_skipped",
    "straddles",
    "lookup_failures",
    "out_of_range",
    "last_out_of_range_gpa",
    "harvests",
    "arm_request",
    "arm_state",
    "arm_changes",
    "arm_state_ns",
)
_OFF_HARVESTS = 104
_OFF_ARM_REQUEST = 112
assert struct.calcsize(HEADER_FORMAT) == 144


@dataclass(frozen=True)
class LogHeader:
    """The log file's header. Counters: ``stores`` approximate (flushed per vCPU every 4096 stores),
    ``lookup_failures`` / ``out_of_range`` exact. ``arm_request`` (fph writes it) is ``(seq << 1) | on``;
    ``arm_state`` is the request the plugin has put in effect, at ``arm_state_ns`` (CLOCK_MONOTONIC);
    ``arm_changes`` counts its changes of mode."""

    magic: bytes
    version: int
    page_shift: int
    nbits: int
    bitmap_off: int
    bitmap_bytes: int
    ram_span: int
    attach_pid: int
    attach_count: int
    stores: int
    io_skipped: int
    straddles: int
    lookup_failures: int
    out_of_range: int
    last_out_of_range_gpa: int
    harvests: int
    arm_request: int
    arm_state: int
    arm_changes: int
    arm_state_ns: int

    @property
    def armed(self) -> bool:
        """The plugin logs every store now (it has put an arming request in effect)."""
        return bool(self.arm_state & 1)

    @classmethod
    def new(cls, ram_span: int) -> LogHeader:
        nbits = (ram_span + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT
        return cls(MAGIC, VERSION, PAGE_SHIFT, nbits, HEADER_SIZE, words_for(nbits) * 8, ram_span,
                   0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)  # fmt: skip

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> LogHeader:
        if len(data) < struct.calcsize(HEADER_FORMAT):
            raise WriteLogFormatError(f"write log header truncated: {len(data)} bytes")
        return cls(*struct.unpack_from(HEADER_FORMAT, data, 0))

    def pack(self) -> bytes:
        raw = struct.pack(HEADER_FORMAT, *(getattr(self, f) for f in _HEADER_FIELDS))
        return raw.ljust(HEADER_SIZE, b"\0")

    @property
    def file_size(self) -> int:
        return self.bitmap_off + self.bitmap_bytes

    def validate(self, *, nbits: int | None = None, file_size: int | None = None, what: str = "log") -> None:
        """Raise WriteLogFormatError unless this header is a ``VERSION`` log of ``nbits`` pages whose file
        has ``file_size`` bytes (the plugin applies the same rules)."""
        if self.magic != MAGIC:
            raise WriteLogFormatError(
                f"{what}: bad magic {self.magic!r} (not an fph write log, expected {MAGIC!r})"
            )
        if self.version != VERSION:
            raise WriteLogFormatError(f"{what}: header version {self.version}, this fph reads {VERSION}")
        if self.page_shift != PAGE_SHIFT:
            raise WriteLogFormatError(f"{what}: page shift {self.page_shift}, expected {PAGE_SHIFT}")
        if self.bitmap_off != HEADER_SIZE or self.bitmap_bytes != words_for(self.nbits) * 8:
            raise WriteLogFormatError(
                f"{what}: bitmap at {self.bitmap_off} with {self.bitmap_bytes} bytes does not fit "
                f"{self.nbits} pages (expected {HEADER_SIZE} and {words_for(self.nbits) * 8})"
            )
        if nbits is not None and self.nbits != nbits:
            raise WriteLogFormatError(
                f"{what}: {self.nbits} pages, the guest's GPA span has {nbits}: the file was made for "
                "another guest size; delete it and create a new log"
            )
        if file_size is not None and file_size != self.file_size:
            raise WriteLogFormatError(
                f"{what}: file has {file_size} bytes, the header says {self.file_size} "
                "(truncated or not a write log)"
            )


# ------------------------------------------------------------------------------------------- building


def plugin_cache_dir() -> Path:
    """Build directory for on-demand builds: ``$FPH_WRITELOG_CACHE`` or ``$XDG_CACHE_HOME/fph/writelog``."""
    env = os.environ.get("FPH_WRITELOG_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "fph" / "writelog"


def plugin_key() -> str:
    """The plugin's build key: a hash of ``tcg_writelog.c`` and the compiler flags (16 hex digits)."""
    h = hashlib.sha256(b"\0".join([PLUGIN_SOURCE.read_bytes(), *(f.encode() for f in CFLAGS)]))
    return h.hexdigest()[:16]


def plugin_file(build_dir: Path | None = None) -> Path:
    """The .so for the current source in ``build_dir`` (default PLUGIN_BUILD_DIR), built or not."""
    return (build_dir or PLUGIN_BUILD_DIR) / f"tcg_writelog-{plugin_key()}.so"


def _compiler(cc: str | None) -> str:
    name = cc or os.environ.get("CC") or "cc"
    path = shutil.which(name)
    if not path:
        raise PluginBuildError(
            f"no C compiler {name!r} to build the TCG write-log plugin: install gcc (apt-get install gcc "
            "libc6-dev) or set CC"
        )
    return path


def build_plugin(*, cache_dir: Path | None = None, cc: str | None = None, force: bool = False) -> Path:
    """Compile ``tcg_writelog.c`` into ``cache_dir`` (default PLUGIN_BUILD_DIR, where scripts/setup builds)
    once per source/flags hash and return the .so path; ``force`` compiles even when it exists. A build
    into PLUGIN_BUILD_DIR removes the plugins built there from older sources."""
    cache = cache_dir or PLUGIN_BUILD_DIR
    out = plugin_file(cache)
    if out.exists() and not force:
        return out
    path = _compiler(cc)
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists() and not force:
            return out
        fd, tmp = tempfile.mkstemp(prefix=".tcg_writelog-", suffix=".so", dir=cache)
        os.close(fd)
        try:
            p = subprocess.run(
                [path, *CFLAGS, "-o", tmp, str(PLUGIN_SOURCE)], capture_output=True, text=True, check=False
            )
            if p.returncode != 0:
                raise PluginBuildError(
                    f"building the TCG write-log plugin with {path} failed (exit {p.returncode}):\n"
                    f"{p.stderr.strip()[-2000:]}"
                )
            os.chmod(tmp, 0o755)
            os.replace(tmp, out)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if cache == PLUGIN_BUILD_DIR:
            for old in cache.glob("tcg_writelog-*.so"):
                if old != out:
                    old.unlink(missing_ok=True)
    return out


def plugin_path() -> Path:
    """The plugin fph runs with: the one scripts/setup built (PLUGIN_BUILD_DIR) for the current source.

    Missing or stale raises PluginNotBuiltError (run scripts/setup); fph never compiles at run time unless
    ``$FPH_WRITELOG_CACHE`` is set, which builds on demand into that directory (tests, development)."""
    if os.environ.get("FPH_WRITELOG_CACHE"):
        return build_plugin(cache_dir=plugin_cache_dir())
    out = plugin_file()
    if out.exists():
        return out
    others = sorted(p.name for p in PLUGIN_BUILD_DIR.glob("tcg_writelog-*.so"))
    state = (
        f"stale ({', '.join(others)} {'was' if len(others) == 1 else 'were'} built from another "
        f"{PLUGIN_SOURCE.name})"
        if others
        else "not built"
    )
    raise PluginNotBuiltError(
        f"the TCG write-log plugin is {state}: expected {out}; run scripts/setup "
        "(or python -m fph.writelog.build), or set FPH_WRITELOG_CACHE=<dir> to build on demand"
    )


class _Helpers:
    """ctypes view of the plugin's fph_wlog_* functions."""

    def __init__(self, so: Path) -> None:
        try:
            lib = ctypes.CDLL(str(so), mode=os.RTLD_NOW | os.RTLD_LOCAL)
        except OSError as e:
            raise PluginBuildError(f"cannot load {so} into fph: {e}; delete it to force a rebuild") from e
        self.lib = lib
        self.harvest = lib.fph_wlog_harvest
        self.harvest.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        self.harvest.restype = ctypes.c_size_t
        self.mark_pages = lib.fph_wlog_mark_pages
        self.mark_pages.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        self.mark_pages.restype = None
        self.LOOKUP = ctypes.CFUNCTYPE(
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_uint64,
            ctypes.POINTER(ctypes.c_uint64),
            ctypes.POINTER(ctypes.c_int),
        )
        self.record_store = lib.fph_wlog_record_store
        self.record_store.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, self.LOOKUP,
                                      ctypes.c_void_p]  # fmt: skip
        self.record_store.restype = ctypes.c_int
        self.cas = lib.fph_wlog_cas
        self.cas.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64]
        self.cas.restype = ctypes.c_int
        self.check_file = lib.fph_wlog_check_file
        self.check_file.argtypes = [ctypes.c_char_p, ctypes.c_uint64, ctypes.c_char_p, ctypes.c_size_t]
        self.check_file.restype = ctypes.c_int


@functools.cache
def helpers(so: Path | None = None) -> _Helpers:
    """The C helpers (atomic harvest, test writers) from the built plugin."""
    return _Helpers(so or plugin_path())


def harvest_words(log: Words, out: Words | None = None, *, c: _Helpers | None = None) -> Words:
    """Atomic fetch-and-clear of every word of ``log`` (a uint64 array, e.g. a view of a mapped log
    file) through the C helper: returns the words taken; ``log`` is zero where nothing new was set."""
    if log.dtype != np.uint64 or log.ndim != 1 or not log.flags.c_contiguous:
        raise WriteLogStateError("harvest_words needs a contiguous 1-d uint64 array")
    if out is None:
        out = np.empty_like(log)
    (c or helpers()).harvest(log.ctypes.data, out.ctypes.data, log.shape[0])
    return out


def span_bytes(layout: RamLayout) -> int:
    """The plugin's ``ram=`` argument: the end of the highest RAM range (not the RAM size)."""
    return layout.span_pages << PAGE_SHIFT


def _refuse_if_attached(path: Path) -> None:
    """Replacing a log a running QEMU has mapped would leave it logging into the old, unlinked file."""
    try:
        with open(path, "rb") as f:
            old = LogHeader.parse(f.read(HEADER_SIZE))
    except (FileNotFoundError, WriteLogFormatError):
        return
    if old.magic != MAGIC or old.attach_count == 0 or old.attach_pid <= 0:
        return
    try:
        os.kill(old.attach_pid, 0)
    except ProcessLookupError:
        return
    except PermissionError:
        pass
    raise WriteLogStateError(
        f"{path} is attached to running process {old.attach_pid} (a QEMU with the write-log plugin): "
        "replacing it would lose that QEMU's writes; open it with create=False, or stop that QEMU "
        "(or delete the file if the pid was reused)"
    )


def create_log_file(path: Path, layout: RamLayout) -> LogHeader:
    """Create (or replace) a zeroed log file for ``layout``; QEMU's plugin then validates and uses it."""
    _refuse_if_attached(path)
    header = LogHeader.new(span_bytes(layout))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(header.pack())
        f.truncate(header.file_size)
    os.replace(tmp, path)
    return header


# ---------------------------------------------------------------------------------------------- the log


class TcgWriteLog(WriteLog):
    """Consumer of the plugin's log file for one guest.

    ``log_path``: the shared log file (created unless ``create=False``, then validated); ``layout``: the
    guest's RAM layout (bitmap = its GPA span); ``plugin``: a built .so (default: plugin_path(), the one
    scripts/setup built); ``arm_timeout_s``: how long ``start()`` waits for the plugin to arm.
    """

    kind = "tcg-plugin"
    atomic = True
    arms_on_guest_code = True

    def __init__(
        self,
        log_path: str | Path,
        layout: RamLayout,
        *,
        plugin: Path | None = None,
        create: bool = True,
        arm_timeout_s: float = ARM_TIMEOUT_S,
    ) -> None:
        super().__init__(layout)
        self.path = Path(log_path)
        self.plugin = plugin or plugin_path()
        self._c = helpers(self.plugin)
        if create:
            create_log_file(self.path, layout)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(self._fd).st_size
            header = LogHeader.parse(os.pread(self._fd, HEADER_SIZE, 0))
            header.validate(nbits=self.nbits, file_size=size, what=str(self.path))
            self._mm: mmap.mmap | None = mmap.mmap(self._fd, size, mmap.MAP_SHARED)
        except BaseException:
            os.close(self._fd)
            raise
        self._bits: Words | None = np.frombuffer(
            self._mm, dtype=np.uint64, count=self.nwords, offset=HEADER_SIZE
        )
        self._header_words: Words | None = np.frombuffer(self._mm, dtype=np.uint64, count=HEADER_SIZE // 8)
        self._failures_seen = 0
        self.arm_timeout_s = arm_timeout_s
        self._arm_request: int | None = None
        self.arm_ms: float | None = None
        """From the arming request to the plugin putting it in effect (its own clock, not when start()
        looked)."""
        self._arm_asked_ns = 0

    @property
    def plugin_arg(self) -> str:
        """The ``-plugin`` value for QEMU (VMConfig.plugins): ``<so>,log=<file>,ram=<GPA span bytes>``."""
        for p in (self.plugin, self.path):
            if "," in str(p):
                raise WriteLogStateError(f"{p}: QEMU's -plugin option cannot carry a path with a comma")
        return f"{self.plugin},log={self.path},ram={span_bytes(self.layout)}"

    def header(self) -> LogHeader:
        """A fresh read of the header (counters written by the plugin)."""
        if self._mm is None:
            raise WriteLogStateError("tcg write log is closed")
        return LogHeader.parse(self._mm[: struct.calcsize(HEADER_FORMAT)])

    def _follow(self, current: int, on: bool) -> int | None:
        """Replace the arm request ``current`` with the next one (seq + 1, ``on``) by compare-and-swap:
        the new request, or None if the request was no longer ``current``."""
        value = (((current >> 1) + 1) << 1) | int(on)
        return value if self._c.cas(self._arm_request_address(), current, value) else None

    def _request(self, on: bool) -> int:
        """Write the next arm request; returns it."""
        value = self._follow(self.header().arm_request, on)
        if value is None:
            raise WriteLogStateError(f"{self.path}: another process changed the arm request meanwhile")
        return value

    def disarm_any(self) -> bool:
        """Ask the plugin to disarm whatever request is in effect, not only this consumer's: for a
        restarted daemon, whose dead predecessor may have left a migration's arming behind (the guest
        would pay the store callbacks until its next migration). True if a request was withdrawn."""
        self._check_open()
        while (current := self.header().arm_request) & 1:
            if self._follow(current, False) is not None:
                return True
        return False

    def _arm_request_address(self) -> int:
        if self._header_words is None:
            raise WriteLogStateError("tcg write log is closed")
        return int(self._header_words.ctypes.data) + _OFF_ARM_REQUEST

    def _prepare(self) -> None:
        if self._arm_request is None:
            self._check_attached()
            self._arm_asked_ns = time.monotonic_ns()  # CLOCK_MONOTONIC, the plugin's clock
            self._arm_request = self._request(True)

    def _check_attached(self) -> None:
        if self.header().attach_count == 0:
            raise PluginNotAttachedError(
                f"no QEMU plugin attached to {self.path}: start QEMU with -plugin {self.plugin_arg}"
            )

    def _start(self) -> None:
        self._prepare()
        deadline = self._arm_asked_ns / 1e9 + self.arm_timeout_s
        while (h := self.header()).arm_state != self._arm_request:
            if time.monotonic() > deadline:
                raise WriteLogArmTimeoutError(
                    f"{self.path}: the write-log plugin of QEMU pid {h.attach_pid} did not arm within "
                    f"{self.arm_timeout_s:g} s: no vCPU ran guest code since fph asked (is the guest "
                    "paused?). Nothing was migrated; resume the guest and retry"
                )
            time.sleep(0.001)
        self.arm_ms = max(0, h.arm_state_ns - self._arm_asked_ns) / 1e6
        self._failures_seen = h.lookup_failures
        assert self._bits is not None
        harvest_words(self._bits, c=self._c)  # writes before start() are round 0's business

    def _harvest(self, vcpus_stopped: bool) -> tuple[Words, float]:
        assert self._bits is not None and self._mm is not None
        words = harvest_words(self._bits, c=self._c)
        # Read the failure counter after the exchange: a failed lookup counted later is caught next time.
        h = self.header()
        struct.pack_into("<Q", self._mm, _OFF_HARVESTS, h.harvests + 1)
        if h.lookup_failures != self._failures_seen:
            log.warning(
                "%s: %d store(s) whose page the plugin could not look up since the last harvest; "
                "reporting every page dirty",
                self.path,
                h.lookup_failures - self._failures_seen,
            )
            self._failures_seen = h.lookup_failures
            self.stats.conservative_harvests += 1
            words = full_words(self.nbits)
        return words, 0.0

    def _close(self) -> None:
        if self._arm_request is not None and self._header_words is not None:
            # Disarm only our own request: a later consumer of the same log may have armed it since.
            self._follow(self._arm_request, False)
        self._bits = None
        self._header_words = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError as e:  # a caller still holds a view of the mapping
                raise WriteLogError(f"cannot unmap {self.path}: {e}") from e
            self._mm = None
        os.close(self._fd)

    def _details(self) -> dict[str, Any]:
        if self._mm is None:
            return {"log": str(self.path)}
        h = self.header()
        return {
            "log": str(self.path),
            "plugin": str(self.plugin),
            "attach_pid": h.attach_pid,
            "attach_count": h.attach_count,
            "stores": h.stores,
            "io_skipped": h.io_skipped,
            "straddles": h.straddles,
            "lookup_failures": h.lookup_failures,
            "out_of_range": h.out_of_range,
            "last_out_of_range_gpa": h.last_out_of_range_gpa,
            "armed": h.armed,
            "arm_changes": h.arm_changes,
            "arm_ms": None if self.arm_ms is None else round(self.arm_ms, 1),
        }


def check_log_file(path: Path, ram_span: int, plugin: Path | None = None) -> None:
    """Validate a log file with the plugin's own C rules (what QEMU would say at start-up)."""
    err = ctypes.create_string_buffer(512)
    if helpers(plugin).check_file(str(path).encode(), ram_span, err, len(err)) != 0:
        raise WriteLogFormatError(err.value.decode(errors="replace"))
