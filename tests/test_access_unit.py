"""The access rules (agent.access) on plain data: who may call, see, stop and list what.

No certificates and no server: identities and SANs are the strings the certificate
reader would give. The patterns against real certificates and real agents are
tests/test_identity_patterns.py; the gate in front of health and reflection is
tests/test_access_gate.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.access import (
    ANONYMOUS,
    AccessDenied,
    AccessRules,
    Caller,
    San,
    dns_name_ok,
    matches,
    pattern_problem,
    spiffe_id_parts,
)
from agent.refusal import PermissionDenied
from agent.vocabulary import Kind

RULES = AccessRules(clients=frozenset({"alice", "bob"}), admins=frozenset({"root"}))
names = st.text(alphabet="abcdefghij.-*/:", min_size=1, max_size=12)


def _denied(call: Callable[[], object]) -> AccessDenied:
    """The AccessDenied a zero-argument call raises."""
    with pytest.raises(AccessDenied) as e:
        call()
    return e.value


# ---------------------------------------------------------------- who may call


def test_a_listed_client_may_call_and_is_not_an_admin() -> None:
    """An identity on the clients list is allowed and is no admin."""
    alice = RULES.caller("alice")
    alice.may_call()
    assert alice.allowed and not alice.admin


def test_an_admin_may_call_without_being_a_client() -> None:
    """The admins list grants use of the API by itself; admins need not be clients too."""
    root = RULES.caller("root")
    root.may_call()
    assert root.allowed and root.admin
    assert RULES.allows("root")


def test_an_unlisted_identity_is_refused_naming_only_itself() -> None:
    """Deny by default: an unlisted caller gets PERMISSION_DENIED with its own name and the
    rule for the audit log, and nothing of the lists."""
    e = _denied(RULES.caller("mallory").may_call)
    assert isinstance(e, PermissionDenied) and e.kind is Kind.PERMISSION_DENIED
    assert e.rule == "identity-not-allowed"
    assert e.message == "identity 'mallory' is not allowed to use this agent"
    assert "alice" not in e.message and "root" not in e.message


def test_empty_rules_allow_nobody() -> None:
    """No lists at all: every identity, the anonymous one included, is refused."""
    rules = AccessRules()
    for who in ("alice", "", ANONYMOUS):
        assert not rules.allows(who)
        assert not rules.caller(who).allowed


def test_names_compare_exactly() -> None:
    """An exact entry is not a prefix, a case-insensitive or a trimmed match."""
    for who in ("Alice", "alice ", "alic", "alicex", " alice"):
        assert not RULES.allows(who), who


@pytest.mark.parametrize(
    ("allow_anonymous", "mtls", "allowed"),
    [(True, False, True), (True, True, False), (False, False, False), (False, True, False)],
)
def test_anonymous_only_without_mtls_and_when_allowed(
    allow_anonymous: bool, mtls: bool, allowed: bool
) -> None:
    """The anonymous caller is allowed only when the operator allowed it and mTLS is off
    (a client certificate naming "anonymous" cannot borrow the development setting)."""
    rules = AccessRules(allow_anonymous=allow_anonymous, mtls=mtls)
    assert rules.allows(ANONYMOUS) is allowed
    caller = rules.caller(ANONYMOUS)
    assert caller.allowed is allowed and not caller.admin
    assert not rules.allows("alice")  # the setting admits the anonymous identity only


def test_anonymous_is_no_admin_even_when_allowed() -> None:
    """Allowing anonymous callers gives them their own jobs, not everyone's."""
    caller = AccessRules(allow_anonymous=True, mtls=False).caller(ANONYMOUS)
    assert caller.allowed and not caller.admin
    assert not caller.can_see("alice")


def test_a_caller_by_hand_is_allowed_and_no_admin() -> None:
    """Caller's defaults: allowed, not an admin (the scheduler builds them per role)."""
    c = Caller("alice")
    assert c.allowed and not c.admin


def test_may_act_as_names_the_role_in_message_and_rule() -> None:
    """A caller not on a role's list is refused naming the role, with rule not-a-<role>."""
    Caller("w1").may_act_as("worker")
    e = _denied(lambda: Caller("w1", allowed=False).may_act_as("worker"))
    assert e.rule == "not-a-worker"
    assert e.message == "identity 'w1' is not allowed as a worker"


# ---------------------------------------------------------------- jobs


def test_an_owner_sees_and_stops_its_own_job() -> None:
    """The owner of a job may see and stop it."""
    alice = RULES.caller("alice")
    assert alice.can_see("alice")
    alice.may_see("j1", "alice")
    alice.may_stop("j1", "alice")


def test_another_identity_may_neither_see_nor_stop_a_job() -> None:
    """Someone else's job is refused with rule not-job-owner and a message naming only the
    job id the caller gave, never the owner."""
    bob = RULES.caller("bob")
    assert not bob.can_see("alice")
    for call in (lambda: bob.may_see("j1", "alice"), lambda: bob.may_stop("j1", "alice")):
        e = _denied(call)
        assert e.rule == "not-job-owner"
        assert e.message == "job j1 belongs to another identity"
        assert "alice" not in e.message


def test_an_admin_sees_and_stops_every_job() -> None:
    """Admins see and stop jobs of any owner."""
    root = RULES.caller("root")
    for owner in ("alice", "bob", ANONYMOUS, ""):
        assert root.can_see(owner)
        root.may_see("j", owner)
        root.may_stop("j", owner)


def test_ownership_is_exact() -> None:
    """A job of "alice2" is not alice's; the owner is compared as a whole string."""
    alice = RULES.caller("alice")
    assert not alice.can_see("alice2")
    assert not alice.can_see("Alice")
    assert not alice.can_see("")


def test_list_owner_of_a_client_is_always_itself() -> None:
    """A client lists its own jobs, whether it names itself or no owner at all."""
    alice = RULES.caller("alice")
    assert alice.list_owner("") == "alice"
    assert alice.list_owner("alice") == "alice"


def test_a_client_may_not_list_another_owner() -> None:
    """Asking for another identity's jobs is refused (rule list-other-owner)."""
    e = _denied(lambda: RULES.caller("alice").list_owner("bob"))
    assert e.rule == "list-other-owner"
    assert e.message == "only an admin may list another identity's jobs"


def test_list_owner_of_an_admin_is_what_it_asked_for() -> None:
    """An admin lists every owner (None) by default, or the one it names."""
    root = RULES.caller("root")
    assert root.list_owner("") is None
    assert root.list_owner("alice") == "alice"
    assert root.list_owner("root") == "root"


# ---------------------------------------------------------------- patterns and SANs


def test_an_exact_entry_does_not_match_a_san_of_the_same_text() -> None:
    """Exact names match the identity only: not a DNS, URI or email SAN equal to them."""
    entries = frozenset({"alice", "alice@example.com"})
    for san in (("dns", "alice"), ("uri", "alice"), ("email", "alice@example.com")):
        assert not matches(entries, "x", (san,)), san
    assert matches(entries, "alice@example.com")


def test_a_wildcard_or_spiffe_entry_does_not_match_the_identity_text() -> None:
    """Patterns look at SANs only: an identity (CN) spelling a name under them is not enough."""
    entries = frozenset({"*.agents.example.com", "spiffe://example.com/worker/"})
    assert not matches(entries, "h1.agents.example.com")
    assert not matches(entries, "spiffe://example.com/worker/h1")


def test_patterns_look_only_at_sans_of_their_kind() -> None:
    """A wildcard matches DNS SANs only and a SPIFFE entry URI SANs only."""
    wild = frozenset({"*.agents.example.com"})
    spiffe = frozenset({"spiffe://example.com/worker/", "spiffe://example.com/admin"})
    assert not matches(wild, "x", (("uri", "h1.agents.example.com"),))
    assert not matches(wild, "x", (("email", "h1.agents.example.com"),))
    assert not matches(spiffe, "x", (("dns", "spiffe://example.com/worker/h1"),))
    assert not matches(spiffe, "x", (("dns", "spiffe://example.com/admin"),))
    assert matches(spiffe, "x", (("uri", "spiffe://example.com/admin"),))


def test_any_matching_san_is_enough() -> None:
    """Several SANs: one that matches allows the caller, whatever the others are."""
    sans: list[San] = [("ip", "10.0.0.1"), ("dns", "a.b.example.com"), ("dns", "h1.example.com")]
    assert matches(frozenset({"*.example.com"}), "x", sans)
    assert not matches(frozenset({"*.example.com"}), "x", sans[:2])
    assert AccessRules(admins=frozenset({"*.example.com"})).caller("x", sans).admin


def test_sans_may_be_any_iterable_once() -> None:
    """A generator of SANs is read once for the clients and the admins check alike."""
    rules = AccessRules(admins=frozenset({"*.example.com"}))
    caller = rules.caller("x", (s for s in [("dns", "h1.example.com")]))
    assert caller.allowed and caller.admin


@given(identity=names, entries=st.frozensets(names, max_size=4))
def test_without_sans_only_an_exact_entry_matches(identity: str, entries: frozenset[str]) -> None:
    """Property: with no SANs, matching is set membership of the identity, nothing more."""
    assert matches(entries, identity) is (identity in entries)


@given(
    identity=names,
    clients=st.frozensets(names, max_size=3),
    admins=st.frozensets(names, max_size=3),
    dns=st.lists(names, max_size=3),
)
def test_an_admin_is_always_allowed(
    identity: str, clients: frozenset[str], admins: frozenset[str], dns: list[str]
) -> None:
    """Property: every admin may call; every list only grants (adding entries never refuses)."""
    sans = [("dns", d) for d in dns]
    rules = AccessRules(clients=clients, admins=admins)
    caller = rules.caller(identity, sans)
    if caller.admin:
        assert caller.allowed
    if caller.allowed:
        more = AccessRules(clients=clients | {"zz"}, admins=admins | {"*.zz.example"})
        assert more.caller(identity, sans).allowed


# ---------------------------------------------------------------- names and IDs


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("example.com", True),
        ("a", True),
        ("h-1.agents.example.com", True),
        ("0.example.com", True),
        ("Example.com", False),  # compared in lower case: the caller lower-cases first
        ("-a.example.com", False),
        ("a-.example.com", False),
        ("a..example.com", False),
        (".example.com", False),
        ("example.com.", False),
        ("*.example.com", False),
        ("a_b.example.com", False),
        ("a" * 64 + ".com", False),
        ("a" * 63 + ".com", True),
        (".".join(["a" * 63] * 4), False),  # 255 characters: over 253
        (".".join(["a" * 61] * 4) + ".ab", True),  # 247 characters
        ("", False),
    ],
)
def test_dns_name_ok(name: str, ok: bool) -> None:
    """LDH labels of 1 to 63 characters, no empty label, at most 253 characters."""
    assert dns_name_ok(name) is ok


def test_spiffe_id_parts_of_a_good_id() -> None:
    """A SPIFFE ID splits into its trust domain and its path segments."""
    assert spiffe_id_parts("spiffe://example.com/worker/h1") == ("example.com", ["worker", "h1"])
    assert spiffe_id_parts("spiffe://example.com") == ("example.com", [])
    assert spiffe_id_parts("spiffe://td/A.b_c-9") == ("td", ["A.b_c-9"])


@pytest.mark.parametrize(
    "value",
    [
        "https://example.com/worker",
        "SPIFFE://example.com/w",
        "spiffe://Example.com/w",
        "spiffe:///w",
        "spiffe://example.com/w/",
        "spiffe://example.com//w",
        "spiffe://example.com/./w",
        "spiffe://example.com/w/..",
        "spiffe://example.com/w?x=1",
        "spiffe://example.com/w#f",
        "spiffe://user@example.com/w",
        "spiffe://example.com:8443/w",
        "spiffe://example.com/" + "a" * 2048,
    ],
)
def test_spiffe_id_parts_refuses_what_is_not_a_spiffe_id(value: str) -> None:
    """Wrong scheme, upper-case trust domain, empty/dot segments, query, fragment, userinfo,
    port or over 2048 characters: not a SPIFFE ID."""
    assert spiffe_id_parts(value) is None


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("", "an empty identity matches nothing"),
        ("spiffe://example.com//", "a SPIFFE prefix ends in exactly one '/'"),
        ("spiffe://EXAMPLE.com/w", "is not a SPIFFE ID"),
        ("*", "a wildcard is only allowed as the whole first label"),
        ("*example.com", "a wildcard is only allowed as the whole first label"),
        ("*.*.example.com", "a wildcard is only allowed as the whole first label"),
        ("*.com", "a wildcard needs a DNS name of at least two labels after '*.'"),
        ("*.a..com", "a wildcard needs a DNS name of at least two labels after '*.'"),
    ],
)
def test_pattern_problem_says_what_is_wrong(entry: str, problem: str) -> None:
    """Each malformed entry gets the reason that fits it (shown in the config error)."""
    assert problem in pattern_problem(entry)


@pytest.mark.parametrize(
    "entry",
    ["alice", "CN with spaces", "spiffe://example.com/worker/h1", "spiffe://example.com/", "*.A.b"],
)
def test_pattern_problem_accepts_names_ids_and_prefixes(entry: str) -> None:
    """Exact names (anything without '*' or the SPIFFE scheme), IDs and prefixes are valid;
    a wildcard's suffix is checked in lower case."""
    assert pattern_problem(entry) == ""
