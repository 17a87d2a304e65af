"""Transport security over real TLS: certificates, refusals, ciphers, rotation."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

import certfactory as cf
from helpers import (
    IS_ROOT,
    ROOT,
    AgentFactory,
    AgentProcess,
    Certs,
    default_config,
    gen_certs,
    pb,
    pb_grpc,
    wait_for,
)

QUERY = pb.QueryJobReq(jobID="00000000-0000-4000-8000-000000000000")


# ---------------------------------------------------------------- gen_certs.sh


def test_gen_certs_makes_everything_with_private_keys(tmp_path: Path) -> None:
    """CA, server (P-256, SANs, serverAuth) and client certs; keys 0600 even with umask 000."""
    out = tmp_path / "c"
    r = subprocess.run(
        f"umask 000; {ROOT}/scripts/gen_certs.sh --out {out} --host node7.example --host 10.9.8.7",
        shell=True,
        capture_output=True,
        text=True,
        check=True,
    )
    for name in ("ca", "server", "client", "admin", "scheduler", "agent"):
        assert f"made  {out}/{name}.crt" in r.stdout
        assert (os.stat(out / f"{name}.key").st_mode & 0o777) == 0o600
    assert (os.stat(out).st_mode & 0o077) == 0
    server = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    assert server.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "node7.example"}
    assert {str(i) for i in san.get_values_for_type(x509.IPAddress)} == {
        "127.0.0.1",
        "::1",
        "10.9.8.7",
    }
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    for name in ("client", "admin", "agent"):
        c = x509.load_pem_x509_certificate((out / f"{name}.crt").read_bytes())
        assert list(c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
            ExtendedKeyUsageOID.CLIENT_AUTH
        ]
        assert c.subject.rfc4514_string() == f"CN={name}"
    subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(out / "ca.crt"),
            *[str(out / f"{n}.crt") for n in ("server", "client", "admin")],
        ],
        check=True,
        capture_output=True,
    )


def test_gen_certs_keeps_existing_files_unless_forced(tmp_path: Path) -> None:
    """No overwrite without --force; --force replaces everything."""
    gen_certs(tmp_path)
    before = (tmp_path / "server.crt").read_bytes()
    r = subprocess.run(
        [str(ROOT / "scripts/gen_certs.sh"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "kept" in r.stdout and "made" not in r.stdout
    assert (tmp_path / "server.crt").read_bytes() == before
    subprocess.run(
        [str(ROOT / "scripts/gen_certs.sh"), "--out", str(tmp_path), "--force"],
        capture_output=True,
        check=True,
    )
    assert (tmp_path / "server.crt").read_bytes() != before


# ---------------------------------------------------------------- start-up refusals


def _run_agent(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def own_certs(tmp_path: Path) -> Certs:
    """A private copy of good certificates the test may break."""
    return gen_certs(tmp_path / "own")


def _config(tmp_path: Path, certs: Certs, standard_policy: str, **sections: dict) -> Path:  # type: ignore[type-arg]
    pol = tmp_path / "policy.yaml"
    pol.write_text(standard_policy)
    cfg = tmp_path / "config.toml"
    cfg.write_text(default_config("127.0.0.1:1", certs, pol, tmp_path / "state", **sections))
    return cfg


def _refused(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert line.count("\n") == 0, line
    for w in words:
        assert w in line, line


def test_refuses_key_readable_by_others(
    tmp_path: Path, own_certs: Certs, standard_policy: str
) -> None:
    """A private key readable by group or others: exit 2 with the fix to apply."""
    os.chmod(own_certs.key("server"), 0o640)
    r = _run_agent(_config(tmp_path, own_certs, standard_policy))
    _refused(r, "[grpc_server] key_file", "accessible by group or others", "chmod 600")


@pytest.mark.skipif(not IS_ROOT, reason="needs root to give the key to another user")
def test_refuses_key_owned_by_another_user(
    tmp_path: Path, own_certs: Certs, standard_policy: str
) -> None:
    """A key owned by another user is refused even with mode 0600."""
    os.chown(own_certs.key("server"), 65534, 65534)
    _refused(
        _run_agent(_config(tmp_path, own_certs, standard_policy)),
        "[grpc_server] key_file",
        "owned by uid 65534",
    )


def test_refuses_key_that_does_not_match_certificate(
    tmp_path: Path, own_certs: Certs, standard_policy: str
) -> None:
    """Certificate and key from different pairs."""
    shutil.copy(own_certs.key("client"), own_certs.key("server"))
    _refused(
        _run_agent(_config(tmp_path, own_certs, standard_policy)),
        "[grpc_server] key_file",
        "does not match",
    )


@pytest.mark.parametrize("when,words", [("expired", "expired on"), ("future", "not valid before")])
def test_refuses_server_certificate_outside_validity(
    tmp_path: Path, own_certs: Certs, standard_policy: str, when: str, words: str
) -> None:
    """An expired or not-yet-valid server certificate is refused at start."""
    ca = cf.load_issuer(own_certs.ca, own_certs.key("ca"))
    kw: dict[str, Any]
    if when == "expired":
        kw = {"not_before": cf.NOW - 10 * cf.DAY, "not_after": cf.NOW - cf.DAY}
    else:
        kw = {"not_before": cf.NOW + cf.DAY, "not_after": cf.NOW + 10 * cf.DAY}
    cf.server_pair(ca, own_certs.dir, **kw)
    _refused(
        _run_agent(_config(tmp_path, own_certs, standard_policy)), "[grpc_server] crt_file", words
    )


def test_refuses_mtls_without_ca(tmp_path: Path, certs: Certs, standard_policy: str) -> None:
    """Client authentication needs a CA file; without one nobody could be identified."""
    cfg = _config(tmp_path, certs, standard_policy)
    cfg.write_text(cfg.read_text().replace(f'ca_file = "{certs.ca}"\n', ""))
    _refused(_run_agent(cfg), "[grpc_server] ca_file", "no client can be identified")


def test_refuses_plaintext_off_loopback(tmp_path: Path, certs: Certs, standard_policy: str) -> None:
    """use_tls = false on 0.0.0.0 is refused even with the loopback switch on."""
    cfg = _config(
        tmp_path,
        certs,
        standard_policy,
        grpc_server={
            "addr": "0.0.0.0:1",
            "use_tls": False,
            "allow_plaintext_loopback": True,
            "ca_file": "",
        },
        auth={"allow_anonymous": True, "clients": [], "admins": []},
    )
    _refused(_run_agent(cfg), "[grpc_server] use_tls", "non-loopback")


def test_plaintext_on_loopback_needs_switch_and_warns_every_start(
    make_agent: AgentFactory, tmp_path: Path, certs: Certs
) -> None:
    """Without the switch: refused; with it: runs, and warns at every start."""
    cfg = _config(
        tmp_path,
        certs,
        "version: 1\nentries: []\n",
        grpc_server={"use_tls": False, "ca_file": ""},
        auth={"allow_anonymous": True, "clients": [], "admins": []},
    )
    _refused(_run_agent(cfg), "[grpc_server] use_tls", "allow_plaintext_loopback")
    a = make_agent(
        start=False,
        grpc_server={"use_tls": False, "ca_file": "", "allow_plaintext_loopback": True},
        auth={"allow_anonymous": True, "clients": [], "admins": []},
    )
    a.start()
    assert "PLAINTEXT listener" in a.log()
    ch = grpc.insecure_channel(a.addr)
    res = pb_grpc.WorkerStub(ch).ListJobs(pb.ListJobsReq(), timeout=5)
    assert list(res.jobs) == []
    ch.close()
    a.stop()
    a.start()
    assert a.log().count("PLAINTEXT listener") == 2


# ---------------------------------------------------------------- handshake refusals


def _bad_client(tmp_path: Path, certs: Certs, kind: str) -> grpc.ChannelCredentials:
    ca = cf.load_issuer(certs.ca, certs.key("ca"))
    client_auth = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if kind == "other-ca":
        cert, key = cf.make_leaf(cf.make_ca("other CA"), "client", eku=client_auth)
    elif kind == "expired":
        cert, key = cf.make_leaf(
            ca, "client", not_before=cf.NOW - 10 * cf.DAY, not_after=cf.NOW - cf.DAY
        )
    elif kind == "not-yet-valid":
        cert, key = cf.make_leaf(
            ca, "client", not_before=cf.NOW + cf.DAY, not_after=cf.NOW + 10 * cf.DAY
        )
    elif kind == "server-only-eku":
        cert, key = cf.make_leaf(ca, "client", eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    elif kind == "self-signed":
        cert, key = cf.make_leaf(None, "client")
    else:
        raise AssertionError(kind)
    crt, keyp = cf.write_pair(tmp_path, kind, cert, key)
    return grpc.ssl_channel_credentials(certs.ca.read_bytes(), keyp.read_bytes(), crt.read_bytes())


@pytest.mark.parametrize(
    "kind", ["other-ca", "expired", "not-yet-valid", "server-only-eku", "self-signed", "none"]
)
def test_handshake_refuses_bad_client_certificates(
    agent: AgentProcess, tmp_path: Path, kind: str
) -> None:
    """Each bad client certificate fails the TLS handshake: no call gets through."""
    creds = (
        grpc.ssl_channel_credentials(agent.certs.ca.read_bytes())
        if kind == "none"
        else _bad_client(tmp_path, agent.certs, kind)
    )
    ch = grpc.secure_channel(agent.addr, creds)
    with pytest.raises(grpc.RpcError) as e:
        pb_grpc.WorkerStub(ch).QueryJob(QUERY, timeout=5)
    ch.close()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    # and a good client still works
    with agent.stub() as stub, pytest.raises(grpc.RpcError) as ok:
        stub.QueryJob(QUERY, timeout=5)
    assert ok.value.code() == grpc.StatusCode.NOT_FOUND


def test_plaintext_client_is_refused(agent: AgentProcess) -> None:
    """A client speaking plaintext HTTP/2 to the TLS port gets nowhere."""
    ch = grpc.insecure_channel(agent.addr)
    with pytest.raises(grpc.RpcError) as e:
        pb_grpc.WorkerStub(ch).QueryJob(QUERY, timeout=5)
    ch.close()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_certificate_without_any_eku_is_unauthenticated(
    agent: AgentProcess, tmp_path: Path
) -> None:
    """BoringSSL lets a certificate with no EKU through; the agent refuses it."""
    ca = cf.load_issuer(agent.certs.ca, agent.certs.key("ca"))
    cert, key = cf.make_leaf(ca, "client", no_eku=True)
    crt, keyp = cf.write_pair(tmp_path, "noeku", cert, key)
    ch = grpc.secure_channel(
        agent.addr,
        grpc.ssl_channel_credentials(
            agent.certs.ca.read_bytes(), keyp.read_bytes(), crt.read_bytes()
        ),
    )
    with pytest.raises(grpc.RpcError) as e:
        pb_grpc.WorkerStub(ch).QueryJob(QUERY, timeout=5)
    ch.close()
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "clientAuth" in (e.value.details() or "")
    assert any(a["rule"] == "bad-client-cert" for a in agent.audit_lines() if "rule" in a)


# ---------------------------------------------------------------- protocols and ciphers


def _s_client(addr: str, certs: Certs, *args: str) -> tuple[bool, str]:
    """Try one handshake with openssl s_client; (succeeded, negotiated cipher)."""
    r = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            addr,
            "-CAfile",
            str(certs.ca),
            "-cert",
            str(certs.crt("client")),
            "-key",
            str(certs.key("client")),
            "-verify_return_error",
            *args,
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
    )
    cipher = ""
    for line in r.stdout.splitlines():
        if ", Cipher is " in line:
            cipher = line.split(", Cipher is ")[1].strip()
    return cipher not in ("", "(NONE)"), cipher


def _tls12_client_ciphers() -> list[str]:
    out = subprocess.run(
        ["openssl", "ciphers", "-v", "ALL:@SECLEVEL=0"], capture_output=True, text=True, check=True
    ).stdout
    return sorted(
        {
            line.split()[0]
            for line in out.splitlines()
            if " TLSv1.2 " in line or line.split()[1] in ("SSLv3", "TLSv1")
        }
    )


def test_only_forward_secret_aead_suites_on_tls12(agent: AgentProcess) -> None:
    """Offer every TLS 1.2 suite openssl knows, one at a time: only ECDHE+AEAD succeed."""
    accepted = []
    for c in _tls12_client_ciphers():
        ok, got = _s_client(agent.addr, agent.certs, "-tls1_2", "-cipher", f"{c}:@SECLEVEL=0")
        if ok:
            accepted.append(got)
    assert accepted, "TLS 1.2 with an ECDHE-ECDSA AEAD suite must work"
    for c in accepted:
        assert c.startswith("ECDHE-") and ("GCM" in c or "CHACHA20" in c), c


@pytest.mark.parametrize("proto", ["-tls1", "-tls1_1"])
def test_old_protocols_refused(agent: AgentProcess, proto: str) -> None:
    """TLS 1.0 and 1.1 are never accepted (client side opened up to allow them)."""
    ok, _ = _s_client(agent.addr, agent.certs, proto, "-cipher", "ALL:@SECLEVEL=0")
    assert not ok


def test_tls13_works_and_tls13_only_setting_refuses_tls12(make_agent) -> None:  # type: ignore[no-untyped-def]
    """TLS 1.3 is always offered; with tls13_only, TLS 1.2 handshakes fail."""
    a = make_agent()
    assert _s_client(a.addr, a.certs, "-tls1_3")[0]
    assert _s_client(a.addr, a.certs, "-tls1_2")[0]
    b = make_agent(grpc_server={"tls13_only": True})
    ok, cipher = _s_client(b.addr, b.certs, "-tls1_3")
    assert ok and cipher.startswith("TLS_")
    for c in _tls12_client_ciphers():
        assert not _s_client(b.addr, b.certs, "-tls1_2", "-cipher", f"{c}:@SECLEVEL=0")[0], c
    with b.stub() as stub, pytest.raises(grpc.RpcError) as e:
        stub.QueryJob(QUERY, timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND  # gRPC itself uses TLS 1.3


# ---------------------------------------------------------------- rotation


def _peer_fingerprint(addr: str, certs: Certs, ca: Path | None = None) -> str:
    host, port = addr.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(ca or certs.ca))
    ctx.load_cert_chain(str(certs.crt("client")), str(certs.key("client")))
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        der = s.getpeercert(binary_form=True)
    assert der
    return hashlib.sha256(der).hexdigest()


def _fingerprint(path: Path) -> str:
    return hashlib.sha256(
        x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(
            __import__(
                "cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]
            ).Encoding.DER
        )
    ).hexdigest()


def _replace(src: Path, dst: Path) -> None:
    tmp = dst.with_suffix(dst.suffix + ".new")
    shutil.copy(src, tmp)
    os.chmod(tmp, os.stat(src).st_mode & 0o777)
    os.replace(tmp, dst)


def test_rotation_new_connections_use_new_pair_jobs_keep_running(
    make_agent: AgentFactory, tmp_path: Path, script_dir: Path
) -> None:
    """New cert files on disk: the next connection sees them; running jobs are untouched."""
    own = gen_certs(tmp_path / "rot")
    a = make_agent(start=False)
    a.certs = own
    a.config_path.write_text(default_config(a.addr, own, a.policy_path, a.state))
    a.start()
    old = _fingerprint(own.crt("server"))
    assert _peer_fingerprint(a.addr, own) == old
    c = a.client()
    job = c.start("bash", str(script_dir / "sleep.sh"), args=["3"])
    ca = cf.load_issuer(own.ca, own.key("ca"))
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    crt, key = cf.server_pair(ca, new_dir)
    _replace(key, own.key("server"))
    _replace(crt, own.crt("server"))
    new = _fingerprint(own.crt("server"))
    assert new != old
    wait_for(lambda: _peer_fingerprint(a.addr, own) == new, timeout=5)
    assert c.query(job).state == "RUNNING"
    assert c.wait(job, timeout=15).state == "SUCCEEDED"
    assert "certificates reloaded" in a.log()
    assert any(e["event"] == "certificate_rotation" for e in a.audit_lines())


def test_rotation_broken_pair_is_rejected_old_stays(make_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A key that does not match the new certificate: logged, old pair still served."""
    own = gen_certs(tmp_path / "rot")
    a = make_agent(start=False)
    a.certs = own
    a.config_path.write_text(default_config(a.addr, own, a.policy_path, a.state))
    a.start()
    old = _peer_fingerprint(a.addr, own)
    ca = cf.load_issuer(own.ca, own.key("ca"))
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    crt, _ = cf.server_pair(ca, new_dir)
    _replace(crt, own.crt("server"))  # certificate changed, key did not
    for _ in range(3):
        assert _peer_fingerprint(a.addr, own) == old
    a.signal(signal.SIGHUP)
    wait_for(lambda: "certificate rotation rejected" in a.log(), timeout=5)
    assert a.log().count("certificate rotation rejected") == 1  # logged once, not per handshake
    assert _peer_fingerprint(a.addr, own) == old
    with a.stub() as stub, pytest.raises(grpc.RpcError) as e:
        stub.QueryJob(QUERY, timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_rotation_of_the_ca_accepts_clients_of_the_new_ca(make_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Adding a new CA to the CA file lets its clients in on the next connection."""
    own = gen_certs(tmp_path / "rot")
    a = make_agent(start=False)
    a.certs = own
    a.config_path.write_text(default_config(a.addr, own, a.policy_path, a.state))
    a.start()
    new_ca = cf.make_ca("second CA")
    cert, key = cf.make_leaf(new_ca, "client")
    crt, keyp = cf.write_pair(tmp_path, "newclient", cert, key)
    creds = grpc.ssl_channel_credentials(own.ca.read_bytes(), keyp.read_bytes(), crt.read_bytes())

    def call() -> grpc.StatusCode:
        ch = grpc.secure_channel(a.addr, creds)
        try:
            pb_grpc.WorkerStub(ch).QueryJob(QUERY, timeout=5)
        except grpc.RpcError as e:
            return e.code()
        finally:
            ch.close()
        return grpc.StatusCode.OK

    assert call() == grpc.StatusCode.UNAVAILABLE
    from cryptography.hazmat.primitives import serialization

    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(own.ca.read_bytes() + new_ca.cert.public_bytes(serialization.Encoding.PEM))
    _replace(bundle, own.ca)
    wait_for(lambda: call() == grpc.StatusCode.NOT_FOUND, timeout=5)


# ---------------------------------------------------------------- a standard scanner


def _sslscan(agent: AgentProcess) -> str:
    if shutil.which("sslscan") is None:
        pytest.skip("sslscan not installed (scripts/test.sh installs it)")
    c = agent.certs
    r = subprocess.run(
        [
            "sslscan",
            "--no-colour",
            f"--certs={c.crt('client')}",
            f"--pk={c.key('client')}",
            agent.addr,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("tls13_only", [False, True])
def test_sslscan_reports_only_modern_tls(make_agent, tls13_only: bool) -> None:  # type: ignore[no-untyped-def]
    """sslscan: TLS 1.2 (ECDHE+AEAD only) and 1.3, or 1.3 alone; no known weakness."""
    a = make_agent(grpc_server={"tls13_only": tls13_only})
    out = _sslscan(a)
    protocols = {
        line.split()[0]: line.split()[1]
        for line in out.splitlines()
        if line.startswith(("SSLv", "TLSv")) and len(line.split()) == 2
    }
    assert protocols["SSLv2"] == protocols["SSLv3"] == "disabled"
    assert protocols["TLSv1.0"] == protocols["TLSv1.1"] == "disabled"
    assert protocols["TLSv1.3"] == "enabled"
    assert protocols["TLSv1.2"] == ("disabled" if tls13_only else "enabled")
    suites = [
        line.split() for line in out.splitlines() if line.startswith(("Accepted", "Preferred"))
    ]
    assert suites
    for s in suites:
        version, name = s[1], s[4]
        assert version in ("TLSv1.2", "TLSv1.3"), s
        if version == "TLSv1.2":
            assert name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name), s
    assert "vulnerable to heartbleed" in out and " vulnerable to heartbleed" not in out.replace(
        "not vulnerable", ""
    )
    assert "Insecure session renegotiation supported" not in out
    assert "Compression enabled" not in out
