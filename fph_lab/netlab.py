"""Two hosts on one machine: two network namespaces joined by a veth pair shaped with ``tbf``.

``with TwoHostLink(LinkConfig(rate_bits_per_s=200_000_000)) as link:`` gives a source namespace
(``link.src_ns``, address ``link.src_ip``) and a destination namespace (``link.dst_ns``, ``link.dst_ip``);
run programs in them with :meth:`TwoHostLink.popen` (or prefix an argv with :meth:`TwoHostLink.exec_argv`),
cut the link with :meth:`TwoHostLink.set_link` and read what crossed it with :meth:`TwoHostLink.wire_bytes`.

Needs root, ``ip`` and ``tc`` (iproute2), ``nsenter`` (util-linux) and the ``tbf`` qdisc. A process run in a
namespace (:func:`netns_argv`) sees only its namespace's network; files, Unix sockets and cgroups are shared,
so keep each side's paths apart.
:meth:`TwoHostLink.close` ends only the processes this object started (each by its PID: SIGTERM, then
SIGKILL) and deletes both namespaces (the veth pair goes with them). It runs on every exit path of a
``with`` block, after a setup step that failed half-way, and at interpreter exit (``atexit``) for a link
never closed. Processes started otherwise (e.g. a QEMU of ``fph_lab.vm`` with ``VMConfig(netns=...)``) keep
their namespace alive until they exit: stop them first.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Literal

from fph_lab.errors import LabError

Side = Literal["src", "dst"]
NETNS_DIR = "/run/netns"
_COUNTER = itertools.count()
_LIVE: dict[int, TwoHostLink] = {}


class NetLabError(LabError):
    """The two-host link could not be set up or used (not root, iproute2 missing, a command failed)."""


def netns_argv(ns: str, argv: list[str]) -> list[str]:
    """``argv`` run in the named network namespace ``ns`` and nothing else: ``nsenter --net`` execs it (the
    PID stays the program's). ``ip netns exec`` also gives the program a mount namespace with a fresh
    ``/sys``, without the host's cgroup mounts: a daemon run that way found no cgroup ``cpu`` controller for
    its vCPU throttle, so a guest that out-dirtied the link never converged (twohost_bench, churn)."""
    return ["nsenter", f"--net={NETNS_DIR}/{ns}", "--", *argv]


@dataclass(frozen=True)
class LinkConfig:
    """The link between the two namespaces. ``rate_bits_per_s``: the ``tbf`` cap (None = unshaped, no qdisc
    added); ``burst_bytes``: tbf's bucket; ``latency_ms``: tbf's queue bound (how long a packet may wait,
    not an added delay); ``shape_both_directions``: shape the destination's end too (else only the source's,
    the direction pages travel). Addresses are on one ``/prefix_len`` subnet."""

    rate_bits_per_s: int | None = 1_000_000_000
    burst_bytes: int = 256 * 1024
    latency_ms: int = 50
    shape_both_directions: bool = True
    src_ip: str = "10.9.0.1"
    dst_ip: str = "10.9.0.2"
    prefix_len: int = 24

    def __post_init__(self) -> None:
        if self.rate_bits_per_s is not None and self.rate_bits_per_s <= 0:
            raise ValueError(
                f"rate_bits_per_s must be positive or None (unshaped), not {self.rate_bits_per_s}"
            )
        if self.burst_bytes <= 0 or self.latency_ms <= 0:
            raise ValueError("burst_bytes and latency_ms must be positive")
        src = ipaddress.IPv4Interface(f"{self.src_ip}/{self.prefix_len}")
        dst = ipaddress.IPv4Interface(f"{self.dst_ip}/{self.prefix_len}")
        if src.network != dst.network or src.ip == dst.ip:
            raise ValueError(f"src_ip and dst_ip must be two addresses of one /{self.prefix_len} subnet")


def leftover_namespaces(prefix: str = "fph-") -> list[str]:
    """Named network namespaces whose name starts with ``prefix`` (tests assert theirs are gone)."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def tcp_counters(proc_net: str) -> dict[str, int]:
    """The ``Tcp:`` and ``TcpExt:`` counters of ``/proc/net/snmp`` and ``/proc/net/netstat`` text (each
    section is a line of names followed by a line of values)."""
    counters: dict[str, int] = {}
    for head, values in itertools.pairwise(proc_net.splitlines()):
        names, nums = head.split(), values.split()
        section = names[:1] in (["Tcp:"], ["TcpExt:"]) and nums[:1] == names[:1] and len(nums) == len(names)
        if section and all(v.lstrip("-").isdigit() for v in nums[1:]):
            counters.update((k, int(v)) for k, v in zip(names[1:], nums[1:], strict=True))
    return counters


def _check_host() -> None:
    if os.geteuid() != 0:
        raise NetLabError(
            "the two-host lab needs root (network namespaces, veth and tc need CAP_NET_ADMIN): "
            "run as root, e.g. with sudo"
        )
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise NetLabError(
            f"{' and '.join(missing)} not found on PATH: install iproute2 (apt-get install iproute2)"
        )


def _run(argv: list[str], timeout: float = 10.0) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetLabError(f"`{' '.join(argv)}` failed: {e}") from e
    if res.returncode != 0:
        raise NetLabError(f"`{' '.join(argv)}` failed (exit {res.returncode}): {res.stderr.strip()}")
    return res.stdout


def _close_all_at_exit() -> None:
    for link in list(_LIVE.values()):
        link.close()


atexit.register(_close_all_at_exit)


class TwoHostLink:
    """Two namespaces ``fph-src-<pid>-<n>`` / ``fph-dst-<pid>-<n>`` joined by a veth pair, set up by the
    constructor (a failed step undoes the earlier ones and raises :class:`NetLabError`)."""

    def __init__(self, config: LinkConfig | None = None) -> None:
        self.config = config or LinkConfig()
        pid, n = os.getpid(), next(_COUNTER)
        self._owner_pid = pid
        self.src_ns = f"fph-src-{pid}-{n}"
        self.dst_ns = f"fph-dst-{pid}-{n}"
        # veth names: at most 15 characters (IFNAMSIZ - 1); pid_max is at most 2**22 (6 hex digits)
        tag = f"{pid:x}-{n:x}"
        self._dev: dict[Side, str] = {"src": f"fv{tag}s", "dst": f"fv{tag}d"}
        if len(self._dev["src"]) > 15:
            raise NetLabError(f"veth name {self._dev['src']!r} is too long (more than 15 characters)")
        self._procs: list[subprocess.Popen[Any]] = []
        self._made: list[str] = []  # namespaces this object created (deleted by close)
        self._closed = False
        _check_host()
        _LIVE[id(self)] = self
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        c = self.config
        for ns in (self.src_ns, self.dst_ns):
            _run(["ip", "netns", "add", ns])
            self._made.append(ns)
        s, d = self._dev["src"], self._dev["dst"]
        # Created inside the namespaces at once: nothing appears in (or is left behind in) the host's.
        veth = ["veth", "peer", "name", d, "netns", self.dst_ns]
        _run(["ip", "link", "add", s, "netns", self.src_ns, "type", *veth])
        for ns, dev, ip in ((self.src_ns, s, c.src_ip), (self.dst_ns, d, c.dst_ip)):
            _run(["ip", "-n", ns, "addr", "add", f"{ip}/{c.prefix_len}", "dev", dev])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
        if c.rate_bits_per_s is not None:
            sides: tuple[Side, ...] = ("src", "dst") if c.shape_both_directions else ("src",)
            for side in sides:
                self._shape(side, c.rate_bits_per_s)

    def _shape(self, side: Side, rate_bits_per_s: int) -> None:
        c = self.config
        tbf = [
            "tbf",
            "rate",
            f"{rate_bits_per_s}bit",
            "burst",
            f"{c.burst_bytes}b",
            "latency",
            f"{c.latency_ms}ms",
        ]
        try:
            _run(["tc", "-n", self.ns(side), "qdisc", "replace", "dev", self._dev[side], "root", *tbf])
        except NetLabError as e:
            raise NetLabError(f"{e} (is the kernel's tbf qdisc available? modprobe sch_tbf)") from None

    # -- names

    @property
    def src_ip(self) -> str:
        return self.config.src_ip

    @property
    def dst_ip(self) -> str:
        return self.config.dst_ip

    def ns(self, side: Side) -> str:
        """The namespace of ``side``."""
        return self.src_ns if side == "src" else self.dst_ns

    def device(self, side: Side) -> str:
        """The veth end in ``side``'s namespace."""
        return self._dev[side]

    @property
    def pids(self) -> list[int]:
        """PIDs of the processes :meth:`popen` started (running or not)."""
        return [p.pid for p in self._procs]

    # -- use

    def exec_argv(self, ns: str, argv: list[str]) -> list[str]:
        """``argv`` run in namespace ``ns`` (:func:`netns_argv`)."""
        if ns not in (self.src_ns, self.dst_ns):
            raise ValueError(f"{ns!r} is not one of this link's namespaces ({self.src_ns}, {self.dst_ns})")
        return netns_argv(ns, argv)

    def popen(self, ns: str, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in namespace ``ns`` (``kw``: :class:`subprocess.Popen`'s); :meth:`close` ends it."""
        if self._closed:
            raise NetLabError(f"link {self.src_ns}/{self.dst_ns} is closed")
        proc: subprocess.Popen[Any] = subprocess.Popen(self.exec_argv(ns, argv), **kw)
        self._procs.append(proc)
        return proc

    def set_link(self, up: bool) -> None:
        """Bring both veth ends up or down (a cable pulled: routes over it go, established TCP stalls)."""
        state = "up" if up else "down"
        for side in ("src", "dst"):
            _run(["ip", "-n", self.ns(side), "link", "set", self._dev[side], state])

    def wire_bytes(self, side: Side, direction: Literal["tx", "rx"] = "tx") -> int:
        """Bytes the veth end of ``side`` has sent (``tx``) or received (``rx``) since setup."""
        out = _run(["ip", "-n", self.ns(side), "-s", "-j", "link", "show", "dev", self._dev[side]])
        return int(json.loads(out)[0]["stats64"][direction]["bytes"])

    def tcp_counters(self, side: Side) -> dict[str, int]:
        """``side``'s TCP counters (``/proc/net/snmp`` Tcp and ``/proc/net/netstat`` TcpExt, read inside its
        namespace), e.g. ``RetransSegs``, ``TCPTimeouts``, ``TCPLossProbes``: why a stream's tail was late."""
        files = ["cat", "/proc/net/snmp", "/proc/net/netstat"]
        return tcp_counters(_run(self.exec_argv(self.ns(side), files)))

    # -- teardown

    def close(self, timeout: float = 3.0) -> None:
        """End the processes this link started (SIGTERM, then SIGKILL after ``timeout``, each by its PID)
        and delete both namespaces. Idempotent; a namespace that could not be deleted is retried by the next
        call, and the errors are raised after every step was tried."""
        if os.getpid() != self._owner_pid:  # a forked child does not own the namespaces
            return
        self._closed = True
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout)
        errors, remaining = [], []
        for ns in reversed(self._made):
            try:
                _run(["ip", "netns", "del", ns])
            except NetLabError as e:
                errors.append(str(e))
                remaining.append(ns)
        self._made = remaining
        if not remaining:
            _LIVE.pop(id(self), None)
        if errors:
            raise NetLabError("; ".join(errors))

    def __enter__(self) -> TwoHostLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
