"""A throwaway CA, server and client certificates for TLS tests, made with `cryptography`."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pem:
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return Pem(cert_path, key_path)


def _issue(subject: str, issuer_name: x509.Name, issuer_key, key, is_ca: bool, dns: list[str] | None):  # type: ignore[no-untyped-def]
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(folder: Path) -> dict[str, Pem]:
    """ca, server (for localhost) and client certificates, plus a client signed by another CA."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("inflight test CA", _name("inflight test CA"), ca_key, ca_key, True, None)
    pems = {"ca": _write(folder, "ca", ca, ca_key)}
    for stem, dns in (("server", ["localhost"]), ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        pems[stem] = _write(folder, stem, _issue(stem, ca.subject, ca_key, key, False, dns), key)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue_ca = _issue("rogue CA", _name("rogue CA"), rogue_key, rogue_key, True, None)
    key = ec.generate_private_key(ec.SECP256R1())
    pems["rogue_client"] = _write(folder, "rogue_client", _issue("rogue", rogue_ca.subject, rogue_key, key, False, None), key)
    return pems
