"""The QEMU lab: real Linux guests under real QEMU, for every measurement and guest test.

- ``provision``: ``provision()`` / ``Lab.load()`` → :class:`Lab` (QEMU 11.1, kernel, initramfs paths)
- ``vm``: :class:`VM`, :class:`VMConfig` (balloon native / none / fph, RAM backend, plugins, incoming)
- ``serial``: :class:`SerialConsole` (commands with end markers, waits on the serial log)
- ``guest``: :class:`Guest` workloads (fill, memhog, hold, dirty, meminfo) and their parsed output
- ``pair``: :class:`VMPair` (source + ``-incoming defer`` destination, native migration)
- ``check``: :func:`check_destination` (running, same heartbeat checksum at a later uptime, no Oops)
"""
