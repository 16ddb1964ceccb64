"""X.509 material for the TLS listeners a node or a function host may open (the
node's Redis for remote functions, a function host's Invoke API): a small CA and
server or client certificates it signs.

This is not the cluster's admission CA (keyfiles.py, Ed25519 node certificates in
SPIRT's own format): TLS clients (redis-py, boto3, redis-cli) need X.509. ECDSA
P-256 keys, which every TLS stack here verifies. Private keys are written 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from spirtd.keyfiles import write_public, write_secret

MAX_DAYS = 3650


class TlsMaterialError(ValueError):
    """Bad input or unreadable material; the message names the file or value."""


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    if not (1 <= days <= MAX_DAYS):
        raise TlsMaterialError(f"days must be in 1..{MAX_DAYS}, not {days}")
    now = datetime.datetime.now(datetime.UTC)
    # A little in the past, for peers whose clocks run slightly behind.
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)


def make_ca(directory: Path, name: str = "spirt TLS CA", days: int = MAX_DAYS) -> Issued:
    """A self-signed CA: ``directory/tls-ca.crt`` and ``directory/tls-ca.key`` (0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    out = Issued(directory / "tls-ca.crt", directory / "tls-ca.key")
    write_secret(out.key, _key_pem(key))
    write_public(out.cert, cert.public_bytes(serialization.Encoding.PEM))
    return out


def _load_ca(ca: Issued) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
        key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise TlsMaterialError(f"CA {ca.cert} / {ca.key}: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TlsMaterialError(f"CA key {ca.key} is not an EC key")
    return cert, key


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            if not n or len(n) > 253 or not all(c.isalnum() or c in "-.*" for c in n):
                raise TlsMaterialError(f"bad host name {n!r}") from None
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def issue(
    ca: Issued,
    cert_path: Path,
    key_path: Path,
    names: list[str],
    *,
    client: bool = False,
    days: int = 825,
) -> Issued:
    """A certificate for ``names`` (IP addresses or DNS names) signed by ``ca``: a
    server certificate, or with ``client`` one a TLS client presents."""
    if not names:
        raise TlsMaterialError("at least one host name or address is needed")
    ca_cert, ca_key = _load_ca(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days)
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(min(end, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(_san(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write_secret(key_path, _key_pem(key))
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return Issued(cert_path, key_path)
