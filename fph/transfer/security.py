"""Who may talk on the data plane: mutual TLS 1.3 between the two hosts' daemons, and a one-time credential
per migration that the destination hands out at PrepareIncoming and the source presents in its HELLO.

TLS keeps the pages private and proves the peer is a host of this deployment (both certificates chain to
the CA in the daemons' config); the credential proves it is the source of *this* migration. A peer that
fails either is refused before any page is accepted, and the receiver goes on waiting for the real source.
Without TLS (same host, loopback) the credential still decides who may send.
"""

from __future__ import annotations

import hmac
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path

CREDENTIAL_BYTES = 32


class SecurityError(RuntimeError):
    """A TLS file cannot be used, or a peer failed authentication."""


def new_credential() -> str:
    """A fresh one-time credential (hex) for one incoming migration."""
    return secrets.token_hex(CREDENTIAL_BYTES)


def credential_matches(expected: str, presented: object) -> bool:
    """Constant-time comparison; anything but a string of the right value is a mismatch."""
    return isinstance(presented, str) and hmac.compare_digest(expected.encode(), presented.encode())


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of this host: its certificate and key, and the CA that signs every peer's certificate."""

    cert: Path
    key: Path
    ca: Path

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        ctx = ssl.SSLContext(
            ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
        )
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_cert_chain(self.cert, self.key)
            ctx.load_verify_locations(cafile=str(self.ca))
        except (OSError, ssl.SSLError) as exc:
            raise SecurityError(
                f"data-plane TLS files (cert {self.cert}, key {self.key}, ca {self.ca}): {exc}"
            ) from exc
        return ctx

    def server_context(self) -> ssl.SSLContext:
        """The receiver's side: requires a client certificate signed by the CA."""
        ctx = self._context(ssl.Purpose.CLIENT_AUTH)
        # No session tickets: after the handshake the socket must carry nothing but frames, so that
        # "readable" on the source means a reply from the destination.
        ctx.num_tickets = 0
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """The sender's side: the receiver's certificate must chain to the CA. Host names are not checked:
        the destination is named by an address its own daemon handed out, and the one-time credential
        binds the connection to this migration."""
        ctx = self._context(ssl.Purpose.SERVER_AUTH)
        ctx.check_hostname = False
        return ctx


@dataclass(frozen=True)
class DataPlaneSecurity:
    """What one migration's data connection requires: TLS (None: plain TCP) and its credential."""

    credential: str
    tls: TlsFiles | None = None
