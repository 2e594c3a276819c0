"""A throw-away PKI for the lab: one CA and a certificate per host, made with the ``openssl`` command.

A deployment brings its own CA (the daemons' ``tls_cert``/``tls_key``/``tls_client_ca``); the lab makes
one per run so the two-host tests and benchmarks run the data plane with TLS on, as a deployment would.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from fph.transfer.security import TlsFiles
from fph_lab.errors import LabError

EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


@dataclass(frozen=True)
class LabPki:
    """Where the CA and each host's files are."""

    directory: Path
    ca: Path

    def host(self, name: str) -> TlsFiles:
        return TlsFiles(self.directory / f"{name}.pem", self.directory / f"{name}.key", self.ca)


def _openssl(*args: str, cwd: Path) -> None:
    try:
        subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise LabError("the openssl command is missing: apt-get install openssl") from None
    except subprocess.CalledProcessError as exc:
        raise LabError(f"openssl {' '.join(args[:2])} failed: {exc.stderr.strip()}") from None


def make_pki(directory: Path, hosts: dict[str, str], ca_name: str = "fph-lab-ca") -> LabPki:
    """A CA in ``directory`` and, for each ``name: ip`` in ``hosts``, a certificate for both TLS roles
    (server and client: a daemon receives on one migration and sends on the next)."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    _openssl("req", "-x509", *EC_KEY, "-keyout", "ca.key", "-out", "ca.pem", "-days", "7",
             "-subj", f"/CN={ca_name}", cwd=directory)  # fmt: skip
    for name, ip in hosts.items():
        ext = directory / f"{name}.ext"
        ext.write_text(f"subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth,clientAuth\n")
        _openssl("req", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
                 cwd=directory)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "7", "-extfile", ext.name, cwd=directory)  # fmt: skip
    return LabPki(directory, directory / "ca.pem")
