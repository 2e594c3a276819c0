"""vhost-user back-end: a sans-IO protocol core (message, handler, backend) and an asyncio transport.

Layout follows rust-vmm's ``vhost`` crate: ``message`` (ids, flags, payload codecs), ``handler`` (protocol
semantics, bytes and fds in, replies and actions out), ``backend`` (what a device implements), ``connection``
and ``server`` (sockets, fds, one event loop for many devices), ``errors`` (one error tree).
"""
