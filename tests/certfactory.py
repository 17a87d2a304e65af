"""Bad (and odd) certificates for tests, built with `cryptography`.

The good ones come from scripts/gen_certs.sh; these are the ones an
attacker or a careless operator would bring: another CA, expired, not yet
valid, self-signed, without the clientAuth usage, with no EKU at all.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


@dataclass
class Issuer:
    """A CA (or a self-signed leaf) that can sign."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def new_key(kind: str = "ec") -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(
    cn: str = "evil CA",
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Issuer:
    key = new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - DAY)
        .not_valid_after(not_after or NOW + 365 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Issuer(cert, key)


def load_issuer(cert_path: Path, key_path: Path) -> Issuer:
    """An issuer from PEM files (e.g. the gen_certs.sh CA)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey))
    return Issuer(cert, key)


def make_leaf(
    issuer: Issuer | None,
    cn: str | None,
    *,
    eku: list[x509.ObjectIdentifier] | None = None,
    no_eku: bool = False,
    san: list[str] | None = None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    key_kind: str = "ec",
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]:
    """A leaf certificate; ``issuer=None`` makes it self-signed."""
    key = new_key(key_kind)
    subject = _name(cn) if cn else x509.Name([])
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - DAY)
        .not_valid_after(not_after or NOW + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if not no_eku:
        b = b.add_extension(
            x509.ExtendedKeyUsage(eku or [ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    if san:
        names: list[x509.GeneralName] = []
        for s in san:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(s)))
            except ValueError:
                names.append(x509.DNSName(s))
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if issuer is not None:
        b = b.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    cert = b.sign(issuer.key if issuer else key, hashes.SHA256())
    return cert, key


def write_pair(
    d: Path,
    name: str,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    key_mode: int = 0o600,
) -> tuple[Path, Path]:
    """Write <name>.crt and <name>.key (key created with ``key_mode``)."""
    crt = d / f"{name}.crt"
    keyp = d / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(keyp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, key_mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(keyp, key_mode)
    return crt, keyp


def server_pair(issuer: Issuer, d: Path, name: str = "server", **kw: object) -> tuple[Path, Path]:
    """A server certificate for localhost/127.0.0.1/::1 signed by ``issuer``."""
    cert, key = make_leaf(
        issuer,
        "localhost",
        eku=[ExtendedKeyUsageOID.SERVER_AUTH],
        san=["localhost", "127.0.0.1", "::1"],
        **kw,  # type: ignore[arg-type]
    )
    return write_pair(d, name, cert, key)


# ---------------------------------------------------------------- fleet helpers


def host_leaf(
    issuer: Issuer,
    cn: str | None,
    *,
    dns: tuple[str, ...] = (),
    uris: tuple[str, ...] = (),
    eku: list[x509.ObjectIdentifier] | None = None,
    not_after: datetime.datetime | None = None,
    serial: int | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]:
    """A leaf with arbitrary DNS and URI SANs (also wildcards or odd URIs), clientAuth."""
    key = new_key()
    subject = _name(cn) if cn else x509.Name([])
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.UniformResourceIdentifier(u) for u in uris]
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(not_after or NOW + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(eku or [ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    )
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(issuer.key, hashes.SHA256()), key


def pem(cert: x509.Certificate) -> bytes:
    """PEM bytes of a certificate."""
    return cert.public_bytes(serialization.Encoding.PEM)


def make_crl(
    issuer: Issuer,
    revoked: list[int],
    *,
    last_update: datetime.datetime | None = None,
    next_update: datetime.datetime | None = None,
) -> bytes:
    """A PEM CRL of ``issuer`` revoking the serials ``revoked``."""
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(last_update or NOW - DAY)
        .next_update(next_update or NOW + 7 * DAY)
    )
    for s in revoked:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(s).revocation_date(NOW - DAY).build()
        )
    return b.sign(issuer.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
