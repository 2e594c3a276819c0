"""fph daemon API v1: generated from proto/fph/api/v1/fph.proto by scripts/gen-proto (do not edit)."""
