"""Identity patterns: one-label DNS wildcards and SPIFFE ID prefixes, matched on SANs.

50 host certificates are issued by ``agent pki`` code from one CA; the near
misses are certificates an attacker or a sloppy CA could produce.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from agent._proto import jobscheduler_pb2 as pb
from agent._proto import jobscheduler_pb2_grpc as pb_grpc
from agent.access import AccessRules, matches, pattern_problem
from agent.configfile import ConfigError
from agent.daemon import pki
from agent.keeper.config import parse
from agent.scheduler.config import load_config
from agent.tls import identity_from_cert

import certfactory as cf
from helpers import AgentProcess, Certs, SchedulerProcess, to_toml

AgentFactory = Callable[..., AgentProcess]

WILDCARD = "*.agents.example.com"
SPIFFE_PREFIX = "spiffe://example.com/worker/"
HOSTS = [f"h{i:02d}.agents.example.com" for i in range(50)]

# (cn, dns SANs, uri SANs): none of these may match WILDCARD or SPIFFE_PREFIX.
NEAR_MISSES = {
    "two labels deep": ("x", ("a.b.agents.example.com",), ()),
    "the bare suffix": ("x", ("agents.example.com",), ()),
    "suffix glued to a label": ("x", ("evilagents.example.com",), ()),
    "suffix followed by more": ("x", ("h1.agents.example.com.evil.net",), ()),
    "trailing dot": ("x", ("h1.agents.example.com.",), ()),
    "wildcard in the certificate": ("x", ("*.agents.example.com",), ()),
    "partial wildcard label": ("x", ("h*.agents.example.com",), ()),
    "empty label": ("x", (".agents.example.com",), ()),
    "only the CN matches": ("h1.agents.example.com", (), ()),
    "spiffe: sibling path": ("x", (), ("spiffe://example.com/workers/h1",)),
    "spiffe: the prefix itself": ("x", (), ("spiffe://example.com/worker/",)),
    "spiffe: no trailing segment": ("x", (), ("spiffe://example.com/worker",)),
    "spiffe: other trust domain": ("x", (), ("spiffe://example.com.evil/worker/h1",)),
    "spiffe: dot-dot segment": ("x", (), ("spiffe://example.com/worker/../admin",)),
    "spiffe: empty segment": ("x", (), ("spiffe://example.com/worker//h1",)),
    "spiffe: upper-case scheme": ("x", (), ("SPIFFE://example.com/worker/h1",)),
    "spiffe: query": ("x", (), ("spiffe://example.com/worker/h1?x=1",)),
}


def _issue(ca: cf.Issuer, host: str, kind: str = "client") -> tuple[bytes, bytes]:
    """(cert PEM, key PEM) the way `agent pki issue` makes them."""
    key = pki.new_key()
    sans = pki.host_names(host, [], ["10.1.0.1"], "example.com")
    cert = pki.sign(ca.cert, ca.key, pki._subject(host), key.public_key(), sans, kind, 30)
    from cryptography.hazmat.primitives import serialization

    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cf.pem(cert), key_pem


@pytest.fixture(scope="module")
def fleet_ca() -> cf.Issuer:
    return cf.make_ca("fleet CA")


@pytest.fixture(scope="module")
def fleet(fleet_ca: cf.Issuer) -> dict[str, bytes]:
    """Client certificates of 50 hosts, by host name."""
    return {h: _issue(fleet_ca, h)[0] for h in HOSTS}


def _near_miss(ca: cf.Issuer, case: str) -> bytes:
    cn, dns, uris = NEAR_MISSES[case]
    cert, _ = cf.host_leaf(ca, cn, dns=dns, uris=uris)
    return cf.pem(cert)


def _allowed(rules: AccessRules, pem_bytes: bytes) -> bool:
    peer = identity_from_cert(pem_bytes)
    return not peer.problem and rules.allows(peer.identity, peer.sans)


@pytest.mark.parametrize("pattern", [WILDCARD, SPIFFE_PREFIX])
def test_one_pattern_admits_fifty_hosts(pattern: str, fleet: dict[str, bytes]) -> None:
    """A single wildcard or SPIFFE prefix admits every one of the 50 issued hosts."""
    rules = AccessRules(clients=frozenset([pattern]))
    assert [h for h, p in fleet.items() if not _allowed(rules, p)] == []


@pytest.mark.parametrize("case", sorted(NEAR_MISSES))
@pytest.mark.parametrize("pattern", [WILDCARD, SPIFFE_PREFIX])
def test_near_misses_are_refused(pattern: str, case: str, fleet_ca: cf.Issuer) -> None:
    """Two labels deep, suffix tricks, a wildcard SAN, odd SPIFFE IDs: no pattern matches."""
    rules = AccessRules(clients=frozenset([pattern]), admins=frozenset([pattern]))
    assert not _allowed(rules, _near_miss(fleet_ca, case))


def test_exact_names_still_match_the_identity_only() -> None:
    """An exact entry matches the identity (CN), not a DNS SAN of the same text."""
    sans = (("dns", "h1.agents.example.com"),)
    assert matches(frozenset(["h1"]), "h1", sans)
    assert not matches(frozenset(["h1.agents.example.com"]), "h1", sans)


def test_exact_spiffe_id_matches_the_uri_san() -> None:
    """An exact SPIFFE ID entry matches a URI SAN equal to it, and nothing longer."""
    sid = "spiffe://example.com/worker/h1"
    assert matches(frozenset([sid]), "h1", (("uri", sid),))
    assert not matches(frozenset([sid]), "h1", (("uri", sid + "0"),))


def test_wildcard_is_case_insensitive() -> None:
    """DNS names compare without case, as DNS does."""
    assert matches(frozenset(["*.Agents.Example.com"]), "x", (("dns", "H1.AGENTS.example.COM"),))


def test_admin_patterns_make_admins() -> None:
    """A caller matching an admins pattern is an admin; a clients pattern is not."""
    rules = AccessRules(clients=frozenset([WILDCARD]), admins=frozenset(["*.ops.example.com"]))
    ops = rules.caller("o1", (("dns", "o1.ops.example.com"),))
    worker = rules.caller("h1", (("dns", "h1.agents.example.com"),))
    assert ops.allowed and ops.admin
    assert worker.allowed and not worker.admin


@pytest.mark.parametrize(
    "entry",
    [
        "*.com",
        "a*.example.com",
        "*.*.example.com",
        "h1.*.example.com",
        "*.exa mple.com",
        "spiffe://Example.com/worker/",
        "spiffe://example.com/worker//",
        "spiffe://example.com/../worker/",
        "spiffe://example.com/worker/h1?x",
    ],
)
def test_bad_patterns_are_config_errors(entry: str, tmp_path: Path) -> None:
    """A malformed pattern is refused at start-up naming [auth] clients, before any call."""
    assert pattern_problem(entry)
    text = to_toml(
        {
            "grpc_server": {"crt_file": "s.crt", "key_file": "s.key", "ca_file": "ca.crt"},
            "auth": {"clients": [entry]},
            "jobs": {"policy_file": "p.yaml"},
        }
    )
    with pytest.raises(ConfigError) as e:
        parse(text, tmp_path / "config.toml")
    assert "[auth] clients" in str(e.value)


@pytest.mark.parametrize("entry", [WILDCARD, SPIFFE_PREFIX, "spiffe://example.com/", "client"])
def test_good_patterns_are_accepted(entry: str) -> None:
    """Wildcards, SPIFFE prefixes and exact names pass validation."""
    assert pattern_problem(entry) == ""


def test_scheduler_config_refuses_bad_worker_pattern(tmp_path: Path, certs: Certs) -> None:
    """The scheduler's [auth] workers is validated the same way."""
    p = tmp_path / "s.toml"
    p.write_text(
        to_toml(
            {
                "server": {
                    "crt_file": str(certs.crt("scheduler")),
                    "key_file": str(certs.key("scheduler")),
                    "ca_file": str(certs.ca),
                },
                "auth": {"workers": ["*.com"]},
                "agents": {
                    "crt_file": str(certs.crt("scheduler")),
                    "key_file": str(certs.key("scheduler")),
                    "ca_file": str(certs.ca),
                },
            }
        )
    )
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "[auth] workers" in str(e.value)


def _fleet_certs(certs: Certs, d: Path) -> Certs:
    """A Certs dir with the dev CA and the scheduler's pair (workers bring their own)."""
    d.mkdir()
    for name in ("ca", "scheduler"):
        shutil.copy(certs.dir / f"{name}.crt", d / f"{name}.crt")
    shutil.copy(certs.key("scheduler"), d / "scheduler.key")
    return Certs(d)


def test_scheduler_allow_list_with_one_pattern_over_mtls(tmp_path: Path, certs: Certs) -> None:
    """A real scheduler allowing "*.agents.example.com" registers 50 hosts, refuses misses."""
    dev_ca = cf.load_issuer(certs.ca, certs.dir / "ca.key")
    d = _fleet_certs(certs, tmp_path / "c")
    s = SchedulerProcess(tmp_path / "s", d, workers=[WILDCARD]).start()
    ca_pem = certs.ca.read_bytes()
    try:

        def register(cert_pem: bytes, key_pem: bytes) -> grpc.StatusCode:
            creds = grpc.ssl_channel_credentials(ca_pem, key_pem, cert_pem)
            with grpc.secure_channel(s.addr, creds) as ch:
                try:
                    pb_grpc.SchedulerStub(ch).RegisterWorker(
                        pb.RegisterReq(address="127.0.0.1:1"), timeout=10
                    )
                except grpc.RpcError as e:
                    return e.code()
            return grpc.StatusCode.OK

        codes = {h: register(*_issue(dev_ca, h)) for h in HOSTS}
        assert set(codes.values()) == {grpc.StatusCode.OK}
        for case in ("two labels deep", "suffix glued to a label", "wildcard in the certificate"):
            cn, dns, uris = NEAR_MISSES[case]
            cert, key = cf.host_leaf(dev_ca, cn, dns=dns, uris=uris)
            _, key_pem = cf.write_pair(tmp_path, case.replace(" ", "_"), cert, key)
            assert register(cf.pem(cert), key_pem.read_bytes()) == (
                grpc.StatusCode.PERMISSION_DENIED
            ), case
    finally:
        s.stop()


def test_agent_clients_pattern_over_mtls(
    make_agent: AgentFactory, certs: Certs, tmp_path: Path
) -> None:
    """[auth] clients with a SPIFFE prefix: a host cert may call, a near miss may not."""
    a = make_agent(auth={"clients": [SPIFFE_PREFIX], "admins": ["admin"]})
    dev_ca = cf.load_issuer(certs.ca, certs.dir / "ca.key")
    good_cert, good_key = _issue(dev_ca, "h07.agents.example.com")
    bad, bad_key = cf.host_leaf(dev_ca, "x", uris=("spiffe://example.com/workers/h07",))
    _, bad_key_path = cf.write_pair(tmp_path, "bad", bad, bad_key)
    ca_pem = certs.ca.read_bytes()

    def query(cert_pem: bytes, key_pem: bytes) -> grpc.StatusCode:
        creds = grpc.ssl_channel_credentials(ca_pem, key_pem, cert_pem)
        with grpc.secure_channel(a.addr, creds) as ch:
            try:
                pb_grpc.WorkerStub(ch).QueryJob(
                    pb.QueryJobReq(jobID="00000000-0000-4000-8000-000000000000"), timeout=10
                )
            except grpc.RpcError as e:
                return e.code()
        return grpc.StatusCode.OK

    assert query(good_cert, good_key) == grpc.StatusCode.NOT_FOUND  # past the access check
    assert query(cf.pem(bad), bad_key_path.read_bytes()) == grpc.StatusCode.PERMISSION_DENIED


def test_pki_args_are_what_the_tests_use() -> None:
    """The `agent pki` parser exists with issue, csr and sign."""
    p = argparse.ArgumentParser()
    pki.add_parser(p.add_subparsers(dest="cmd"))
    args = p.parse_args(["pki", "csr", "--host", "h1", "--trust-domain", "t", "--out", "/x"])
    assert args.pki_cmd == "csr"
