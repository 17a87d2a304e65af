"""``agent pki``: per-host certificates from the operator's existing CA.

Three commands (``agent pki --help``):

* ``issue``: on the CA's machine, make a host's key pairs and sign them:
  ``server.crt``/``server.key`` (the agent's listener, serverAuth) and
  ``client.crt``/``client.key`` (the agent's client certificate for the
  scheduler, clientAuth);
* ``csr``: on the host, make the keys and certificate signing requests; the
  keys never leave the host;
* ``sign``: on the CA's machine, sign such a request.

Every certificate names the host the same way: Common Name ``<host>``, DNS
SANs (``--dns``, default the host if it has a dot), IP SANs (``--ip``) and
the URI SAN ``spiffe://<trust-domain>/worker/<host>`` (``--role`` changes
``worker``, e.g. for the scheduler's own client certificate), so that identity
patterns (``*.agents.example.com``, ``spiffe://example.com/worker/``) match
it. Keys are ECDSA P-256, written mode 0600 and never overwritten.

Uses `cryptography`, imported inside the functions: ``agent run`` builds
this parser but must not pay cryptography's memory (see agent/x509.py).
Errors are :class:`PKIError` with a message naming the file.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.access import dns_name_ok, spiffe_id_parts

KINDS = ("server", "client")
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?\Z")


class PKIError(Exception):
    """Bad input or an unusable file; the message says which and why."""


def spiffe_id(trust_domain: str, host: str, role: str = "worker") -> str:
    """``spiffe://<trust-domain>/<role>/<host>``, validated."""
    sid = f"spiffe://{trust_domain}/{role}/{host}"
    if spiffe_id_parts(sid) is None:
        raise PKIError(
            f"{sid!r} is not a valid SPIFFE ID (lower-case trust domain; host of letters, "
            "digits, '.', '-')"
        )
    return sid


def host_names(
    host: str, dns: Sequence[str], ips: Sequence[str], trust_domain: str, role: str = "worker"
) -> list[Any]:
    """The subjectAltNames of a host's certificates."""
    from cryptography import x509

    if not _HOST.match(host) or ".." in host:
        raise PKIError(f"--host {host!r}: expected a host name")
    names = list(dns) or ([host] if "." in host else [])
    out: list[Any] = []
    for n in names:
        if not dns_name_ok(n.lower()):
            raise PKIError(f"--dns {n!r}: not a DNS name (a wildcard is never issued to a host)")
        out.append(x509.DNSName(n.lower()))
    for i in ips:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(i)))
        except ValueError:
            raise PKIError(f"--ip {i!r}: not an IP address") from None
    out.append(x509.UniformResourceIdentifier(spiffe_id(trust_domain, host, role)))
    return out


def new_key() -> Any:
    """A fresh ECDSA P-256 key."""
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def write_key(path: Path, key: Any) -> None:
    """Write a PEM private key, mode 0600; never overwrite (O_EXCL)."""
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise PKIError(f"{path}: exists; move it away first (keys are never overwritten)") from None
    except OSError as e:
        raise PKIError(f"{path}: cannot create: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write(path: Path, data: bytes) -> None:
    try:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.chmod(tmp, 0o644)
        # Atomic replace: a running agent picks the new certificate up whole.
        os.replace(tmp, path)
    except OSError as e:
        raise PKIError(f"{path}: cannot write: {e.strerror}") from None


def load_ca(cert_file: Path, key_file: Path) -> tuple[Any, Any]:
    """The CA certificate and its key; refuses a pair that does not match or a non-CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except OSError as e:
        raise PKIError(f"{cert_file}: cannot read: {e.strerror}") from None
    except ValueError:
        raise PKIError(f"{cert_file}: not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except OSError as e:
        raise PKIError(f"{key_file}: cannot read: {e.strerror}") from None
    except (ValueError, TypeError) as e:
        raise PKIError(f"{key_file}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise PKIError(f"{key_file}: only EC and RSA CA keys are supported")
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if key.public_key().public_bytes(enc, pub) != cert.public_key().public_bytes(enc, pub):
        raise PKIError(f"{key_file}: does not match the CA certificate {cert_file}")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise PKIError(f"{cert_file}: not a CA certificate (basicConstraints CA:TRUE missing)")
    return cert, key


def sign(
    ca_cert: Any,
    ca_key: Any,
    subject: Any,
    public_key: Any,
    sans: list[Any],
    kind: str,
    days: int,
) -> Any:
    """Sign a host certificate of ``kind`` ("server" or "client")."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID

    if kind not in KINDS:
        raise PKIError(f"--kind {kind!r}: expected server or client")
    now = datetime.datetime.now(datetime.timezone.utc)
    not_after = now + datetime.timedelta(days=days)
    if not_after > ca_cert.not_valid_after_utc:
        raise PKIError(
            f"--days {days}: the CA expires on {ca_cert.not_valid_after_utc:%Y-%m-%d}, before "
            "the certificate would"
        )
    eku = ExtendedKeyUsageOID.SERVER_AUTH if kind == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    return builder.sign(ca_key, hashes.SHA256())


def _pem(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(cert.public_bytes(serialization.Encoding.PEM))


def _subject(host: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])


def _out_dir(path: Path) -> Path:
    try:
        path.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as e:
        raise PKIError(f"{path}: cannot create: {e.strerror}") from None
    return path


def issue(args: argparse.Namespace) -> list[Path]:
    """``agent pki issue``: keys and certificates for one host; returns the files written."""

    ca_cert, ca_key = load_ca(args.ca_cert, args.ca_key)
    sans = host_names(args.host, args.dns, args.ip, args.trust_domain, args.role)
    out = _out_dir(args.out)
    written = []
    for kind in args.kind:
        key = new_key()
        cert = sign(ca_cert, ca_key, _subject(args.host), key.public_key(), sans, kind, args.days)
        write_key(out / f"{kind}.key", key)
        _write(out / f"{kind}.crt", _pem(cert))
        written += [out / f"{kind}.crt", out / f"{kind}.key"]
    _write(out / "ca.crt", _pem(ca_cert))
    written.append(out / "ca.crt")
    return written


def csr(args: argparse.Namespace) -> list[Path]:
    """``agent pki csr``: keys stay here; the CSRs go to the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    sans = host_names(args.host, args.dns, args.ip, args.trust_domain, args.role)
    out = _out_dir(args.out)
    written = []
    for kind in args.kind:
        key = new_key()
        req = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(_subject(args.host))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(key, hashes.SHA256())
        )
        write_key(out / f"{kind}.key", key)
        _write(out / f"{kind}.csr", req.public_bytes(serialization.Encoding.PEM))
        written += [out / f"{kind}.key", out / f"{kind}.csr"]
    return written


def sign_csr(args: argparse.Namespace) -> list[Path]:
    """``agent pki sign``: sign one CSR made by ``agent pki csr`` (or any tool)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    ca_cert, ca_key = load_ca(args.ca_cert, args.ca_key)
    try:
        req = x509.load_pem_x509_csr(args.csr.read_bytes())
    except OSError as e:
        raise PKIError(f"{args.csr}: cannot read: {e.strerror}") from None
    except ValueError:
        raise PKIError(f"{args.csr}: not a PEM certificate signing request") from None
    if not req.is_signature_valid:
        raise PKIError(f"{args.csr}: the request's signature does not verify")
    cns = req.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise PKIError(f"{args.csr}: expected exactly one Common Name (the host)")
    host = str(cns[0].value)
    try:
        requested = list(req.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        requested = []
    dns = [n.value for n in requested if isinstance(n, x509.DNSName)]
    ips = [str(n.value) for n in requested if isinstance(n, x509.IPAddress)]
    others = [n for n in requested if not isinstance(n, (x509.DNSName, x509.IPAddress))]
    # Security: the CA decides the SPIFFE ID (from --trust-domain and the CN);
    # a URI or any other name the requester slipped in is refused, not copied.
    want_uri = x509.UniformResourceIdentifier(spiffe_id(args.trust_domain, host, args.role))
    if any(n != want_uri for n in others):
        raise PKIError(
            f"{args.csr}: requests names other than DNS, IP and {want_uri.value}: "
            f"{', '.join(str(n.value) for n in others if n != want_uri)}"
        )
    sans = host_names(host, dns, ips, args.trust_domain, args.role)
    cert = sign(ca_cert, ca_key, _subject(host), req.public_key(), sans, args.kind, args.days)
    _write(args.out, _pem(cert))
    return [args.out]


def add_parser(sub: Any) -> None:
    """Add ``pki`` and its subcommands to the ``agent`` command's subparsers."""
    p = sub.add_parser(
        "pki",
        help="issue per-host certificates from an existing CA",
        description=(
            "Per-host certificates: CN=<host>, DNS and IP SANs, and the URI SAN "
            "spiffe://<trust-domain>/worker/<host>. See docs/deployment.md."
        ),
    )
    ps = p.add_subparsers(dest="pki_cmd", required=True)

    def names(q: argparse.ArgumentParser) -> None:
        q.add_argument("--host", required=True, help="host name (CN and SPIFFE path)")
        q.add_argument("--dns", action="append", default=[], help="DNS SAN (repeat)")
        q.add_argument("--ip", action="append", default=[], help="IP SAN (repeat)")
        q.add_argument(
            "--trust-domain", required=True, help="SPIFFE trust domain, e.g. example.com"
        )
        role(q)

    def role(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--role",
            default="worker",
            help="first SPIFFE path segment (default worker; e.g. scheduler for its client)",
        )

    def kinds(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--kind",
            action="append",
            choices=KINDS,
            help="server and/or client (default: both)",
        )

    def ca(q: argparse.ArgumentParser) -> None:
        q.add_argument("--ca-cert", type=Path, required=True, help="CA certificate (PEM)")
        q.add_argument("--ca-key", type=Path, required=True, help="CA private key (PEM)")
        q.add_argument("--days", type=int, default=90, help="validity in days (default 90)")

    i = ps.add_parser("issue", help="make keys and certificates for a host (on the CA machine)")
    ca(i)
    names(i)
    kinds(i)
    i.add_argument("--out", type=Path, required=True, help="directory for the files")
    c = ps.add_parser("csr", help="make keys and CSRs on the host (keys never leave it)")
    names(c)
    kinds(c)
    c.add_argument("--out", type=Path, required=True, help="directory for the files")
    s = ps.add_parser("sign", help="sign a CSR made by `agent pki csr` (on the CA machine)")
    ca(s)
    s.add_argument("--csr", type=Path, required=True, help="the request (PEM)")
    s.add_argument("--kind", choices=KINDS, required=True, help="server or client")
    s.add_argument("--trust-domain", required=True, help="SPIFFE trust domain the CA issues for")
    role(s)
    s.add_argument("--out", type=Path, required=True, help="certificate file to write")


def run(args: argparse.Namespace) -> list[Path]:
    """Carry out a parsed ``agent pki`` command; raises :class:`PKIError`."""
    if getattr(args, "days", 1) < 1:
        raise PKIError("--days must be at least 1")
    if args.pki_cmd in ("issue", "csr"):
        args.kind = args.kind or list(KINDS)
        args.kind = list(dict.fromkeys(args.kind))
    if args.pki_cmd == "issue":
        return issue(args)
    if args.pki_cmd == "csr":
        return csr(args)
    return sign_csr(args)
