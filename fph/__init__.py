"""fph: live migration without sending the guest's free memory.

Data path: ``hint_receiver`` (the guest's virtio-balloon over vhost-user) -> ``dirty_bitmap``
(pages still to send, per hint epoch) -> the sender (precopy rounds over a shared RAM backend).
"""

__version__ = "0.1.0"
