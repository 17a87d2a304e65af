"""Certificate revocation lists: which client certificates are no longer accepted.

``[auth] crl_files`` names one CRL per CA of ``grpc_server.ca_file``. A CRL
is accepted only if it verifies against a CA of that bundle (its issuer
name equals the CA's subject and the CA's key verifies its signature) and
is current (``thisUpdate <= now <= nextUpdate``). The server asks
:meth:`RevocationChecker.revoked` on every RPC with the peer's certificate:
its serial is looked up in the CRL of its issuer.

What is refused, and why:

* at start-up, a CRL that cannot be read, does not verify or is expired is
  a configuration error (the operator asked for revocation: starting without
  it would admit revoked clients);
* at run time (the file changed, or SIGHUP), the same problems keep the CRL
  that was loaded before and log an error once per bad version of the file:
  a truncated upload must not lift every revocation, and it must not lock
  out every client either;
* a certificate whose issuer has no configured CRL is not checked here (the
  handshake already verified it against the CA bundle): configure a CRL for
  every CA that issues client certificates.

Signature checks need `cryptography`, imported on first use only, so an
agent without ``crl_files`` does not pay its memory (see agent/x509.py).
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# File signatures are compared at most this often from the RPC path.
RECHECK_SECONDS = 1.0


class CRLError(Exception):
    """A CRL file is unusable; the message names the file and the reason."""


@dataclass(frozen=True)
class LoadedCRL:
    """One verified, current CRL."""

    path: Path
    issuer: bytes  # DER of the issuer Name (the CA's subject)
    issuer_text: str
    revoked: frozenset[int]
    this_update: datetime.datetime
    next_update: datetime.datetime | None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _ca_certs(ca_pem: bytes) -> list[Any]:
    from cryptography import x509

    return list(x509.load_pem_x509_certificates(ca_pem))


def load_crl(path: Path, ca_pem: bytes, now: datetime.datetime | None = None) -> LoadedCRL:
    """Read, verify and date-check one CRL; raise :class:`CRLError` saying why not."""
    from cryptography import x509

    now = now or _now()
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CRLError(f"{path}: cannot read: {e.strerror}") from None
    try:
        crl = (
            x509.load_pem_x509_crl(data)
            if b"-----BEGIN X509 CRL-----" in data
            else x509.load_der_x509_crl(data)
        )
    except ValueError as e:
        raise CRLError(f"{path}: not a PEM or DER CRL ({e})") from None
    issuer = crl.issuer.public_bytes()
    candidates = [c for c in _ca_certs(ca_pem) if c.subject.public_bytes() == issuer]
    if not candidates:
        raise CRLError(
            f"{path}: issued by {crl.issuer.rfc4514_string()}, which is not a CA of the "
            "configured CA bundle"
        )
    # Security: only a CRL signed by the CA itself may revoke (or, by its
    # absence of entries, "un-revoke") that CA's certificates.
    if not any(_signature_ok(crl, c) for c in candidates):
        raise CRLError(
            f"{path}: signature does not verify against the CA {crl.issuer.rfc4514_string()}"
        )
    this_update = crl.last_update_utc
    next_update = crl.next_update_utc
    if this_update > now:
        raise CRLError(f"{path}: not valid before {this_update:%Y-%m-%d %H:%M:%S} UTC")
    if next_update is not None and next_update < now:
        raise CRLError(
            f"{path}: expired on {next_update:%Y-%m-%d %H:%M:%S} UTC (nextUpdate); "
            "publish a fresh CRL"
        )
    return LoadedCRL(
        path=path,
        issuer=issuer,
        issuer_text=crl.issuer.rfc4514_string(),
        revoked=frozenset(r.serial_number for r in crl),
        this_update=this_update,
        next_update=next_update,
    )


def _signature_ok(crl: Any, ca: Any) -> bool:
    try:
        return bool(crl.is_signature_valid(ca.public_key()))
    except (TypeError, ValueError):
        return False


def _sig(path: Path) -> object:
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class RevocationChecker:
    """The CRLs of ``[auth] crl_files``, reloaded when a file (or the CA) changes.

    Raises :class:`CRLError` from the constructor if any CRL is unusable.
    """

    def __init__(self, paths: tuple[Path, ...], ca_file: Path) -> None:
        self.paths = paths
        self.ca_file = ca_file
        self._lock = threading.Lock()
        self._peers: dict[bytes, tuple[bytes, int]] = {}
        ca_pem = self._ca()
        self._crls: dict[Path, LoadedCRL] = {p: load_crl(p, ca_pem) for p in paths}
        self._sigs = {p: _sig(p) for p in (*paths, ca_file)}
        self._failed: dict[Path, object] = {}
        # Why each file (or the CA bundle) was last rejected; cleared when it loads.
        self._errors: dict[Path, str] = {}
        self._next_check = time.monotonic() + RECHECK_SECONDS
        self._index()

    def _ca(self) -> bytes:
        try:
            return self.ca_file.read_bytes()
        except OSError as e:
            raise CRLError(f"{self.ca_file}: cannot read the CA bundle: {e.strerror}") from None

    def _index(self) -> None:
        by_issuer: dict[bytes, set[int]] = {}
        for c in self._crls.values():
            by_issuer.setdefault(c.issuer, set()).update(c.revoked)
        self._by_issuer = {k: frozenset(v) for k, v in by_issuer.items()}

    @property
    def crls(self) -> tuple[LoadedCRL, ...]:
        """The CRLs in force."""
        return tuple(self._crls[p] for p in self.paths)

    @property
    def errors(self) -> tuple[str, ...]:
        """Why files checked last were rejected (their previous CRLs stay); empty if none."""
        with self._lock:
            return tuple(self._errors.values())

    def check(self, *, force: bool = False) -> bool:
        """Reload CRL files that changed (all of them if ``force``); True if any did.

        A file that fails to load keeps its previous CRL; the error is logged
        once per version of the file.
        """
        with self._lock:
            self._next_check = time.monotonic() + RECHECK_SECONDS
            ca_changed = _sig(self.ca_file) != self._sigs[self.ca_file]
            changed = [
                p
                for p in self.paths
                if force or ca_changed or _sig(p) != self._sigs[p] or p in self._failed
            ]
            if not changed and not ca_changed:
                return False
            self._sigs[self.ca_file] = _sig(self.ca_file)
            try:
                ca_pem = self._ca()
            except CRLError as e:
                log.error("CRL reload rejected, keeping the loaded CRLs: %s", e)
                self._errors[self.ca_file] = str(e)
                return False
            self._errors.pop(self.ca_file, None)
            reloaded = False
            for p in changed:
                sig = _sig(p)
                if not force and p in self._failed and self._failed[p] == sig:
                    continue
                try:
                    new = load_crl(p, ca_pem)
                except CRLError as e:
                    if self._failed.get(p) != sig:
                        log.error("CRL reload rejected, keeping the previous one: %s", e)
                    self._failed[p] = sig
                    self._errors[p] = str(e)
                    continue
                self._failed.pop(p, None)
                self._errors.pop(p, None)
                self._sigs[p] = sig
                reloaded = True
                self._crls[p] = new
                log.info(
                    "CRL %s loaded: %d revoked certificate%s of %s",
                    p,
                    len(new.revoked),
                    "" if len(new.revoked) == 1 else "s",
                    new.issuer_text,
                )
            self._index()
            return reloaded

    def _peer(self, pem: bytes) -> tuple[bytes, int]:
        hit = self._peers.get(pem)
        if hit is not None:
            return hit
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(pem)
        out = (cert.issuer.public_bytes(), cert.serial_number)
        if len(self._peers) > 4096:
            self._peers.clear()
        self._peers[pem] = out
        return out

    def revoked(self, pem: bytes) -> str:
        """Why the (handshake-verified) client certificate ``pem`` is revoked, or ""."""
        if time.monotonic() >= self._next_check:
            self.check()
        try:
            issuer, serial = self._peer(pem)
        except ValueError:
            return "unparsable client certificate"
        if serial in self._by_issuer.get(issuer, frozenset()):
            return f"client certificate (serial {serial:x}) has been revoked"
        return ""
