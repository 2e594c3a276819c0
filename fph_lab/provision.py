"""Provision the QEMU lab: QEMU 11.1, a Debian guest kernel, a busybox initramfs with fph's guest programs.

Every claim fph makes is measured on real guests under real QEMU; this module makes that possible from a
fresh Debian machine, idempotently: each step writes a stamp with the inputs it was built from, so a second
run only checks stamps. ``python -m fph_lab.provision [--refresh] [--guest-kernel
{host,bookworm,trixie,testing}]``; cache in ``$FPH_LAB_DIR`` (default ``/var/cache/fph-lab``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fph_lab.errors import LabError

DEFAULT_LAB_DIR = Path("/var/cache/fph-lab")
MIRROR = "http://deb.debian.org/debian"
# One QEMU for every mode: 11.1.x (forky/testing), or a host QEMU >= 10.2 with the generic vhost-user device.
QEMU_ACCEPT = re.compile(r"^11\.1\.\d+$")
HOST_QEMU_MIN = (10, 2)
VHOST_USER_DEVICE = "vhost-user-test-device-pci"
GUEST_MODULES = ("virtio_pci", "virtio_balloon", "virtio_net", "virtio_blk")
GUEST_PROGRAMS = ("fill", "memhog", "hold", "dirty", "meminfo")
HOST_PACKAGES = (
    "mmdebstrap",
    "busybox-static",
    "cpio",
    "kmod",
    "xz-utils",
    "zstd",
    "gzip",
    "gcc",
    "libc6-dev",
    "binutils",
)
GUEST_SRC = Path(__file__).with_name("guest")
_MANIFEST = "lab.json"


def lab_dir() -> Path:
    """The lab cache directory: ``$FPH_LAB_DIR`` or ``/var/cache/fph-lab``."""
    return Path(os.environ.get("FPH_LAB_DIR") or DEFAULT_LAB_DIR)


@dataclass(frozen=True)
class QemuInstall:
    """How to run the lab's QEMU.

    ``kind="chroot"``: the chroot's binary is run on the host through the chroot's own dynamic loader, with
    its libraries, modules (``QEMU_MODULE_DIR``) and firmware (``-L``). No mounts and no path translation:
    every path (sockets, RAM files, plugins) is a host path.
    """

    kind: str
    version: str
    package_version: str
    binary: str
    argv_prefix: tuple[str, ...]
    data_dirs: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    root: str | None = None

    def command(self, *args: str) -> list[str]:
        """The argv that runs this QEMU with ``args`` (firmware dirs already added)."""
        out = [*self.argv_prefix, self.binary]
        for d in self.data_dirs:
            out += ["-L", d]
        return out + list(args)

    def environ(self) -> dict[str, str]:
        """The environment to run QEMU in: the caller's plus the module directory."""
        return {**os.environ, **self.env}

    @property
    def plugin_header_dir(self) -> str | None:
        """Directory holding ``qemu/qemu-plugin.h`` for this QEMU, when its package ships one."""
        base = Path(self.root or "/") / "usr/include"
        return str(base) if (base / "qemu/qemu-plugin.h").exists() else None


@dataclass(frozen=True)
class Lab:
    """The provisioned artifacts, as host paths. Load with :meth:`Lab.load` once :func:`provision` ran."""

    root: str
    qemu: QemuInstall
    kernel: str
    kernel_version: str
    kernel_package: str
    initramfs: str
    guest_programs: dict[str, str]
    guest_sources: str
    kernel_choice: str = "host"
    """Which ``--guest-kernel`` this lab boots: ``host``, ``bookworm``, ``trixie`` or ``testing``."""
    kernel_packages: tuple[str, ...] = ()
    """The Debian packages the kernel came from, as ``name=version``."""

    @classmethod
    def load(cls, root: Path | None = None) -> Lab:
        """Read the manifest of a provisioned lab; fail clearly when there is none."""
        root = root or lab_dir()
        path = root / _MANIFEST
        if not path.exists():
            raise LabError(
                f"no provisioned lab in {root}: run `python -m fph_lab.provision` (or scripts/setup --lab)"
            )
        data = json.loads(path.read_text())
        data["qemu"] = QemuInstall(
            **{
                **data["qemu"],
                "argv_prefix": tuple(data["qemu"]["argv_prefix"]),
                "data_dirs": tuple(data["qemu"]["data_dirs"]),
            }
        )
        data["kernel_packages"] = tuple(data.get("kernel_packages", ()))
        lab = cls(**data)
        for p in (lab.kernel, lab.initramfs, lab.qemu.binary):
            if not Path(p).exists():
                raise LabError(f"lab artifact missing: {p}; run `python -m fph_lab.provision --refresh`")
        return lab


Log = Callable[[str], None]


def _run(
    cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None, what: str | None = None
) -> str:
    """Run a command, return stdout; on failure raise LabError with its stderr (the actual reason)."""
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise LabError(f"{what or cmd[0]}: {e}") from e
    if p.returncode != 0:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-15:])
        raise LabError(f"{what or ' '.join(cmd)} failed (exit {p.returncode}):\n{tail}")
    return p.stdout


@contextlib.contextmanager
def _step(name: str, log: Log) -> Iterator[None]:
    t0 = time.monotonic()
    yield
    log(f"[provision] {name}: {time.monotonic() - t0:.1f} s")


@contextlib.contextmanager
def _cached_note(name: str, log: Log) -> Iterator[Log]:
    """Yield a logger; if the step logged nothing (its stamp was valid), say so with the check's time."""
    said: list[str] = []

    def clog(msg: str) -> None:
        said.append(msg)
        log(msg)

    t0 = time.monotonic()
    yield clog
    if not said:
        log(f"[provision] {name}: cached ({time.monotonic() - t0:.2f} s)")


def _stamp_ok(stamp: Path, key: dict[str, object]) -> bool:
    try:
        return bool(json.loads(stamp.read_text()) == key)
    except (OSError, ValueError):
        return False


def _write_stamp(stamp: Path, key: dict[str, object]) -> None:
    stamp.parent.mkdir(parents=True, exist_ok=True)
    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(json.dumps(key, indent=1, sort_keys=True))
    tmp.replace(stamp)


def _sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


# host tools


def _missing_host_packages() -> list[str]:
    missing = []
    for pkg in HOST_PACKAGES:
        p = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True, check=False
        )
        if "install ok installed" not in p.stdout:
            missing.append(pkg)
    return missing


def ensure_host_tools(log: Log) -> None:
    """Install the host packages provisioning needs (mmdebstrap, busybox-static, gcc, ...) when missing."""
    missing = _missing_host_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        raise LabError(f"missing host packages {missing}; install them as root (apt-get install ...)")
    log(f"[provision] installing host packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "update", "-qq"], env=env, what="apt-get update")
    _run(
        [
            "apt-get",
            "-o",
            "DPkg::Lock::Timeout=600",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            *missing,
        ],
        env=env,
        what="apt-get install",
    )


# ---------------------------------------------------------------------------------------------------- QEMU


def _qemu_version(cmd: list[str], env: dict[str, str]) -> str:
    out = _run([*cmd, "--version"], env=env, what="qemu --version")
    m = re.search(r"version (\d+\.\d+\.\d+)", out)
    if not m:
        raise LabError(f"cannot parse QEMU version from: {out.strip()!r}")
    return m.group(1)


def _check_device(q: QemuInstall) -> None:
    out = _run(q.command("-machine", "none", "-device", "help"), env=q.environ(), what="qemu -device help")
    if f'"{VHOST_USER_DEVICE}"' not in out:
        raise LabError(f"QEMU {q.version} at {q.binary} has no {VHOST_USER_DEVICE}; fph needs QEMU >= 10.2")


def _host_qemu() -> QemuInstall | None:
    """A host QEMU >= 10.2 with the generic vhost-user device, if one is installed."""
    binary = shutil.which("qemu-system-x86_64")
    if not binary:
        return None
    try:
        version = _qemu_version([binary], dict(os.environ))
    except LabError:
        return None
    if tuple(int(x) for x in version.split(".")[:2]) < HOST_QEMU_MIN:
        return None
    q = QemuInstall(
        kind="host", version=version, package_version=version, binary=binary, argv_prefix=(), data_dirs=()
    )
    try:
        _check_device(q)
    except LabError:
        return None
    return q


def _dpkg_version(root: Path, package: str) -> str:
    text = (root / "var/lib/dpkg/status").read_text()
    for block in text.split("\n\n"):
        if re.search(rf"^Package: {re.escape(package)}$", block, re.M):
            m = re.search(r"^Version: (\S+)$", block, re.M)
            if m:
                return m.group(1)
    raise LabError(f"{package} is not installed in {root}")


HOST_MODULE_DIR = "/usr/lib/x86_64-linux-gnu/qemu"
# QEMU looks for a module in $QEMU_MODULE_DIR, then in its built-in directory, which on the host may hold
# another QEMU's modules (Debian 12's 7.2): loading one aborts QEMU ("Only modules from the same build can
# be loaded", then an assertion), e.g. for `-device help`. So QEMU runs in a private mount namespace where
# the chroot's module directory is bound over the built-in one; the mount dies with the process and is never
# visible on the host. Needs root; without it the prefix is left out.
_MODULE_SHIELD = (
    "unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
    f'mount --bind "$QEMU_MODULE_DIR" {HOST_MODULE_DIR} 2>/dev/null; exec "$@"', "sh",
)  # fmt: skip


def chroot_qemu(chroot: Path) -> QemuInstall:
    """Describe the chroot's QEMU, run through the chroot's dynamic loader (no chroot(2), no host mounts)."""
    libdirs = [chroot / "lib/x86_64-linux-gnu", chroot / "usr/lib/x86_64-linux-gnu"]
    loader = chroot / "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    shield = _MODULE_SHIELD if os.geteuid() == 0 and shutil.which("unshare") else ()
    pkg = _dpkg_version(chroot, "qemu-system-x86")
    upstream = re.sub(r"^\d+:", "", pkg).split("+")[0].split("-")[0]
    return QemuInstall(
        kind="chroot",
        version=upstream,
        package_version=pkg,
        binary=str(chroot / "usr/bin/qemu-system-x86_64"),
        argv_prefix=(*shield, str(loader), "--library-path", ":".join(map(str, libdirs))),
        data_dirs=(str(chroot / "usr/share/qemu"), str(chroot / "usr/share/seabios")),
        env={"QEMU_MODULE_DIR": str(chroot / "usr/lib/x86_64-linux-gnu/qemu")},
        root=str(chroot),
    )


@dataclass(frozen=True)
class QemuSource:
    """Where a QEMU 11.1.x comes from: an mmdebstrap suite, its apt sources and the package to include."""

    name: str
    suite: str
    sources: tuple[str, ...]
    include: str
    aptopts: tuple[str, ...] = ()


# Tried in order until one gives 11.1.x (testing moves on; trixie-backports had 11.1.3 in late 2026).
QEMU_SOURCES = (
    QemuSource("testing", "testing", (f"deb {MIRROR} testing main",), "qemu-system-x86"),
    QemuSource(
        "trixie-backports",
        "trixie",
        (f"deb {MIRROR} trixie main", f"deb {MIRROR} trixie-backports main"),
        "qemu-system-x86",
        # Backports are pinned low; raise them so QEMU and its own backported dependencies come from there.
        ('APT::Default-Release "trixie-backports"',),
    ),
)


def _source_stamp(src: QemuSource) -> dict[str, object]:
    """The stamp of a QEMU source as it reads back from JSON (tuples become lists)."""
    return dict(json.loads(json.dumps(asdict(src))))


def _mmdebstrap(src: QemuSource, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    _run(
        [
            "mmdebstrap",
            "--quiet",
            "--variant=apt",
            f"--include={src.include}",
            '--aptopt=APT::Install-Recommends "false"',
            # The testing/sid Release files on the mirror were expired in late 2026.
            '--aptopt=Acquire::Check-Valid-Until "false"',
            *(f"--aptopt={o}" for o in src.aptopts),
            src.suite,
            str(target),
            *src.sources,
        ],
        what=f"mmdebstrap ({src.name})",
    )


def ensure_qemu(root: Path, refresh: bool, log: Log) -> QemuInstall:
    """QEMU 11.1.x from Debian in an mmdebstrap chroot (or a host QEMU >= 10.2), checked.

    ``FPH_QEMU=chroot`` ignores a host QEMU; ``FPH_QEMU_SOURCE=<name>`` forces one of QEMU_SOURCES."""
    if os.environ.get("FPH_QEMU", "auto") != "chroot":
        host = _host_qemu()
        if host is not None:
            log(f"[provision] using host QEMU {host.version} at {host.binary}")
            return host
    chroot = root / "qemu" / "chroot"
    stamp = root / "stamps" / "qemu.json"
    forced = os.environ.get("FPH_QEMU_SOURCE")
    sources = [s for s in QEMU_SOURCES if forced in (None, s.name)]
    if not sources:
        raise LabError(f"FPH_QEMU_SOURCE={forced!r}: not one of {[s.name for s in QEMU_SOURCES]}")
    stamped = json.loads(stamp.read_text()) if stamp.exists() else {}
    legacy = {"suite": "testing", "mirror": MIRROR, "include": "qemu-system-x86"}  # first stamp format
    matches = any(stamped == _source_stamp(s) for s in sources) or (
        stamped == legacy and sources[0].name == "testing"
    )
    valid = not refresh and chroot.exists() and matches
    if not valid:
        seen = []
        for src in sources:
            with _step(f"QEMU chroot (mmdebstrap {src.name}, {src.include})", log):
                tmp = root / "qemu" / "chroot.tmp"
                _mmdebstrap(src, tmp)
                got = _dpkg_version(tmp, "qemu-system-x86")
            if QEMU_ACCEPT.match(re.sub(r"^\d+:", "", got).split("+")[0].split("-")[0]):
                shutil.rmtree(chroot, ignore_errors=True)
                tmp.rename(chroot)
                _write_stamp(stamp, _source_stamp(src))
                break
            seen.append(f"{src.name}: {got}")
            log(f"[provision] {src.name} has QEMU {got}, not 11.1.x; trying the next source")
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise LabError(
                f"no QEMU 11.1.x found ({'; '.join(seen)}); fph's lab is pinned to 11.1.x. Add a source "
                "to QEMU_SOURCES or, after re-validating fph on the new QEMU, update QEMU_ACCEPT in "
                "fph_lab/provision.py"
            )
    q = chroot_qemu(chroot)
    if not QEMU_ACCEPT.match(q.version):
        raise LabError(f"QEMU in {chroot} is {q.package_version}, not 11.1.x: run with --refresh")
    actual = _qemu_version(q.command(), q.environ())
    if actual != q.version:
        raise LabError(f"QEMU binary reports {actual}, package says {q.package_version}")
    check_stamp = root / "stamps" / "qemu-check.json"
    ckey: dict[str, object] = {
        "package": q.package_version,
        "device": VHOST_USER_DEVICE,
        "argv_prefix": list(q.argv_prefix),
    }
    if refresh or not _stamp_ok(check_stamp, ckey):
        _check_device(q)
        _write_stamp(check_stamp, ckey)
    return q


# kernel

GUEST_KERNELS = ("host", "bookworm", "trixie", "testing")
"""``--guest-kernel`` choices: ``host`` = the host's own apt (its suite, with whatever updates it has), or a
Debian suite fetched through a private apt configuration (lists in the lab, never the host's)."""
SECURITY_MIRROR = "http://deb.debian.org/debian-security"


def guest_kernel_choice(choice: str | None = None) -> str:
    """The guest kernel to provision: ``choice``, else ``$FPH_GUEST_KERNEL``, else ``host``."""
    c = choice or os.environ.get("FPH_GUEST_KERNEL") or "host"
    if c not in GUEST_KERNELS:
        raise LabError(f"guest kernel {c!r}: choose one of {', '.join(GUEST_KERNELS)} (FPH_GUEST_KERNEL)")
    return c


def kernel_sources(suite: str) -> tuple[str, ...]:
    """apt source lines for a guest kernel suite (stable suites with their updates and security fixes)."""
    if suite == "testing":
        return (f"deb {MIRROR} testing main",)
    return (
        f"deb {MIRROR} {suite} main",
        f"deb {MIRROR} {suite}-updates main",
        f"deb {SECURITY_MIRROR} {suite}-security main",
    )


def _private_apt(adir: Path, suite: str) -> list[str]:
    """apt options that read ``suite`` only, lists and cache under ``adir`` (the host's apt untouched)."""
    for d in ("lists/partial", "cache/archives/partial"):
        (adir / d).mkdir(parents=True, exist_ok=True)
    (adir / "sources.list").write_text("\n".join(kernel_sources(suite)) + "\n")
    opts = {
        "Dir::Etc::sourcelist": adir / "sources.list",
        "Dir::Etc::sourceparts": "-",
        "Dir::Etc::preferences": "/dev/null",
        "Dir::Etc::preferencesparts": "-",
        "Dir::State::Lists": adir / "lists",
        "Dir::State::status": "/dev/null",
        "Dir::Cache": adir / "cache",
        # The testing/sid Release files on the mirror were expired in late 2026.
        "Acquire::Check-Valid-Until": "false",
        "APT::Sandbox::User": "root",
    }
    return [a for k, v in opts.items() for a in ("-o", f"{k}={v}")]


def _apt_depends(apt: list[str], package: str, *, host: bool) -> str:
    def depends() -> str:
        return _run(["apt-cache", *apt, "depends", package], what=f"apt-cache depends {package}")

    try:
        return depends()
    except LabError:
        if not host:
            raise
        _run(["apt-get", "update", "-qq"], what="apt-get update")
        return depends()


def kernel_packages(apt: list[str], *, host: bool = False) -> list[str]:
    """The packages of the suite's current kernel: ``linux-image-<abi>`` and, where the suite splits the
    kernel (Debian testing since 7.x: linux-binary-, linux-modules-, linux-base-<abi>), the parts it depends
    on. Parts are the dependencies whose name carries the same ABI (``7.2.12+deb14-amd64``)."""
    out = _apt_depends(apt, "linux-image-amd64", host=host)
    m = re.search(r"^\s*Depends: linux-image-(\S+-amd64)$", out, re.M)
    if not m:
        raise LabError(f"cannot find the kernel ABI package behind linux-image-amd64:\n{out}")
    abi = m.group(1)
    image = f"linux-image-{abi}"
    deps = re.findall(r"^\s*\|?(?:Pre)?Depends: (\S+)$", _apt_depends(apt, image, host=host), re.M)
    parts = sorted({d for d in deps if d.startswith("linux-") and d.endswith(f"-{abi}") and d != image})
    return [image, *parts]


def _module_dirs(kroot: Path) -> dict[str, Path]:
    """Kernel version -> its real module directory (``lib/modules`` or merged-/usr ``usr/lib/modules``)."""
    out: dict[str, Path] = {}
    for base in ("lib/modules", "usr/lib/modules"):
        d = kroot / base
        if d.is_dir() and not d.is_symlink():
            for v in d.iterdir():
                if v.is_dir() and not v.is_symlink():
                    out.setdefault(v.name, v)
    return out


def _link(link: Path, target: Path) -> None:
    """A relative symlink ``link`` -> ``target`` unless ``link`` exists already."""
    if link.exists() or link.is_symlink():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent))


def normalize_kernel_tree(kroot: Path) -> tuple[str, Path]:
    """Make one extracted kernel tree look the same whatever its suite: modules reachable as both
    ``lib/modules/<kver>`` and ``usr/lib/modules/<kver>`` (bookworm ships the first, trixie and later the
    second, and each host's depmod reads its own), and the image as ``boot/vmlinuz-<kver>`` (testing ships
    ``usr/lib/modules/<kver>/vmlinuz`` only). Returns (kver, vmlinuz)."""
    dirs = _module_dirs(kroot)
    if len(dirs) != 1:
        raise LabError(f"expected one kernel version under {kroot}/(usr/)lib/modules, found {sorted(dirs)}")
    ((kver, moddir),) = dirs.items()
    for base in ("lib/modules", "usr/lib/modules"):
        _link(kroot / base / kver, moddir)
    for name in ("vmlinuz", "config", "System.map"):
        if (moddir / name).exists():
            _link(kroot / "boot" / f"{name}-{kver}", moddir / name)
    vmlinuz = kroot / "boot" / f"vmlinuz-{kver}"
    if not vmlinuz.exists():
        raise LabError(f"no kernel image for {kver} in {kroot} (neither boot/vmlinuz-{kver} nor in {moddir})")
    return kver, vmlinuz


def _kernel_stamp_valid(key: dict[str, object], choice: str) -> bool:
    kver, kroot = str(key.get("version")), Path(str(key.get("kroot")))
    return (
        key.get("choice", "host") == choice
        and Path(str(key.get("vmlinuz"))).exists()
        and (kroot / "lib/modules" / kver / "modules.dep").exists()
    )


def _read_stamp(stamp: Path) -> dict[str, object]:
    try:
        return dict(json.loads(stamp.read_text()))
    except (OSError, ValueError, TypeError):
        return {}


@dataclass(frozen=True)
class GuestKernel:
    """One provisioned guest kernel: the choice it came from, its packages (``name=version``), tree."""

    choice: str
    version: str
    vmlinuz: Path
    kroot: Path
    packages: tuple[str, ...]

    @property
    def package(self) -> str:
        return self.packages[0].split("=")[0] if self.packages else ""


def _kernel_from_stamp(key: dict[str, object], choice: str) -> GuestKernel:
    pkgs = key.get("packages") or [key.get("package", "")]
    assert isinstance(pkgs, list)
    return GuestKernel(
        choice=choice,
        version=str(key["version"]),
        vmlinuz=Path(str(key["vmlinuz"])),
        kroot=Path(str(key["kroot"])),
        packages=tuple(str(p) for p in pkgs),
    )


def ensure_kernel(root: Path, refresh: bool, log: Log, choice: str = "host") -> GuestKernel:
    """Debian's kernel for ``choice`` (see GUEST_KERNELS), downloaded with apt-get download, extracted with
    dpkg-deb, normalized and depmod'ed. Each choice has its own tree and stamp: switching back is cached."""
    stamp = root / "stamps" / f"kernel-{choice}.json"
    legacy = root / "stamps" / "kernel.json"  # before guest-kernel choices: the host's kernel in kernel/root
    if not refresh:
        key = _read_stamp(stamp)
        if key and _kernel_stamp_valid(key, choice):
            return _kernel_from_stamp(key, choice)
        old = _read_stamp(legacy) if choice == "host" else {}
        if old and _kernel_stamp_valid(old, choice):
            k = _kernel_from_stamp(old, choice)
            _write_stamp(stamp, {**old, "choice": choice, "packages": list(k.packages)})
            return k
    kdir = root / "kernel" / choice
    where = "host apt" if choice == "host" else f"{MIRROR} {choice}"
    with _step(f"guest kernel {choice} ({where}: apt-get download, dpkg-deb -x, depmod)", log):
        shutil.rmtree(kdir, ignore_errors=True)
        (kdir / "deb").mkdir(parents=True)
        apt: list[str] = []
        if choice != "host":
            apt = _private_apt(kdir / "apt", choice)
            _run(["apt-get", *apt, "-q", "update"], what=f"apt-get update ({choice} kernel lists)")
        pkgs = kernel_packages(apt, host=choice == "host")
        _run(
            ["apt-get", *apt, "download", *pkgs], cwd=kdir / "deb", what=f"apt-get download {' '.join(pkgs)}"
        )
        debs = sorted((kdir / "deb").glob("*.deb"))
        if len(debs) != len(pkgs):
            raise LabError(f"expected {len(pkgs)} .deb files ({pkgs}) in {kdir / 'deb'}, found {debs}")
        kroot = kdir / "root"
        versions = []
        for deb in debs:
            fields = _run(["dpkg-deb", "-f", str(deb), "Package", "Version"], what="dpkg-deb -f").split("\n")
            versions.append("=".join(f.split(": ", 1)[1] for f in fields[:2]))
            _run(["dpkg-deb", "-x", str(deb), str(kroot)], what=f"dpkg-deb -x {deb.name}")
        kver, vmlinuz = normalize_kernel_tree(kroot)
        _run(["depmod", "-b", str(kroot), kver], what="depmod")
        shutil.rmtree(kdir / "deb")
        shutil.rmtree(kdir / "apt", ignore_errors=True)
        image = next(v for v in versions if v.startswith(f"{pkgs[0]}="))
        packages = [image, *(v for v in versions if v != image)]
        _write_stamp(
            stamp,
            {"choice": choice, "package": pkgs[0], "packages": packages, "version": kver,
             "vmlinuz": str(vmlinuz), "kroot": str(kroot)},
        )  # fmt: skip
    return GuestKernel(choice, kver, vmlinuz, kroot, tuple(packages))


def module_load_order(kroot: Path, kver: str, names: tuple[str, ...] = GUEST_MODULES) -> list[Path]:
    """Module files for ``names`` and their dependencies, dependencies first (from modules.dep)."""
    moddir = kroot / "lib/modules" / kver
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        base = Path(path).name.split(".ko")[0].replace("-", "_")
        by_name[base] = path
    builtin = (moddir / "modules.builtin").read_text() if (moddir / "modules.builtin").exists() else ""
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for d in reversed(deps.get(path, [])):
            visit(d)
        order.append(path)

    for name in names:
        if name in by_name:
            visit(by_name[name])
        elif f"/{name}.ko" not in builtin:
            raise LabError(f"kernel {kver} has no module {name} (neither loadable nor built in)")
    return [moddir / p for p in order]


# guest programs, initramfs


def ensure_guest_programs(root: Path, refresh: bool, log: Log) -> dict[str, Path]:
    """Build the static guest programs from fph_lab/guest/*.c (never committed as binaries)."""
    sources = sorted(GUEST_SRC.glob("*.[ch]"))
    key: dict[str, object] = {"sources": _sha256(*sources), "programs": list(GUEST_PROGRAMS)}
    bindir = root / "guest" / "bin"
    stamp = root / "stamps" / "guest-programs.json"
    out = {name: bindir / name for name in GUEST_PROGRAMS}
    if not refresh and _stamp_ok(stamp, key) and all(p.exists() for p in out.values()):
        return out
    with _step("guest programs (gcc -static)", log):
        bindir.mkdir(parents=True, exist_ok=True)
        for name, path in out.items():
            _run(
                ["gcc", "-static", "-O2", "-Wall", "-Werror", "-o", str(path), str(GUEST_SRC / f"{name}.c")],
                what=f"gcc -static {name}.c",
            )
        _write_stamp(stamp, key)
    return out


def _decompress_module(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    if src.name.endswith(".xz"):
        data = lzma.decompress(data)
    elif src.name.endswith(".zst"):
        data = subprocess.run(["zstd", "-dc", str(src)], capture_output=True, check=True).stdout
    elif src.name.endswith(".gz"):
        data = gzip.decompress(data)
    dst.write_bytes(data)


def ensure_initramfs(
    root: Path,
    refresh: bool,
    log: Log,
    kroot: Path,
    kver: str,
    programs: dict[str, Path],
    choice: str = "host",
) -> Path:
    """busybox-static + /init + decompressed virtio modules + guest programs, as a gzip'ed newc cpio;
    one per guest kernel choice (``guest/initramfs-<choice>.cpio.gz``)."""
    busybox = Path("/bin/busybox")
    modules = module_load_order(kroot, kver)
    key: dict[str, object] = {
        "init": _sha256(GUEST_SRC / "init"),
        "programs": _sha256(*programs.values()),
        "busybox": _sha256(busybox),
        "modules": [str(m) for m in modules],
        "kver": kver,
    }
    out = root / "guest" / f"initramfs-{choice}.cpio.gz"
    stamp = root / "stamps" / f"initramfs-{choice}.json"
    if not refresh and _stamp_ok(stamp, key) and out.exists():
        return out
    with _step(f"initramfs {choice} (busybox, virtio modules, guest programs)", log):
        if not _is_static(busybox):
            raise LabError(
                f"{busybox} is not static: install busybox-static (a dynamic busybox fails as /init)"
            )
        with tempfile.TemporaryDirectory(prefix="fph-initramfs-") as tmp:
            st = Path(tmp)
            for d in ("bin", "sbin", "usr/bin", "proc", "sys", "dev", "tmp", "lib/modules"):
                (st / d).mkdir(parents=True, exist_ok=True)
            shutil.copy2(busybox, st / "bin/busybox")
            shutil.copy2(GUEST_SRC / "init", st / "init")
            (st / "init").chmod(0o755)
            for name, path in programs.items():
                shutil.copy2(path, st / "bin" / name)
            names = []
            for m in modules:
                name = m.name.split(".ko")[0] + ".ko"
                _decompress_module(m, st / "lib/modules" / name)
                names.append(name)
            (st / "lib/modules/load-order").write_text("\n".join(names) + "\n")
            os.mknod(st / "dev/console", 0o600 | 0o020000, os.makedev(5, 1))
            files = sorted(str(p.relative_to(st)) for p in st.rglob("*"))
            cpio = subprocess.run(
                ["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"],
                cwd=st,
                input=("\n".join([".", *files]) + "\n").encode(),
                capture_output=True,
                check=False,
            )
            if cpio.returncode != 0:
                raise LabError(f"cpio failed: {cpio.stderr.decode()}")
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp_out = out.with_suffix(".tmp")
            tmp_out.write_bytes(gzip.compress(cpio.stdout, compresslevel=9))
            tmp_out.replace(out)
        _write_stamp(stamp, key)
    return out


def _is_static(path: Path) -> bool:
    out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=False)
    return "not a dynamic executable" in (out.stdout + out.stderr)


# entry point


def provision(
    root: Path | None = None, *, refresh: bool = False, log: Log = print, guest_kernel: str | None = None
) -> Lab:
    """Make the lab complete (idempotent; stamps make a second run cheap) and return its artifacts.

    ``guest_kernel``: one of GUEST_KERNELS (default ``$FPH_GUEST_KERNEL``, else ``host``). Switching it
    provisions just that kernel and its initramfs (each choice is cached) and rewrites the manifest."""
    choice = guest_kernel_choice(guest_kernel)
    root = (root or lab_dir()).resolve()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent provisioning (two test runs) waits here
        with _step("host tools", log):
            ensure_host_tools(log)
        with _cached_note("QEMU", log) as clog:
            qemu = ensure_qemu(root, refresh, clog)
        with _cached_note(f"guest kernel {choice}", log) as clog:
            kernel = ensure_kernel(root, refresh, clog, choice)
        with _cached_note("guest programs", log) as clog:
            programs = ensure_guest_programs(root, refresh, clog)
        with _cached_note(f"initramfs {choice}", log) as clog:
            initramfs = ensure_initramfs(root, refresh, clog, kernel.kroot, kernel.version, programs, choice)
        lab = Lab(
            root=str(root),
            qemu=qemu,
            kernel=str(kernel.vmlinuz),
            kernel_version=kernel.version,
            kernel_package=kernel.package,
            initramfs=str(initramfs),
            guest_programs={k: str(v) for k, v in programs.items()},
            guest_sources=str(GUEST_SRC),
            kernel_choice=choice,
            kernel_packages=kernel.packages,
        )
        manifest = root / _MANIFEST
        tmp = manifest.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(lab), indent=1))
        tmp.replace(manifest)
    log(
        f"[provision] lab ready in {root} ({time.monotonic() - t0:.1f} s): QEMU {qemu.package_version} "
        f"({qemu.kind}), kernel {kernel.version} ({choice})"
    )
    return lab


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fph_lab.provision", description=__doc__)
    ap.add_argument("--refresh", action="store_true", help="rebuild every artifact, ignoring stamps")
    ap.add_argument(
        "--dir", type=Path, default=None, help=f"lab directory (default $FPH_LAB_DIR or {DEFAULT_LAB_DIR})"
    )
    ap.add_argument(
        "--guest-kernel",
        choices=GUEST_KERNELS,
        default=None,
        help="Debian kernel the guests boot: the host's own (host apt) or one suite's, from "
        f"{MIRROR} (default $FPH_GUEST_KERNEL or host)",
    )
    args = ap.parse_args(argv)
    try:
        provision(args.dir, refresh=args.refresh, guest_kernel=args.guest_kernel)
    except LabError as e:
        print(f"fph_lab.provision: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
