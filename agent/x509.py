"""Reading the few X.509 fields the agent needs, straight from DER.

Why not `cryptography`: importing it costs the agent about 10 MB of its
resident memory for the whole life of the process, and the agent only needs
to *read* a handful of fields of certificates it has already verified or
that its operator installed: validity dates, the subject Common Name, the
subjectAltNames, the extended key usages and the public key algorithm.
Signatures, chains and key matching are verified by the TLS libraries
(BoringSSL in gRPC at every handshake, OpenSSL through the ``ssl`` module at
load time), never here. tests/test_x509.py checks this reader against
`cryptography` on generated certificates.

Every function raises :class:`DERError` on malformed input; nothing here
trusts a length without checking it against the buffer.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import re
from dataclasses import dataclass

OID_CN = "2.5.4.3"
OID_SAN = "2.5.29.17"
OID_EKU = "2.5.29.37"
OID_CLIENT_AUTH = "1.3.6.1.5.5.7.3.2"
KEY_ALGORITHMS = {
    "1.2.840.10045.2.1": "ec",
    "1.2.840.113549.1.1.1": "rsa",
    "1.3.101.112": "ed25519",
    "1.3.101.113": "ed448",
}

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\s+(.*?)-----END CERTIFICATE-----", re.S)


class DERError(ValueError):
    """Malformed or unsupported DER."""


@dataclass(frozen=True)
class Certificate:
    """The fields of one certificate that the agent uses."""

    der: bytes
    common_name: str | None  # the first CN (see common_names for all of them)
    san: tuple[tuple[str, str], ...]  # ("dns" | "uri" | "email" | "ip", value)
    eku: frozenset[str] | None  # OIDs; None when the extension is absent
    not_before: datetime.datetime
    not_after: datetime.datetime
    key_type: str  # "ec", "rsa", "ed25519", ... or the OID
    spki: bytes  # DER of SubjectPublicKeyInfo
    # Every CN of the subject, in order: more than one makes the identity
    # ambiguous (different libraries pick the first or the last).
    common_names: tuple[str, ...] = ()

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the DER encoding, hex."""
        return hashlib.sha256(self.der).hexdigest()

    @property
    def subject(self) -> str:
        """A short human-readable subject (for log lines)."""
        return f"CN={self.common_name}" if self.common_name else "(no CN)"


def pem_certificates(data: bytes) -> list[bytes]:
    """The DER blobs of every CERTIFICATE block in PEM text."""
    out = []
    for m in _PEM.finditer(data):
        try:
            out.append(base64.b64decode(b"".join(m.group(1).split()), validate=True))
        except ValueError:
            raise DERError("invalid base64 in a PEM certificate block") from None
    return out


# ---------------------------------------------------------------- DER reading


def _tlv(buf: bytes, pos: int, end: int) -> tuple[int, int, int, int]:
    """(tag, content start, content end, next position) of the element at pos."""
    if pos + 2 > end:
        raise DERError("truncated element")
    tag = buf[pos]
    if tag & 0x1F == 0x1F:
        raise DERError("high tag numbers are not used in certificates")
    length = buf[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or pos + n > end:
            raise DERError("bad length")
        length = int.from_bytes(buf[pos : pos + n], "big")
        pos += n
    if pos + length > end:
        raise DERError("element longer than its container")
    return tag, pos, pos + length, pos + length


def _children(buf: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tag, content start, content end, element start) of each child."""
    out = []
    pos = start
    while pos < end:
        tag, s, e, nxt = _tlv(buf, pos, end)
        out.append((tag, s, e, pos))
        pos = nxt
    return out


def _expect(item: tuple[int, ...], tag: int, what: str) -> tuple[int, int]:
    if item[0] != tag:
        raise DERError(f"{what}: expected tag {tag:#x}, got {item[0]:#x}")
    return item[1], item[2]


def _oid(raw: bytes) -> str:
    if not raw:
        raise DERError("empty OID")
    parts: list[int] = []
    value = 0
    for b in raw:
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(value)
            value = 0
    if raw[-1] & 0x80:
        raise DERError("truncated OID")
    first = parts[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(p) for p in head + parts[1:])


def _time(tag: int, raw: bytes) -> datetime.datetime:
    text = raw.decode("ascii", "strict")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ
        fmt, year_digits = "%y%m%d%H%M%SZ", 2
    elif tag == 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ
        fmt, year_digits = "%Y%m%d%H%M%SZ", 4
    else:
        raise DERError("bad time tag")
    if len(text) != 11 + year_digits:
        raise DERError(f"unsupported time format {text!r}")
    dt = datetime.datetime.strptime(text, fmt)
    if tag == 0x17:  # RFC 5280: YY >= 50 means 19YY
        year = dt.year if dt.year < 2050 else dt.year - 100
        dt = dt.replace(year=year)
    return dt.replace(tzinfo=datetime.timezone.utc)


def _string(tag: int, raw: bytes) -> str:
    if tag == 0x1E:  # BMPString
        return raw.decode("utf-16-be")
    if tag in (0x0C, 0x13, 0x16, 0x14, 0x1A):  # UTF8, Printable, IA5, T61, Visible
        return raw.decode("utf-8" if tag == 0x0C else "latin-1")
    raise DERError(f"unsupported string tag {tag:#x}")


def parse_certificate(der: bytes) -> Certificate:
    """Read the fields the agent needs from one DER certificate."""
    try:
        return _parse(der)
    except (IndexError, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, DERError):
            raise
        raise DERError(f"malformed certificate: {e}") from None


def _parse(der: bytes) -> Certificate:
    tag, s, e, nxt = _tlv(der, 0, len(der))
    if tag != 0x30:
        raise DERError("a certificate is a SEQUENCE")
    if nxt != len(der):
        raise DERError("trailing bytes after the certificate")
    cert = _children(der, s, e)
    if len(cert) != 3:
        raise DERError("a certificate has three parts")
    ts, te = _expect(cert[0], 0x30, "tbsCertificate")
    tbs = _children(der, ts, te)
    i = 1 if tbs and tbs[0][0] == 0xA0 else 0  # [0] version
    # serial, signature algorithm, issuer, validity, subject, spki, then extensions
    if len(tbs) < i + 6:
        raise DERError("tbsCertificate too short")
    vs, ve = _expect(tbs[i + 3], 0x30, "validity")
    validity = _children(der, vs, ve)
    if len(validity) != 2:
        raise DERError("validity has two times")
    not_before = _time(validity[0][0], der[validity[0][1] : validity[0][2]])
    not_after = _time(validity[1][0], der[validity[1][1] : validity[1][2]])
    subject = tbs[i + 4]
    ss, se = _expect(subject, 0x30, "subject")
    cns: list[str] = []
    for rdn in _children(der, ss, se):
        rs, re_ = _expect(rdn, 0x31, "RDN")
        for atv in _children(der, rs, re_):
            a_s, a_e = _expect(atv, 0x30, "AttributeTypeAndValue")
            parts = _children(der, a_s, a_e)
            if len(parts) != 2:
                raise DERError("bad attribute")
            os_, oe = _expect(parts[0], 0x06, "attribute type")
            if _oid(der[os_:oe]) == OID_CN:
                cns.append(_string(parts[1][0], der[parts[1][1] : parts[1][2]]))
    spki_item = tbs[i + 5]
    ks, ke = _expect(spki_item, 0x30, "subjectPublicKeyInfo")
    spki = der[spki_item[3] : ke]
    spki_parts = _children(der, ks, ke)
    algs, alge = _expect(spki_parts[0], 0x30, "algorithm")
    alg = _children(der, algs, alge)
    aos, aoe = _expect(alg[0], 0x06, "algorithm OID")
    alg_oid = _oid(der[aos:aoe])
    san: list[tuple[str, str]] = []
    eku: frozenset[str] | None = None
    for item in tbs[i + 6 :]:
        if item[0] != 0xA3:  # [3] extensions ([1], [2] unique ids are skipped)
            continue
        xs, xe = _expect(_children(der, item[1], item[2])[0], 0x30, "extensions")
        for ext in _children(der, xs, xe):
            es, ee = _expect(ext, 0x30, "extension")
            fields = _children(der, es, ee)
            eos, eoe = _expect(fields[0], 0x06, "extension OID")
            oid = _oid(der[eos:eoe])
            vs_, ve_ = _expect(fields[-1], 0x04, "extension value")
            if oid == OID_SAN:
                san = _san(der, vs_, ve_)
            elif oid == OID_EKU:
                eku = _eku(der, vs_, ve_)
    return Certificate(
        der=der,
        common_name=cns[0] if cns else None,
        san=tuple(san),
        eku=eku,
        not_before=not_before,
        not_after=not_after,
        key_type=KEY_ALGORITHMS.get(alg_oid, alg_oid),
        spki=spki,
        common_names=tuple(cns),
    )


def _san(der: bytes, start: int, end: int) -> list[tuple[str, str]]:
    ss, se = _expect(_tlv(der, start, end), 0x30, "subjectAltName")
    out = []
    for tag, s, e, _ in _children(der, ss, se):
        raw = der[s:e]
        if tag == 0x82:
            out.append(("dns", raw.decode("ascii")))
        elif tag == 0x86:
            out.append(("uri", raw.decode("ascii")))
        elif tag == 0x81:
            out.append(("email", raw.decode("ascii")))
        elif tag == 0x87:
            out.append(("ip", str(ipaddress.ip_address(raw))))
    return out


def _eku(der: bytes, start: int, end: int) -> frozenset[str]:
    ss, se = _expect(_tlv(der, start, end), 0x30, "extendedKeyUsage")
    out = set()
    for item in _children(der, ss, se):
        os_, oe = _expect(item, 0x06, "key purpose")
        out.add(_oid(der[os_:oe]))
    return frozenset(out)
