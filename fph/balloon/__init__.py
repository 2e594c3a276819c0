"""fph's virtio-balloon device over vhost-user, one concept per file (fph.hint_receiver is its public face).

``spec`` constants of the virtio spec · ``sink`` where hints go · ``free_page_hint`` the hint state machine ·
``stats`` the stats queue · ``inflate`` inflate/deflate · ``reporting`` free page reporting · ``counters``
what a device counted · ``device`` the vhost-user back-end routing each queue · ``receiver`` one server with
a device per VM · ``control`` reaching a device from another thread or loop.
"""
