"""The fph daemon: one per host, serving the gRPC API in ``fph.api.v1`` to an orchestrator.

``config``   TOML file + flags; ``registry``: VMs, path checks, the error tree mapped to gRPC codes;
``jobs``     migrations as tasks with progress and reports; ``service``: the thin servicers;
``metrics``  Prometheus exposition; ``server``: grpc.aio on a 0600 Unix socket (TCP only with mutual TLS),
structured logs, clean shutdown (DONE to every guest still holding hinted pages).
"""
