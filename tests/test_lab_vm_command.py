"""The lab VM's QEMU command line for each balloon mode (no QEMU started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fph_lab.errors import VMError
from fph_lab.provision import Lab, QemuInstall
from fph_lab.vm import VM, VMConfig


@pytest.fixture
def fake_lab(tmp_path: Path) -> Lab:
    q = QemuInstall(
        kind="chroot",
        version="11.1.2",
        package_version="1:11.1.2+ds-3",
        binary="/c/usr/bin/qemu-system-x86_64",
        argv_prefix=("/c/lib/ld.so", "--library-path", "/c/lib"),
        data_dirs=("/c/usr/share/qemu", "/c/usr/share/seabios"),
    )
    return Lab(
        root=str(tmp_path), qemu=q, kernel="/k/vmlinuz", kernel_version="6.1.0-56-amd64",
        kernel_package="linux-image-6.1.0-56-amd64", initramfs="/k/initramfs.cpio.gz", guest_programs={},
        guest_sources="/src",
    )  # fmt: skip


def _argv(lab: Lab, cfg: VMConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[VM, str]:
    monkeypatch.setenv("FPH_RUN_DIR", str(tmp_path / "run"))
    vm = VM(lab, cfg, name="t")
    return vm, " ".join(vm.command())


def test_native_balloon_with_hints_needs_an_iothread(
    fake_lab: Lab, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    vm, argv = _argv(fake_lab, VMConfig(init_on_alloc=0), monkeypatch, tmp_path)
    assert argv.startswith(
        "/c/lib/ld.so --library-path /c/lib /c/usr/bin/qemu-system-x86_64 -L /c/usr/share/qemu"
    )
    assert (
        "-object iothread,id=io1 -device virtio-balloon-pci,id=balloon0,iothread=io1,free-page-hint=on"
        in argv
    )
    assert "memory-backend-memfd,id=mem,size=1024M,share=on" in argv
    assert "console=ttyS0 loglevel=4 panic=-1 no_timer_check init_on_alloc=0" in argv
    assert f"-qmp unix:{vm.qmp_socket},server=on,wait=off" in argv
    assert f"logfile={vm.serial_log}" in argv
    assert "-incoming" not in argv
    assert vm.ram_path is None
    vm.stop()
    assert not vm.run_dir.exists()


def test_no_balloon_and_destination(fake_lab: Lab, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = VMConfig(balloon="none", ram_backend="file", mem_mib=512)
    vm, argv = _argv(fake_lab, cfg.destination(), monkeypatch, tmp_path)
    assert "virtio-balloon" not in argv and "vhost-user" not in argv
    assert argv.endswith("-incoming defer")
    assert f"memory-backend-file,id=mem,size=512M,mem-path={vm.ram_path},share=on" in argv
    assert "init_on_alloc" not in argv  # the guest kernel's default
    assert "prealloc" not in argv
    vm.stop()
    vm, argv = _argv(fake_lab, cfg.destination(prealloc=True), monkeypatch, tmp_path)
    assert f"mem-path={vm.ram_path},share=on,prealloc=on" in argv
    vm.stop()


def test_fph_balloon_is_the_generic_vhost_user_device(
    fake_lab: Lab, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sock = str(tmp_path / "vu.sock")
    cfg = VMConfig(balloon="fph", vhost_user_socket=sock, plugins=("/p/wlog.so,log=/r/log.bin,ram=1G",))
    vm, argv = _argv(fake_lab, cfg, monkeypatch, tmp_path)
    assert f"-chardev socket,id=vu,path={sock}" in argv
    assert (
        "-device vhost-user-test-device-pci,id=bal0,chardev=vu,virtio-id=5,num_vqs=4,config_size=16,"
        "vq_size=1024,bus=pci.0,addr=0x5"
    ) in argv
    assert "-plugin /p/wlog.so,log=/r/log.bin,ram=1G" in argv
    assert vm.vhost_user_socket == sock
    vm.stop()


def test_fph_balloon_without_socket_is_refused(
    fake_lab: Lab, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FPH_RUN_DIR", str(tmp_path / "run"))
    vm = VM(fake_lab, VMConfig(balloon="fph"), name="t")
    with pytest.raises(VMError, match="vhost_user_socket"):
        vm.command()
    vm.stop()
