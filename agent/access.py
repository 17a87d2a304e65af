"""Access rules: who may call, see, stop and list what. Pure, shared by all programs.

One :class:`Caller` is built per RPC from the verified peer identity and the
configured :class:`AccessRules`; every question the code asks about access
is a method on it, so deny-by-default is decided in one place:

* the Worker service asks :meth:`Caller.may_call` before anything else;
* the job code asks :meth:`Caller.may_see` / :meth:`Caller.may_stop` of a
  job's owner and :meth:`Caller.list_owner` for ListJobs;
* the reference scheduler keeps one :class:`AccessRules` per role (its
  ``workers`` and ``users`` lists) and asks :meth:`Caller.may_act_as`.

Entries of the lists (``[auth] clients``/``admins``, the scheduler's
``workers``/``users``) are exact names or patterns (:func:`pattern_problem`
says which are valid):

* an exact name matches the caller's identity (the certificate's one Common
  Name, or its one SAN when it has no CN) and, when it is a SPIFFE ID, also
  a URI SAN equal to it;
* ``*.agents.example.com`` matches a DNS SAN of exactly one more label
  (``h1.agents.example.com``; not ``a.b.agents.example.com``, not
  ``agents.example.com``, not a SAN that itself holds ``*``);
* ``spiffe://example.com/worker/`` (ending in ``/``) matches a URI SAN that
  is a well-formed SPIFFE ID under that path (``.../worker/h1``); the
  trailing ``/`` keeps ``.../workers-evil/x`` out.

Precedence: there is none to get wrong, because every entry only grants.
A caller is allowed if any entry of any list matches; it is an admin if any
entry of ``admins`` matches. Exact names are looked up first (a set), then
the patterns in order; the first hit decides nothing more than "yes".

The rules raise :class:`AccessDenied` (a :class:`~agent.refusal.PermissionDenied`,
so it maps to PERMISSION_DENIED like every other refusal) with a message that
names only what the caller already knows: its own identity, the job id it gave.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

from agent.refusal import PermissionDenied

# The identity of a caller when the agent runs without mTLS and the operator
# explicitly allowed anonymous callers (development only).
ANONYMOUS = "anonymous"


class AccessDenied(PermissionDenied):
    """The caller may not do this; ``rule`` names the rule (for the audit log)."""

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message, rule=rule)


# A SAN as the certificate reader gives it: ("dns" | "uri" | "email" | "ip", value).
San = tuple[str, str]

# One DNS label, letters-digits-hyphen (RFC 1123), compared in lower case.
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
# SPIFFE ID (spiffe.io/spiffe-id): lower-case trust domain, path segments of
# [A-Za-z0-9._-], no empty, "." or ".." segments, no query or fragment.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+\Z")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+\Z")
SPIFFE = "spiffe://"


def dns_name_ok(name: str) -> bool:
    """True for a lower-case DNS name of LDH labels (no wildcard, no empty label)."""
    labels = name.split(".")
    return len(name) <= 253 and all(_LABEL.match(label) for label in labels)


def spiffe_id_parts(value: str) -> tuple[str, list[str]] | None:
    """(trust domain, path segments) of a well-formed SPIFFE ID, else None."""
    if not value.startswith(SPIFFE) or len(value) > 2048:
        return None
    rest = value[len(SPIFFE) :]
    td, _, path = rest.partition("/")
    if not _TRUST_DOMAIN.match(td):
        return None
    segments = path.split("/") if path else []
    for seg in segments:
        if seg in (".", "..") or not _SEGMENT.match(seg):
            return None
    return td, segments


def pattern_problem(entry: str) -> str:
    """Why ``entry`` is not a valid list entry, or "" (for config validation).

    Entries with ``*`` must be a one-label DNS wildcard over at least two
    labels (``*.example.com``; ``*.com`` or ``a*.example.com`` are refused);
    entries starting with ``spiffe://`` must be a SPIFFE ID or an ID prefix
    ending in ``/``. Anything else is an exact name.
    """
    if not entry:
        return "an empty identity matches nothing"
    if entry.startswith(SPIFFE):
        body = entry[:-1] if entry.endswith("/") else entry
        parts = spiffe_id_parts(body)
        if parts is None:
            return (
                f"{entry!r} is not a SPIFFE ID (spiffe://trust-domain/path, lower-case trust "
                "domain, segments of letters, digits, '.', '_' or '-')"
            )
        if entry.endswith("/") and not parts[1] and body.endswith("/"):
            return f"{entry!r}: a SPIFFE prefix ends in exactly one '/'"
        return ""
    if "*" in entry:
        if not entry.startswith("*.") or "*" in entry[2:]:
            return (
                f"{entry!r}: a wildcard is only allowed as the whole first label "
                "(like *.agents.example.com)"
            )
        suffix = entry[2:].lower()
        if suffix.count(".") < 1 or not dns_name_ok(suffix):
            return f"{entry!r}: a wildcard needs a DNS name of at least two labels after '*.'"
        return ""
    return ""


def identity_problem(name: str) -> str:
    """Why ``name`` cannot stand for one caller's identity, or "" (for config validation).

    An identity is what a certificate names (see :func:`agent.tls.identity_from_cert`):
    one exact name without control or format characters or surrounding white space,
    never a pattern; one starting with ``spiffe://`` is a whole SPIFFE ID.
    """
    if not name:
        return "an empty identity names no caller"
    if name != name.strip():
        return f"{name!r} has leading or trailing white space"
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp") for ch in name):
        return f"{name!r} contains control or format characters"
    if "*" in name or (name.startswith(SPIFFE) and name.endswith("/")):
        return f"{name!r} is a pattern; name one identity"
    if name.startswith(SPIFFE) and spiffe_id_parts(name) is None:
        return pattern_problem(name)
    return ""


def identity_sans(name: str) -> tuple[San, ...]:
    """The subjectAltNames of a certificate whose one name is ``name`` (for patterns).

    A SPIFFE ID is a URI SAN, a DNS name of two labels or more a DNS SAN; any other
    name has none, and only exact entries match it.
    """
    if name.startswith(SPIFFE):
        return (("uri", name),)
    if "." in name and dns_name_ok(name.lower()):
        return (("dns", name),)
    return ()


def _wildcard_match(suffix: str, sans: Iterable[San]) -> bool:
    for kind, value in sans:
        if kind != "dns":
            continue
        name = value.lower()
        head, dot, rest = name.partition(".")
        # Exactly one label in front of the suffix, and that label a real
        # one: a SAN "*.agents.example.com" (a wildcard certificate) or
        # "a.b.agents..." (two labels deep) does not match.
        if dot and rest == suffix and _LABEL.match(head):
            return True
    return False


def _spiffe_prefix_match(prefix: str, sans: Iterable[San]) -> bool:
    for kind, value in sans:
        if (
            kind == "uri"
            and value.startswith(prefix)
            and len(value) > len(prefix)
            and spiffe_id_parts(value) is not None
        ):
            return True
    return False


def matches(patterns: frozenset[str], identity: str, sans: Iterable[San] = ()) -> bool:
    """True if ``identity`` or one of the certificate's ``sans`` matches an entry.

    See the module docstring for the three kinds of entries. Fails closed:
    a malformed SAN matches no pattern.
    """
    if identity in patterns:
        return True
    sans = tuple(sans)
    if not sans:
        return False
    for p in patterns:
        if p.startswith(SPIFFE):
            if p.endswith("/"):
                if _spiffe_prefix_match(p, sans):
                    return True
            elif ("uri", p) in sans:
                return True
        elif p.startswith("*.") and _wildcard_match(p[2:].lower(), sans):
            return True
    return False


@dataclass(frozen=True)
class AccessRules:
    """The configured lists: who may call at all, and who is an admin."""

    clients: frozenset[str] = frozenset()
    admins: frozenset[str] = frozenset()
    allow_anonymous: bool = False
    mtls: bool = True

    def allows(self, identity: str, sans: Iterable[San] = ()) -> bool:
        """True if ``identity`` (with its certificate's ``sans``) may use the API at all."""
        sans = tuple(sans)
        if matches(self.clients, identity, sans) or matches(self.admins, identity, sans):
            return True
        return identity == ANONYMOUS and self.allow_anonymous and not self.mtls

    def caller(self, identity: str, sans: Iterable[San] = ()) -> Caller:
        """The :class:`Caller` for a verified identity and its certificate's SANs."""
        sans = tuple(sans)
        return Caller(
            identity=identity,
            admin=matches(self.admins, identity, sans),
            allowed=self.allows(identity, sans),
        )


@dataclass(frozen=True)
class Caller:
    """One caller of one RPC, with every access question the code asks."""

    identity: str
    admin: bool = False
    allowed: bool = True

    def may_call(self) -> None:
        """Raise AccessDenied unless this identity may use the API."""
        if not self.allowed:
            raise AccessDenied(
                f"identity {self.identity!r} is not allowed to use this agent",
                "identity-not-allowed",
            )

    def may_act_as(self, role: str) -> None:
        """Raise AccessDenied unless this identity is on the list that grants ``role``."""
        if not self.allowed:
            raise AccessDenied(
                f"identity {self.identity!r} is not allowed as a {role}", f"not-a-{role}"
            )

    def can_see(self, owner: str) -> bool:
        """True if the caller may see a job of ``owner``."""
        return self.admin or owner == self.identity

    def may_see(self, job_id: str, owner: str) -> None:
        """Raise AccessDenied unless the caller may see job ``job_id`` of ``owner``."""
        if not self.can_see(owner):
            raise AccessDenied(f"job {job_id} belongs to another identity", "not-job-owner")

    def may_stop(self, job_id: str, owner: str) -> None:
        """Raise AccessDenied unless the caller may stop job ``job_id`` of ``owner``."""
        self.may_see(job_id, owner)

    def list_owner(self, requested: str) -> str | None:
        """The owner filter for ListJobs (None: every owner, admins only)."""
        if self.admin:
            return requested or None
        if requested and requested != self.identity:
            raise AccessDenied("only an admin may list another identity's jobs", "list-other-owner")
        return self.identity
