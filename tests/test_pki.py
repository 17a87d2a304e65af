"""`agent pki`: per-host certificates from an existing (openssl-made) CA, and CSR mode."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.daemon.cli import main
from agent.tls import identity_from_cert, load_key_pair


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A CA made by openssl, as an operator's existing CA would be."""
    d = tmp_path_factory.mktemp("ca")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"), "-days", "365",
            "-subj", "/CN=Fleet CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return d / "ca.crt", d / "ca.key"


def _verify(ca_crt: Path, crt: Path, purpose: str) -> None:
    r = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca_crt), "-purpose", purpose, str(crt)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def _sans(crt: Path) -> list[str]:
    c = x509.load_pem_x509_certificate(crt.read_bytes())
    ext = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in ext]


def test_issue_writes_server_and_client_pairs(ca: tuple[Path, Path], tmp_path: Path) -> None:
    """issue: server (serverAuth) and client (clientAuth) pairs with DNS, IP and SPIFFE SANs."""
    out = tmp_path / "h1"
    rc = main(
        ["pki", "issue", "--ca-cert", str(ca[0]), "--ca-key", str(ca[1]),
         "--host", "h1.agents.example.com", "--ip", "10.0.0.1", "--ip", "fd00::1",
         "--trust-domain", "example.com", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    for kind, purpose in (("server", "sslserver"), ("client", "sslclient")):
        _verify(ca[0], out / f"{kind}.crt", purpose)
        assert stat.S_IMODE(os.stat(out / f"{kind}.key").st_mode) == 0o600
        assert _sans(out / f"{kind}.crt") == [
            "h1.agents.example.com",
            "10.0.0.1",
            "fd00::1",
            "spiffe://example.com/worker/h1.agents.example.com",
        ]
        load_key_pair(out / f"{kind}.crt", out / f"{kind}.key")  # the agent accepts it
    c = x509.load_pem_x509_certificate((out / "client.crt").read_bytes())
    eku = c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    peer = identity_from_cert((out / "client.crt").read_bytes())
    assert peer.problem == "" and peer.identity == "h1.agents.example.com"
    assert (out / "ca.crt").read_bytes() == ca[0].read_bytes()


def test_keys_are_never_overwritten(ca: tuple[Path, Path], tmp_path: Path) -> None:
    """A second issue into the same directory refuses (exit 2) and leaves the key alone."""
    args = ["pki", "issue", "--ca-cert", str(ca[0]), "--ca-key", str(ca[1]), "--host", "h2",
            "--trust-domain", "example.com", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    before = (tmp_path / "server.key").read_bytes()
    assert main(args) == 2
    assert (tmp_path / "server.key").read_bytes() == before


def test_csr_mode_key_stays_on_the_host(ca: tuple[Path, Path], tmp_path: Path) -> None:
    """csr on the host + sign on the CA: the certificate matches the host's own key."""
    host = tmp_path / "host"
    assert main(["pki", "csr", "--host", "h3.agents.example.com", "--ip", "10.0.0.3",
                 "--trust-domain", "example.com", "--out", str(host)]) == 0  # fmt: skip
    cadir = tmp_path / "ca-side"
    cadir.mkdir()
    for kind in ("server", "client"):
        (cadir / f"{kind}.csr").write_bytes((host / f"{kind}.csr").read_bytes())
        assert main(["pki", "sign", "--ca-cert", str(ca[0]), "--ca-key", str(ca[1]),
                     "--csr", str(cadir / f"{kind}.csr"), "--kind", kind,
                     "--trust-domain", "example.com",
                     "--out", str(cadir / f"{kind}.crt")]) == 0  # fmt: skip
        assert not list(cadir.glob("*.key"))
        (host / f"{kind}.crt").write_bytes((cadir / f"{kind}.crt").read_bytes())
        load_key_pair(host / f"{kind}.crt", host / f"{kind}.key")
    assert "spiffe://example.com/worker/h3.agents.example.com" in _sans(host / "client.crt")


def test_sign_refuses_a_csr_asking_for_another_spiffe_id(
    ca: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CSR that requests someone else's SPIFFE ID (or any extra URI) is not signed."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    req = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "h4")]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://example.com/scheduler/admin")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    from cryptography.hazmat.primitives import serialization

    (tmp_path / "r.csr").write_bytes(req.public_bytes(serialization.Encoding.PEM))
    rc = main(["pki", "sign", "--ca-cert", str(ca[0]), "--ca-key", str(ca[1]),
               "--csr", str(tmp_path / "r.csr"), "--kind", "client",
               "--trust-domain", "example.com", "--out", str(tmp_path / "r.crt")])  # fmt: skip
    assert rc == 2
    assert "spiffe://example.com/scheduler/admin" in capsys.readouterr().err
    assert not (tmp_path / "r.crt").exists()


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (["--dns", "*.agents.example.com"], "wildcard is never issued"),
        (["--ip", "10.0.0.300"], "not an IP address"),
        (["--days", "4000"], "the CA expires"),
    ],
)
def test_bad_input_is_refused_with_a_reason(
    extra: list[str],
    problem: str,
    ca: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Wildcard SANs, bad IPs, a validity beyond the CA's: exit 2 with the reason, no file."""
    rc = main(["pki", "issue", "--ca-cert", str(ca[0]), "--ca-key", str(ca[1]), "--host", "h5",
               "--trust-domain", "example.com", "--out", str(tmp_path / "o"), *extra])  # fmt: skip
    assert rc == 2
    assert problem in capsys.readouterr().err
    assert not list((tmp_path / "o").glob("*.key")) if (tmp_path / "o").exists() else True


def test_ca_key_must_match(ca: tuple[Path, Path], tmp_path: Path) -> None:
    """A CA key that is not the CA certificate's is refused before anything is written."""
    other = tmp_path / "other.key"
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-out", str(other)],
        check=True,
    )  # fmt: skip
    rc = main(["pki", "issue", "--ca-cert", str(ca[0]), "--ca-key", str(other), "--host", "h6",
               "--trust-domain", "example.com", "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 2
    assert not (tmp_path / "o").exists()
