"""Write logs: which guest pages were written since the last harvest (issue 5).

Providers: :class:`TcgWriteLog` (QEMU TCG plugin, atomic), :class:`SoftDirtyWriteLog` (KVM hosts,
soft-dirty with the vCPUs paused around each harvest), :class:`DeviceWriteLog` (fph's own writes to guest
memory), combined with :class:`CombinedWriteLog`. All harvest into fph's DirtyBitmap word layout.
"""
