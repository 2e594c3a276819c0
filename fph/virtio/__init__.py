"""Device-side virtio plumbing: guest memory (``memory``), split virtqueues (``queue``, ``chain``) and a
driver-side mock queue for tests (``mock``)."""
