"""Revocation: CRLs made by openssl, checked on every RPC, reloaded on change and SIGHUP."""

from __future__ import annotations

import datetime
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from agent._proto import jobscheduler_pb2 as pb
from agent.crl import CRLError, RevocationChecker, load_crl

import certfactory as cf
from helpers import AgentProcess, Certs, wait_for

AgentFactory = Callable[..., AgentProcess]
JOB = "00000000-0000-4000-8000-000000000000"


class OpenSSLCA:
    """The test CA driven by `openssl ca` (index, revoke, gencrl)."""

    def __init__(self, certs: Certs, d: Path) -> None:
        self.certs = certs
        self.d = d
        d.mkdir(exist_ok=True)
        (d / "index.txt").write_text("")
        (d / "crlnumber").write_text("01\n")
        self.conf = d / "ca.cnf"
        self.conf.write_text(
            f"""[ca]
default_ca = ca
[ca]
database = {d}/index.txt
crlnumber = {d}/crlnumber
certificate = {certs.ca}
private_key = {certs.dir}/ca.key
default_md = sha256
default_crl_days = 7
"""
        )

    def _ssl(self, *args: str) -> None:
        subprocess.run(
            ["openssl", "ca", "-config", str(self.conf), *args], check=True, capture_output=True
        )

    def revoke(self, cert: Path) -> None:
        self._ssl("-revoke", str(cert))

    def crl(self, out: Path, *, der: bool = False) -> Path:
        tmp = out.with_suffix(".tmp")
        self._ssl("-gencrl", "-out", str(tmp))
        if der:
            subprocess.run(
                ["openssl", "crl", "-in", str(tmp), "-outform", "DER", "-out", str(tmp)],
                check=True,
            )
        tmp.replace(out)
        return out


@pytest.fixture
def ossl(certs: Certs, tmp_path: Path) -> OpenSSLCA:
    return OpenSSLCA(certs, tmp_path / "ca")


def _query(a: AgentProcess, identity: str) -> grpc.StatusCode:
    with a.stub(identity) as stub:
        try:
            stub.QueryJob(pb.QueryJobReq(jobID=JOB), timeout=10)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_openssl_crl_loads_pem_and_der(ossl: OpenSSLCA, certs: Certs, tmp_path: Path) -> None:
    """A CRL from `openssl ca -gencrl` loads in PEM and DER with the revoked serial."""
    ossl.revoke(certs.crt("client"))
    serial = int(
        subprocess.run(
            ["openssl", "x509", "-in", str(certs.crt("client")), "-noout", "-serial"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("=")[1],
        16,
    )
    ca = certs.ca.read_bytes()
    for der in (False, True):
        c = load_crl(ossl.crl(tmp_path / f"c{der}.crl", der=der), ca)
        assert c.revoked == frozenset([serial])


def test_revoked_client_refused_after_file_change_and_audited(
    make_agent: AgentFactory, ossl: OpenSSLCA, tmp_path: Path, certs: Certs
) -> None:
    """Revoking 'client' in the CRL file ends its calls (UNAUTHENTICATED, audited); others go on."""
    crl = ossl.crl(tmp_path / "ca.crl")
    a = make_agent(auth={"clients": ["client"], "admins": ["admin"], "crl_files": [str(crl)]})
    assert _query(a, "client") == grpc.StatusCode.NOT_FOUND
    ossl.revoke(certs.crt("client"))
    ossl.crl(crl)
    wait_for(lambda: _query(a, "client") == grpc.StatusCode.UNAUTHENTICATED, timeout=10)
    assert _query(a, "admin") == grpc.StatusCode.NOT_FOUND
    denied = [r for r in a.audit_lines() if r.get("rule") == "revoked-client-cert"]
    assert denied and "revoked" in denied[-1]["reason"]


def test_sighup_reloads_the_crl(
    make_agent: AgentFactory, ossl: OpenSSLCA, tmp_path: Path, certs: Certs
) -> None:
    """After SIGHUP a newly revoked admin is refused; the agent keeps running."""
    crl = ossl.crl(tmp_path / "ca.crl")
    a = make_agent(auth={"clients": ["client"], "admins": ["admin"], "crl_files": [str(crl)]})
    ossl.revoke(certs.crt("admin"))
    ossl.crl(crl)
    a.signal(signal.SIGHUP)
    wait_for(lambda: "CRL" in a.log() and "loaded" in a.log(), timeout=10)
    assert _query(a, "admin") == grpc.StatusCode.UNAUTHENTICATED
    assert _query(a, "client") == grpc.StatusCode.NOT_FOUND


def test_bad_crl_at_runtime_keeps_the_old_one(
    make_agent: AgentFactory, ossl: OpenSSLCA, tmp_path: Path, certs: Certs
) -> None:
    """A CRL of another CA, or an expired one, replacing a good file is refused and logged."""
    ossl.revoke(certs.crt("client"))
    crl = ossl.crl(tmp_path / "ca.crl")
    a = make_agent(auth={"clients": ["client"], "admins": ["admin"], "crl_files": [str(crl)]})
    assert _query(a, "client") == grpc.StatusCode.UNAUTHENTICATED
    crl.write_bytes(cf.make_crl(cf.make_ca("other"), []))
    a.signal(signal.SIGHUP)
    wait_for(lambda: "CRL reload rejected" in a.log(), timeout=10)
    assert "not a CA of the configured CA bundle" in a.log()
    assert _query(a, "client") == grpc.StatusCode.UNAUTHENTICATED  # still revoked
    assert a.proc is not None and a.proc.poll() is None


def _dev_issuer(certs: Certs) -> cf.Issuer:
    return cf.load_issuer(certs.ca, certs.dir / "ca.key")


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda i: cf.make_crl(cf.make_ca("other"), []), "not a CA of the configured CA bundle"),
        (
            lambda i: cf.make_crl(
                i, [], last_update=cf.NOW - 9 * cf.DAY, next_update=cf.NOW - cf.DAY
            ),
            "expired",
        ),
        (lambda i: cf.make_crl(i, [], last_update=cf.NOW + cf.DAY), "not valid before"),
        (lambda i: b"garbage", "not a PEM or DER CRL"),
    ],
)
def test_unusable_crl_is_a_config_error_at_start(
    make: Callable[[cf.Issuer], bytes], problem: str, certs: Certs, tmp_path: Path
) -> None:
    """Foreign, expired, future or garbage CRLs: start-up refused (exit 2) naming the key."""
    crl = tmp_path / "bad.crl"
    crl.write_bytes(make(_dev_issuer(certs)))
    with pytest.raises(CRLError, match=problem):
        RevocationChecker((crl,), certs.ca)
    a = AgentProcess(
        tmp_path / "a",
        certs,
        "version: 1\nentries: []\n",
        auth={"clients": ["client"], "crl_files": [str(crl)]},
    )
    r = subprocess.run(
        [sys.executable, "-m", "agent", "check-config", "-c", str(a.config_path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "[auth] crl_files" in r.stderr and problem in r.stderr


def test_forged_signature_is_refused(certs: Certs, tmp_path: Path) -> None:
    """A CRL naming our CA as issuer but signed by another key does not verify."""
    impostor = cf.make_ca("x")
    real = _dev_issuer(certs)
    forged = cf.make_crl(cf.Issuer(real.cert, impostor.key), [])
    (tmp_path / "f.crl").write_bytes(forged)
    with pytest.raises(CRLError, match="signature does not verify"):
        load_crl(tmp_path / "f.crl", certs.ca.read_bytes())


def test_unrelated_issuer_is_not_checked(certs: Certs, tmp_path: Path) -> None:
    """A certificate of a CA without a CRL passes the revocation check (the handshake decides)."""
    other = cf.make_ca("other CA")
    cert, _ = cf.host_leaf(other, "x")
    (tmp_path / "c.crl").write_bytes(cf.make_crl(_dev_issuer(certs), [cert.serial_number]))
    chk = RevocationChecker((tmp_path / "c.crl",), certs.ca)
    assert chk.revoked(cf.pem(cert)) == ""
    mine, _ = cf.host_leaf(_dev_issuer(certs), "y", serial=cert.serial_number)
    assert "revoked" in chk.revoked(cf.pem(mine))
    assert datetime.datetime.now(datetime.timezone.utc) < chk.crls[0].next_update  # type: ignore[operator]
