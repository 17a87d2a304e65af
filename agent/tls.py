"""Certificates and keys: validation, cipher policy, rotation, identities.

No gRPC import at module level: :func:`set_cipher_policy` must run before
grpc is first imported (grpc reads ``GRPC_SSL_CIPHER_SUITES`` once, at
import), so the agent's entry point calls it first and imports the server
afterwards.

What is enforced and why:

* A private key readable or writable by group or others, or owned by a
  user other than the agent's, is refused: anyone who can read it can
  impersonate the agent.
* A certificate that is expired or not yet valid, or does not match its
  key, is refused at start-up and on rotation (the old pair stays).
* TLS 1.0/1.1 are never offered (BoringSSL in grpc refuses them). TLS 1.2
  is offered only with ECDHE key exchange and AEAD ciphers.
* "TLS 1.3 only": grpcio has no minimum-version setting, so the TLS 1.2
  cipher list is restricted to suites that need a certificate of the other
  key type (ECDHE-RSA suites for an ECDSA key, ECDHE-ECDSA for an RSA key).
  No TLS 1.2 handshake can complete; TLS 1.3 suites are not affected.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
import stat
import threading
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent import x509

log = logging.getLogger(__name__)

ECDSA_SUITES = [
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
]
RSA_SUITES = [
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305",
]


class TLSConfigError(Exception):
    """A certificate, key or CA file is unusable; the message says which and why."""


@dataclass(frozen=True)
class KeyPair:
    """A validated certificate chain and its key, as PEM bytes."""

    cert_pem: bytes
    key_pem: bytes
    key_type: str  # "ec" or "rsa"
    subject: str
    not_after: datetime.datetime
    fingerprint: str  # sha256 of the leaf, hex


def set_cipher_policy(key_type: str, tls13_only: bool) -> str:
    """Set ``GRPC_SSL_CIPHER_SUITES`` for this process; call before importing grpc."""
    if tls13_only:
        suites = RSA_SUITES if key_type == "ec" else ECDSA_SUITES
    else:
        suites = ECDSA_SUITES + RSA_SUITES
    value = ":".join(suites)
    os.environ["GRPC_SSL_CIPHER_SUITES"] = value
    return value


def check_key_file(path: Path) -> None:
    """Refuse a key file that others can read or write, or that is not ours."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise TLSConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise TLSConfigError(f"{path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise TLSConfigError(f"{path}: not a regular file")
    if st.st_mode & 0o077:
        raise TLSConfigError(
            f"{path}: private key is accessible by group or others (mode "
            f"{st.st_mode & 0o777:04o}); run: chmod 600 {path}"
        )
    if st.st_uid != os.geteuid():
        raise TLSConfigError(
            f"{path}: private key is owned by uid {st.st_uid}, not by the agent's user "
            f"(uid {os.geteuid()})"
        )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(f"{path}: {what} file does not exist") from None
    except OSError as e:
        raise TLSConfigError(f"{path}: cannot read {what}: {e.strerror}") from None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def check_validity(
    cert: x509.Certificate, where: str, now: datetime.datetime | None = None
) -> None:
    """Refuse a certificate outside its validity period."""
    now = now or _now()
    if now < cert.not_before:
        raise TLSConfigError(
            f"{where}: certificate is not valid before {cert.not_before:%Y-%m-%d %H:%M:%S} UTC"
        )
    if now > cert.not_after:
        raise TLSConfigError(
            f"{where}: certificate expired on {cert.not_after:%Y-%m-%d %H:%M:%S} UTC"
        )


def _certificates(pem: bytes, where: str, what: str) -> list[x509.Certificate]:
    try:
        ders = x509.pem_certificates(pem)
        certs = [x509.parse_certificate(d) for d in ders]
    except x509.DERError as e:
        raise TLSConfigError(f"{where}: not a valid PEM {what}: {e}") from None
    if not certs:
        raise TLSConfigError(f"{where}: not a PEM {what} (no CERTIFICATE block)")
    return certs


def load_key_pair(crt_file: Path, key_file: Path, *, check_owner: bool = True) -> KeyPair:
    """Read and validate a certificate (chain) and its private key.

    The key is checked against the certificate by OpenSSL (``ssl`` module),
    the dates and key type are read from the certificate's DER.
    """
    if check_owner:
        check_key_file(key_file)
    cert_pem = _read(crt_file, "certificate")
    key_pem = _read(key_file, "private key")
    leaf = _certificates(cert_pem, str(crt_file), "certificate")[0]
    if b"ENCRYPTED" in key_pem:
        raise TLSConfigError(
            f"{key_file}: private key is encrypted; the agent needs it "
            "unencrypted (protect it with file permissions)"
        )
    if b"PRIVATE KEY-----" not in key_pem:
        raise TLSConfigError(f"{key_file}: not a PEM private key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

    def no_password() -> bytes:
        raise TLSConfigError(f"{key_file}: private key is encrypted")

    try:
        ctx.load_cert_chain(str(crt_file), str(key_file), password=no_password)
    except ssl.SSLError as e:
        text = f"{e.reason or ''} {e}".upper()
        if "MISMATCH" in text:
            raise TLSConfigError(
                f"{key_file}: private key does not match the certificate {crt_file}"
            ) from None
        raise TLSConfigError(
            f"{key_file}: not a usable PEM private key ({e.reason or e})"
        ) from None
    check_validity(leaf, str(crt_file))
    return KeyPair(
        cert_pem=cert_pem,
        key_pem=key_pem,
        key_type=leaf.key_type,
        subject=leaf.subject,
        not_after=leaf.not_after,
        fingerprint=leaf.fingerprint,
    )


def load_ca(ca_file: Path) -> bytes:
    """Read a CA bundle; refuse an empty or unparsable one or an expired CA."""
    pem = _read(ca_file, "CA")
    certs = _certificates(pem, str(ca_file), "CA bundle")
    try:
        ssl.create_default_context(cafile=str(ca_file))
    except ssl.SSLError as e:
        raise TLSConfigError(
            f"{ca_file}: OpenSSL cannot use it as a CA bundle: {e.reason or e}"
        ) from None
    valid = []
    for c in certs:
        try:
            check_validity(c, str(ca_file))
            valid.append(c)
        except TLSConfigError as e:
            log.warning("%s", e)
    if not valid:
        raise TLSConfigError(f"{ca_file}: every CA certificate in it is expired or not yet valid")
    return pem


# ---------------------------------------------------------------- expiry


@dataclass(frozen=True)
class CertExpiry:
    """When one loaded certificate expires (for warnings and a metric)."""

    role: str  # "server", "ca", "scheduler-client", "scheduler-ca"
    file: str
    subject: str
    not_after: datetime.datetime
    seconds_left: float

    @property
    def days_left(self) -> float:
        """Days until notAfter (negative once expired)."""
        return self.seconds_left / 86400.0


def certificate_expiry(
    role: str, file: Path | str, pem: bytes, now: datetime.datetime | None = None
) -> list[CertExpiry]:
    """One :class:`CertExpiry` per certificate in ``pem`` (a leaf, chain or CA bundle).

    Pure apart from the clock; unparsable blocks are skipped (loading has
    refused them already).
    """
    now = now or _now()
    out = []
    for der in x509.pem_certificates(pem):
        try:
            c = x509.parse_certificate(der)
        except x509.DERError:
            continue
        out.append(
            CertExpiry(role, str(file), c.subject, c.not_after, (c.not_after - now).total_seconds())
        )
    return out


def expiry_warnings(items: list[CertExpiry], days: int) -> list[str]:
    """Warning lines for the certificates of ``items`` expiring within ``days`` (0: none)."""
    if days <= 0:
        return []
    return [
        f"{e.role} certificate {e.subject} in {e.file} expires on "
        f"{e.not_after:%Y-%m-%d %H:%M} UTC, in {e.days_left:.1f} days: issue and install "
        "a new one (it is picked up without a restart)"
        for e in items
        if e.seconds_left < days * 86400
    ]


# ---------------------------------------------------------------- rotation


def _file_sig(*paths: Path | None) -> tuple[object, ...]:
    out: list[object] = []
    for p in paths:
        if p is None:
            out.append(None)
            continue
        try:
            st = os.stat(p)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        except OSError:
            out.append("missing")
    return tuple(out)


@dataclass(frozen=True)
class ServerTLSState:
    """What the server currently serves with."""

    pair: KeyPair
    ca_pem: bytes | None


class CertificateReloader:
    """Watches certificate, key and CA files; validates and swaps them in.

    gRPC calls :meth:`fetch` on every new connection, so it only compares
    file signatures (inode, size, mtime, ctime) unless something changed.
    A broken new set is logged once and the previous one stays in use;
    running jobs and open connections are never affected.
    """

    def __init__(
        self,
        crt_file: Path,
        key_file: Path,
        ca_file: Path | None,
        *,
        key_type_locked: str | None = None,
        on_change: Callable[[ServerTLSState], None] | None = None,
        expiry_warning_days: int = 0,
    ) -> None:
        self.crt_file, self.key_file, self.ca_file = crt_file, key_file, ca_file
        self.expiry_warning_days = expiry_warning_days
        self._lock = threading.Lock()
        self._sig = _file_sig(crt_file, key_file, ca_file)
        self.state = self._load()
        self._key_type_locked = key_type_locked
        self._failed_sig: tuple[object, ...] | None = None
        # Why the files on disk are refused (the previous set stays in use); None if not.
        self.error: str | None = None
        self._on_change = on_change
        # Bumped on every successful reload; the gRPC fetcher compares it
        # with the version it last handed to gRPC.
        self.version = 0

    def _load(self) -> ServerTLSState:
        pair = load_key_pair(self.crt_file, self.key_file)
        ca = load_ca(self.ca_file) if self.ca_file else None
        return ServerTLSState(pair, ca)

    def expiry(self, state: ServerTLSState | None = None) -> list[str]:
        """Expiry warnings for the served certificate chain and CA bundle."""
        state = state or self.state
        items = certificate_expiry("server", self.crt_file, state.pair.cert_pem)[:1]
        if state.ca_pem is not None and self.ca_file is not None:
            items += certificate_expiry("ca", self.ca_file, state.ca_pem)
        return expiry_warnings(items, self.expiry_warning_days)

    def check(self) -> ServerTLSState | None:
        """Reload if the files changed; return the new state, or None if unchanged/broken."""
        with self._lock:
            sig = _file_sig(self.crt_file, self.key_file, self.ca_file)
            if sig == self._sig:
                self.error = None
            if sig == self._sig or sig == self._failed_sig:
                return None
            try:
                state = self._load()
                if self._key_type_locked and state.pair.key_type != self._key_type_locked:
                    raise TLSConfigError(
                        f"{self.key_file}: key type changed from {self._key_type_locked} to "
                        f"{state.pair.key_type}; with tls13_only this needs a restart"
                    )
            except TLSConfigError as e:
                if self._failed_sig != sig:
                    log.error(
                        "certificate rotation rejected, still serving %s: %s",
                        self.state.pair.subject,
                        e,
                    )
                self._failed_sig = sig
                self.error = str(e)
                return None
            self._sig = sig
            self._failed_sig = None
            self.error = None
            self.state = state
            self.version += 1
            log.info(
                "certificates reloaded: now serving %s (sha256 %s, valid until %s)",
                state.pair.subject,
                state.pair.fingerprint[:16],
                f"{state.pair.not_after:%Y-%m-%d}",
            )
            for w in self.expiry(state):
                log.warning("%s", w)
        if self._on_change:
            self._on_change(state)
        return state


# ---------------------------------------------------------------- identities


@dataclass(frozen=True)
class PeerCert:
    """What the agent needs from a verified client certificate."""

    identity: str
    client_auth: bool  # extendedKeyUsage allows clientAuth (explicitly)
    problem: str  # non-empty: why this certificate may not be used
    # Every subjectAltName, for identity patterns (agent.access.matches).
    sans: tuple[tuple[str, str], ...] = ()


# Keyed by the certificate's PEM bytes themselves (an exact match, no digest
# to compute on every call).
_peer_cache: dict[bytes, PeerCert] = {}
_peer_lock = threading.Lock()


def identity_from_cert(pem: bytes) -> PeerCert:
    """The identity of a (handshake-verified) client certificate.

    The identity is the subject's one Common Name; a certificate without a
    CN uses its one identity-bearing subjectAltName (DNS name, URI or
    e-mail). Anything that could be read as two identities is refused with
    a ``problem`` (the caller answers UNAUTHENTICATED and audits it):

    * more than one CN (``CN=admin, CN=mallory``: some readers take the
      first, others the last, and a CA checking one may have missed the
      other);
    * no CN and more than one DNS/URI/e-mail SAN (which one is "the" name
      would be an accident of order);
    * a CN or SAN with control or format characters, leading or trailing
      white space, or DN syntax characters (``,+=;"\\<>``): such a name
      prints like another subject (``admin,CN=x``) in logs and in every
      tool that shows the DN as a string.

    A certificate whose extendedKeyUsage is missing or does not include
    clientAuth is not a client certificate and gets a ``problem`` too:
    BoringSSL refuses an EKU without clientAuth during the handshake, but
    lets a certificate with no EKU at all through, so this check closes
    that gap.
    """
    hit = _peer_cache.get(pem)
    if hit is not None:
        return hit
    try:
        certs = x509.pem_certificates(pem)
        cert = x509.parse_certificate(certs[0])
    except (x509.DERError, IndexError):
        return PeerCert("", False, "unparsable client certificate")
    names = [v for k, v in cert.san if k in ("dns", "uri", "email")]
    problem = ""
    ident = ""
    if len(cert.common_names) > 1:
        problem = (
            f"client certificate subject has {len(cert.common_names)} Common Names; "
            "exactly one is accepted"
        )
    elif cert.common_names:
        ident = cert.common_names[0]
    elif len(names) > 1:
        problem = (
            "client certificate has no Common Name and several subjectAltNames; "
            "the identity would be ambiguous"
        )
    elif names:
        ident = names[0]
    client_auth = cert.eku is not None and x509.OID_CLIENT_AUTH in cert.eku
    if problem:
        pass
    elif not ident:
        problem = "client certificate has neither a Common Name nor a subjectAltName"
    elif not client_auth:
        problem = (
            "client certificate is not for client authentication (extendedKeyUsage "
            "clientAuth missing)"
        )
    else:
        problem = _identity_problem(ident, from_cn=bool(cert.common_names))
    result = PeerCert(ident, client_auth, problem, cert.san)
    with _peer_lock:
        if len(_peer_cache) > 4096:
            _peer_cache.clear()
        _peer_cache[pem] = result
    return result


# Characters with a meaning in a distinguished name's string form (RFC 4514).
_DN_SPECIAL = frozenset(',+=;"\\<>#')


def _identity_problem(ident: str, *, from_cn: bool) -> str:
    """Why ``ident`` cannot be used as an identity, or ""."""
    for ch in ident:
        if (
            ord(ch) < 0x20
            or 0x7F <= ord(ch) < 0xA0
            or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")
        ):
            return "client certificate identity contains control or format characters"
        # Only a CN is part of the DN string; e-mail SANs may have '+'.
        if from_cn and ch in _DN_SPECIAL:
            return (
                f"client certificate identity contains {ch!r}, which would make it read "
                "as a different subject"
            )
    if ident != ident.strip():
        return "client certificate identity has leading or trailing white space"
    return ""
