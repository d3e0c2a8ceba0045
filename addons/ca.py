"""Certificates: the proxy's own CA (made on first use) and the upstream trust bundle."""

from __future__ import annotations

from pathlib import Path

import certifi
from cryptography import x509
from mitmproxy.certs import CertStore
from mitmproxy.options import CONF_BASENAME

CA_CERT = f"{CONF_BASENAME}-ca-cert.pem"
UPSTREAM_BUNDLE = "upstream-trust.pem"


class CertError(Exception):
    """A CA file that cannot be used; says which and why."""


def ensure_ca(certs_dir: Path) -> Path:
    """Create the CA in certs_dir if missing (key readable by its owner only); return the cert workers trust.

    An existing CA is not loaded here (the proxy loads and checks it when it starts): `session
    issue` only needs its path, and loading the key costs about 50 ms."""
    if (certs_dir / CA_CERT).is_file() and (certs_dir / f"{CONF_BASENAME}-ca.pem").is_file():
        return certs_dir / CA_CERT
    try:
        CertStore.from_store(certs_dir, CONF_BASENAME, 2048)
    except (OSError, ValueError) as e:
        raise CertError(f"CA in {certs_dir} cannot be created or read: {e}") from None
    return certs_dir / CA_CERT


def upstream_bundle(certs_dir: Path, extra: Path | None) -> Path | None:
    """The public roots plus the extra CAs, as one PEM file; None when there are no extras."""
    if extra is None:
        return None
    try:
        pem = extra.read_bytes()
        x509.load_pem_x509_certificates(pem)
    except OSError as e:
        raise CertError(f"upstream CA file {extra} cannot be read ({e.strerror})") from None
    except ValueError:
        raise CertError(f"upstream CA file {extra} holds no PEM certificate") from None
    bundle = certs_dir / UPSTREAM_BUNDLE
    try:
        certs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # (`link finish` may come before any `run`)
        bundle.write_bytes(Path(certifi.where()).read_bytes().rstrip(b"\n") + b"\n" + pem)
    except OSError as e:
        raise CertError(f"the upstream trust bundle {bundle} cannot be written ({e.strerror})") from None
    return bundle
