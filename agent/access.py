"""Access rules: who may call, see, stop and list what. Pure, shared by all programs.

One :class:`Caller` is built per RPC from the verified peer identity and the
configured :class:`AccessRules`; every question the code asks about access
is a method on it, so deny-by-default is decided in one place:

* the Worker service asks :meth:`Caller.may_call` before anything else;
* the job code asks :meth:`Caller.may_see` / :meth:`Caller.may_stop` of a
  job's owner and :meth:`Caller.list_owner` for ListJobs;
* the reference scheduler keeps one :class:`AccessRules` per role (its
  ``workers`` and ``users`` lists) and asks :meth:`Caller.may_act_as`.

The rules raise :class:`AccessDenied` (a PermissionDenied in the daemon's
vocabulary, see :mod:`agent.daemon.errors`) with a message that names only
what the caller already knows: its own identity, the job id it gave.
"""

from __future__ import annotations

from dataclasses import dataclass

# The identity of a caller when the agent runs without mTLS and the operator
# explicitly allowed anonymous callers (development only).
ANONYMOUS = "anonymous"


class AccessDenied(Exception):
    """The caller may not do this; ``rule`` names the rule (for the audit log)."""

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message)
        self.message = message
        self.rule = rule


def matches(patterns: frozenset[str], identity: str) -> bool:
    """True if ``identity`` is one of ``patterns`` (exact names)."""
    return identity in patterns


@dataclass(frozen=True)
class AccessRules:
    """The configured lists: who may call at all, and who is an admin."""

    clients: frozenset[str] = frozenset()
    admins: frozenset[str] = frozenset()
    allow_anonymous: bool = False
    mtls: bool = True

    def allows(self, identity: str) -> bool:
        """True if ``identity`` may use the API at all (deny by default)."""
        if matches(self.clients, identity) or matches(self.admins, identity):
            return True
        return identity == ANONYMOUS and self.allow_anonymous and not self.mtls

    def caller(self, identity: str) -> Caller:
        """The :class:`Caller` for a verified identity."""
        return Caller(
            identity=identity, admin=matches(self.admins, identity), allowed=self.allows(identity)
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
