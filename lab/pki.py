"""A lab certificate authority for etcd over TLS, made with Debian's openssl CLI.

    pki = make_pki(dir, [("n1", "10.99.0.6"), ...])
    pki.ca, pki.member("n1") -> (cert, key), pki.client -> (cert, key)

One EC P-256 CA; per member one certificate for both ends of its peer links and its
client port (serverAuth + clientAuth, its address and name as SANs); one client
certificate that every tortie component uses. Keys are written 0600 in a 0700
directory. The openssl CLI rather than a Python package: it is already on every machine
the lab runs on, and each certificate is one call (~15 ms).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from tortie.errors import DataplaneError

DAYS = "30"
_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


@dataclass(frozen=True)
class Pki:
    dir: str

    @property
    def ca(self) -> str:
        return os.path.join(self.dir, "ca.crt")

    @property
    def client(self) -> tuple[str, str]:
        return self.member("client")

    def member(self, name: str) -> tuple[str, str]:
        return os.path.join(self.dir, f"{name}.crt"), os.path.join(self.dir, f"{name}.key")


def _openssl(*args: str) -> None:
    r = subprocess.run(["openssl", "req", "-x509", *_EC, "-days", DAYS, *args],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise DataplaneError(f"openssl failed: {r.stderr.strip().splitlines()[-1:]}")


def make_ca(directory: str, cn: str = "tortie-lab-ca") -> Pki:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    pki = Pki(directory)
    old = os.umask(0o077)  # the keys are born 0600
    try:
        _openssl("-keyout", os.path.join(directory, "ca.key"), "-out", pki.ca, "-subj", f"/CN={cn}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    finally:
        os.umask(old)
    return pki


def issue(pki: Pki, name: str, *, ips: Sequence[str] = (), server: bool = True) -> tuple[str, str]:
    """A certificate signed by the lab CA: for a member (server and client) or a client."""
    cert, key = pki.member(name)
    sans = [f"IP:{ip}" for ip in ips] + [f"DNS:{name}"]
    usage = "serverAuth,clientAuth" if server else "clientAuth"
    old = os.umask(0o077)
    try:
        _openssl("-keyout", key, "-out", cert, "-subj", f"/CN={name}",
                 "-CA", pki.ca, "-CAkey", os.path.join(pki.dir, "ca.key"),
                 "-addext", f"subjectAltName={','.join(sans)}",
                 "-addext", f"extendedKeyUsage={usage}",
                 "-addext", "basicConstraints=critical,CA:FALSE")
    finally:
        os.umask(old)
    return cert, key


def make_pki(directory: str, members: Sequence[tuple[str, str]]) -> Pki:
    """The CA, a certificate per (member name, address) and the components' client certificate."""
    pki = make_ca(directory)
    for name, ip in members:
        issue(pki, name, ips=[ip])
    issue(pki, "client", server=False)
    return pki
