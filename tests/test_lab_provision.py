"""Provisioning logic that needs no network: stamps read back equal (else every run re-provisions); the guest
kernel choice (apt answers faked), kernel tree layouts of each suite, per-choice stamps, old manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fph_lab import provision
from fph_lab.errors import LabError
from fph_lab.provision import (
    GUEST_KERNELS,
    QEMU_ACCEPT,
    QEMU_SOURCES,
    Lab,
    QemuSource,
    _source_stamp,
    _stamp_ok,
    _write_stamp,
    ensure_kernel,
    guest_kernel_choice,
    kernel_packages,
    kernel_sources,
    normalize_kernel_tree,
)


@pytest.mark.parametrize("src", QEMU_SOURCES, ids=lambda s: s.name)
def test_qemu_source_stamp_survives_json(src: QemuSource, tmp_path: Path) -> None:
    stamp = tmp_path / "qemu.json"
    key = _source_stamp(src)
    _write_stamp(stamp, key)
    assert json.loads(stamp.read_text()) == key
    assert _stamp_ok(stamp, key)


def test_only_11_1_is_accepted() -> None:
    assert QEMU_ACCEPT.match("11.1.2") and QEMU_ACCEPT.match("11.1.3")
    for v in ("11.2.0", "11.10.1", "10.2.0", "7.2.22"):
        assert not QEMU_ACCEPT.match(v), v


# guest kernel choice: no network (apt is faked where the code would call it)

TESTING_DEPENDS = {
    "linux-image-amd64": "linux-image-amd64\n  Depends: linux-base-amd64\n"
    "  Depends: linux-image-7.2.12+deb14-amd64\n",
    "linux-image-7.2.12+deb14-amd64": "linux-image-7.2.12+deb14-amd64\n"
    " |Depends: dracut\n |Depends: initramfs-tools\n  Depends: <linux-initramfs-tool>\n"
    "  Depends: linux-base-7.2.12+deb14-amd64\n  Depends: linux-binary-7.2.12+deb14-amd64\n"
    "  Depends: linux-modules-7.2.12+deb14-amd64\n  PreDepends: linux-base\n",
}
BOOKWORM_DEPENDS = {
    "linux-image-amd64": "linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n",
    "linux-image-6.1.0-57-amd64": "linux-image-6.1.0-57-amd64\n  Depends: kmod\n  Depends: linux-base\n"
    " |Depends: initramfs-tools\n  Depends: <linux-initramfs-tool>\n",
}


def fake_apt(monkeypatch: pytest.MonkeyPatch, answers: dict[str, str]) -> list[list[str]]:
    calls: list[list[str]] = []

    def run(cmd: list[str], **_kw: object) -> str:
        calls.append(cmd)
        if cmd[0] == "apt-cache" and cmd[-2] == "depends":
            return answers[cmd[-1]]
        raise AssertionError(f"unexpected command {cmd}")

    monkeypatch.setattr(provision, "_run", run)
    return calls


def test_guest_kernel_choice_flag_env_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FPH_GUEST_KERNEL", raising=False)
    assert guest_kernel_choice() == "host"
    monkeypatch.setenv("FPH_GUEST_KERNEL", "trixie")
    assert guest_kernel_choice() == "trixie"
    assert guest_kernel_choice("testing") == "testing"  # the flag wins over the environment
    with pytest.raises(LabError, match="choose one of host, bookworm, trixie, testing"):
        guest_kernel_choice("sid")
    assert set(GUEST_KERNELS) == {"host", "bookworm", "trixie", "testing"}


def test_kernel_sources_per_suite() -> None:
    assert kernel_sources("testing") == ("deb http://deb.debian.org/debian testing main",)
    assert kernel_sources("trixie") == (
        "deb http://deb.debian.org/debian trixie main",
        "deb http://deb.debian.org/debian trixie-updates main",
        "deb http://deb.debian.org/debian-security trixie-security main",
    )


def test_split_kernel_packages_are_found_by_abi(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_apt(monkeypatch, TESTING_DEPENDS)
    assert kernel_packages([]) == [
        "linux-image-7.2.12+deb14-amd64",
        "linux-base-7.2.12+deb14-amd64",
        "linux-binary-7.2.12+deb14-amd64",
        "linux-modules-7.2.12+deb14-amd64",
    ]
    fake_apt(monkeypatch, BOOKWORM_DEPENDS)
    assert kernel_packages([]) == ["linux-image-6.1.0-57-amd64"]  # one package, modules inside


def _touch(path: Path, data: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data)
    return path


@pytest.mark.parametrize(
    ("layout", "files"),
    [
        ("bookworm", ("boot/vmlinuz-K", "boot/config-K", "lib/modules/K/kernel/virtio_balloon.ko")),
        ("trixie", ("boot/vmlinuz-K", "usr/lib/modules/K/kernel/virtio_balloon.ko.xz")),
        (
            "testing",
            ("usr/lib/modules/K/vmlinuz", "usr/lib/modules/K/config", "usr/lib/modules/K/kernel/k.ko.xz"),
        ),
    ],
)
def test_kernel_trees_are_normalized(layout: str, files: tuple[str, ...], tmp_path: Path) -> None:
    for f in files:
        _touch(tmp_path / f.replace("K", "6.99.0-1-amd64"))
    kver, vmlinuz = normalize_kernel_tree(tmp_path)
    assert kver == "6.99.0-1-amd64" and vmlinuz == tmp_path / "boot/vmlinuz-6.99.0-1-amd64"
    assert vmlinuz.read_text() == "x"
    for base in ("lib/modules", "usr/lib/modules"):  # whichever one the host's depmod reads
        assert (tmp_path / base / kver / "kernel").is_dir()
    if layout == "testing":
        assert (tmp_path / "boot" / f"config-{kver}").read_text() == "x"
    assert normalize_kernel_tree(tmp_path) == (kver, vmlinuz)  # idempotent


def test_a_tree_without_image_or_with_two_versions_is_refused(tmp_path: Path) -> None:
    _touch(tmp_path / "a/usr/lib/modules/1-amd64/modules.order")
    with pytest.raises(LabError, match="no kernel image"):
        normalize_kernel_tree(tmp_path / "a")
    _touch(tmp_path / "b/lib/modules/1-amd64/modules.order")
    _touch(tmp_path / "b/usr/lib/modules/2-amd64/modules.order")
    with pytest.raises(LabError, match="expected one kernel version"):
        normalize_kernel_tree(tmp_path / "b")


def _fake_kernel(root: Path, choice: str, kver: str, stamp: str) -> dict[str, object]:
    kroot = root / "kernel" / choice / "root"
    vmlinuz = _touch(kroot / "boot" / f"vmlinuz-{kver}")
    _touch(kroot / "lib/modules" / kver / "modules.dep", "")
    key: dict[str, object] = {"package": f"linux-image-{kver}", "version": kver, "vmlinuz": str(vmlinuz),
                              "kroot": str(kroot)}  # fmt: skip
    if stamp != "kernel.json":
        key |= {"choice": choice, "packages": [f"linux-image-{kver}=1"]}
    _write_stamp(root / "stamps" / stamp, key)
    return key


def test_each_choice_has_its_own_stamp_and_switching_provisions_only_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = fake_apt(monkeypatch, {})
    _fake_kernel(tmp_path, "trixie", "6.12.1+deb13-amd64", "kernel-trixie.json")
    _fake_kernel(tmp_path, "testing", "7.2.12+deb14-amd64", "kernel-testing.json")
    k = ensure_kernel(tmp_path, False, print, "trixie")
    assert (k.choice, k.version, k.packages) == (
        "trixie",
        "6.12.1+deb13-amd64",
        ("linux-image-6.12.1+deb13-amd64=1",),
    )
    assert ensure_kernel(tmp_path, False, print, "testing").version == "7.2.12+deb14-amd64"
    assert calls == []  # both cached: nothing downloaded
    with pytest.raises(AssertionError, match="unexpected command"):  # bookworm is new: apt is asked
        ensure_kernel(tmp_path, False, print, "bookworm")
    assert calls[0][:2] == ["apt-get", "-o"] and "update" in calls[0]


def test_the_host_kernel_of_an_older_lab_is_adopted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_apt(monkeypatch, {})
    old = _fake_kernel(tmp_path, "legacy", "6.1.0-57-amd64", "kernel.json")  # stamp before the choice
    k = ensure_kernel(tmp_path, False, print, "host")
    assert calls == [] and (k.choice, k.version, str(k.vmlinuz)) == ("host", "6.1.0-57-amd64", old["vmlinuz"])
    assert json.loads((tmp_path / "stamps/kernel-host.json").read_text())["choice"] == "host"


def test_an_old_manifest_loads_as_the_host_kernel(tmp_path: Path) -> None:
    for p in ("k/vmlinuz", "k/initramfs.cpio.gz", "q/qemu"):
        _touch(tmp_path / p)
    qemu = {
        "kind": "host", "version": "11.1.2", "package_version": "11.1.2", "binary": str(tmp_path / "q/qemu"),
        "argv_prefix": [], "data_dirs": [], "env": {}, "root": None,
    }  # fmt: skip
    manifest = {
        "root": str(tmp_path), "qemu": qemu, "kernel": str(tmp_path / "k/vmlinuz"),
        "kernel_version": "6.1.0-57-amd64", "kernel_package": "linux-image-6.1.0-57-amd64",
        "initramfs": str(tmp_path / "k/initramfs.cpio.gz"), "guest_programs": {}, "guest_sources": "/s",
    }  # fmt: skip
    (tmp_path / "lab.json").write_text(json.dumps(manifest))
    lab = Lab.load(tmp_path)
    assert lab.kernel_choice == "host" and lab.kernel_packages == ()
    (tmp_path / "lab.json").write_text(
        json.dumps(
            manifest
            | {"kernel_choice": "testing", "kernel_packages": ["linux-image-7.2.12+deb14-amd64=7.2.12-1"]}
        )
    )
    assert Lab.load(tmp_path).kernel_packages == ("linux-image-7.2.12+deb14-amd64=7.2.12-1",)
