"""The fph daemon's gRPC API (generated stubs, one package per version)."""
