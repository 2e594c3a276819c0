"""The QEMU lab: provisioning (QEMU 11.1, guest kernel, initramfs), lab VMs, guest control over serial."""
