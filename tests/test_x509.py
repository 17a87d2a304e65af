"""The DER reader in agent/x509.py against `cryptography` on generated certificates."""

from __future__ import annotations

import datetime
import ipaddress
from typing import Any

import pytest
from cryptography import x509 as cx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import x509

import certfactory as cf

KEYS: dict[str, Any] = {
    "ec": ec.generate_private_key(ec.SECP256R1()),
    "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ed25519": ed25519.Ed25519PrivateKey.generate(),
}
EKUS = [
    ExtendedKeyUsageOID.CLIENT_AUTH,
    ExtendedKeyUsageOID.SERVER_AUTH,
    ExtendedKeyUsageOID.CODE_SIGNING,
    ExtendedKeyUsageOID.EMAIL_PROTECTION,
]
SAMPLE_DER = cf.make_leaf(None, "x", san=["a.example"])[0].public_bytes(serialization.Encoding.DER)
# At most 64 bytes of UTF-8 (cryptography refuses a longer CN; 40 characters can be 160).
names = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), min_size=1, max_size=40
).filter(lambda s: len(s.encode()) <= 64)
dns = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z]{2,6}){0,2}", fullmatch=True)


def _build(
    cn: str | None,
    sans: list[str],
    ips: list[str],
    ekus: list[cx.ObjectIdentifier] | None,
    key_kind: str,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> cx.Certificate:
    key = KEYS[key_kind]
    issuer = KEYS["ec"]
    attrs = [cx.NameAttribute(NameOID.ORGANIZATION_NAME, "org")]
    if cn is not None:
        attrs.append(cx.NameAttribute(NameOID.COMMON_NAME, cn))
    b = (
        cx.CertificateBuilder()
        .subject_name(cx.Name(attrs))
        .issuer_name(cx.Name([cx.NameAttribute(NameOID.COMMON_NAME, "ca")]))
        .public_key(key.public_key())
        .serial_number(cx.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if sans or ips:
        gn: list[cx.GeneralName] = [cx.DNSName(s) for s in sans]
        gn += [cx.IPAddress(ipaddress.ip_address(i)) for i in ips]
        b = b.add_extension(cx.SubjectAlternativeName(gn), critical=False)
    if ekus is not None:
        b = b.add_extension(cx.ExtendedKeyUsage(ekus), critical=False)
    return b.sign(issuer, hashes.SHA256())


@settings(max_examples=60, deadline=None)
@given(
    cn=st.none() | names,
    sans=st.lists(dns, max_size=3),
    ips=st.lists(st.sampled_from(["10.0.0.1", "::1", "198.18.0.7"]), max_size=2, unique=True),
    ekus=st.none() | st.lists(st.sampled_from(EKUS), min_size=1, max_size=4, unique=True),
    key_kind=st.sampled_from(sorted(KEYS)),
    start=st.datetimes(
        min_value=datetime.datetime(1990, 1, 1), max_value=datetime.datetime(2100, 1, 1)
    ),
    days=st.integers(1, 20000),
)
def test_reader_agrees_with_cryptography(
    cn: str | None,
    sans: list[str],
    ips: list[str],
    ekus: list[cx.ObjectIdentifier] | None,
    key_kind: str,
    start: datetime.datetime,
    days: int,
) -> None:
    """CN, SANs, EKUs, validity, key type and SPKI match what cryptography reads."""
    start = start.replace(microsecond=0, tzinfo=datetime.timezone.utc)
    cert = _build(cn, sans, ips, ekus, key_kind, start, start + datetime.timedelta(days=days))
    der = cert.public_bytes(serialization.Encoding.DER)
    got = x509.parse_certificate(der)
    assert got.common_name == cn
    assert [v for k, v in got.san if k == "dns"] == sans
    assert [v for k, v in got.san if k == "ip"] == [str(ipaddress.ip_address(i)) for i in ips]
    assert got.eku == (None if ekus is None else frozenset(e.dotted_string for e in ekus))
    assert got.not_before == cert.not_valid_before_utc
    assert got.not_after == cert.not_valid_after_utc
    assert got.key_type == key_kind
    assert got.spki == cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    assert x509.pem_certificates(b"junk\n" + pem + pem) == [der, der]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d[:-1],
        lambda d: d + b"\x00",
        lambda d: b"\x30\x85" + d[2:],
        lambda d: d[:10],
        lambda d: b"",
        lambda d: b"\x31" + d[1:],
        lambda d: d[:4] + b"\xff" * 10 + d[14:],
    ],
)
def test_malformed_der_raises_dererror_only(mutate) -> None:  # type: ignore[no-untyped-def]
    """Truncated, extended or corrupted DER raises DERError, never anything else."""
    cert, _ = cf.make_leaf(None, "x")
    der = cert.public_bytes(serialization.Encoding.DER)
    with pytest.raises(x509.DERError):
        x509.parse_certificate(mutate(der))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_crash(data: bytes) -> None:
    """Any byte string: a Certificate or DERError."""
    try:
        x509.parse_certificate(data)
    except x509.DERError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_corrupted_certificates_never_crash(data: st.DataObject) -> None:
    """Random byte changes in a real certificate: a Certificate or DERError, nothing else."""
    der = bytearray(SAMPLE_DER)
    for _ in range(data.draw(st.integers(1, 5))):
        i = data.draw(st.integers(0, len(der) - 1))
        der[i] = data.draw(st.integers(0, 255))
    try:
        x509.parse_certificate(bytes(der))
    except x509.DERError:
        pass
