"""Expiry warnings: days left per loaded certificate, at start, in check-config, on rotation."""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

from agent import tls

import certfactory as cf
from helpers import AgentProcess, Certs, wait_for

NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)


def test_days_left_for_each_certificate_of_a_bundle() -> None:
    """certificate_expiry gives one entry per certificate, seconds and days until notAfter."""
    a = cf.make_ca("a", not_after=NOW + datetime.timedelta(days=10))
    b = cf.make_ca("b", not_after=NOW + datetime.timedelta(days=400))
    items = tls.certificate_expiry("ca", "ca.crt", cf.pem(a.cert) + cf.pem(b.cert), now=NOW)
    assert [(i.subject, round(i.days_left)) for i in items] == [("CN=a", 10), ("CN=b", 400)]
    assert items[0].seconds_left == 10 * 86400


def test_warnings_only_inside_the_window() -> None:
    """Only certificates expiring within the configured days warn; 0 disables warnings."""
    ca = cf.make_ca("soon", not_after=NOW + datetime.timedelta(days=5))
    later = cf.make_ca("later", not_after=NOW + datetime.timedelta(days=50))
    items = tls.certificate_expiry("ca", "ca.crt", cf.pem(ca.cert) + cf.pem(later.cert), now=NOW)
    w = tls.expiry_warnings(items, 30)
    assert len(w) == 1 and "CN=soon" in w[0] and "in 5.0 days" in w[0] and "ca.crt" in w[0]
    assert tls.expiry_warnings(items, 0) == []
    assert len(tls.expiry_warnings(items, 60)) == 2


def _short_lived(certs: Certs, d: Path, days: int) -> tuple[Path, Path]:
    d.mkdir(exist_ok=True)
    issuer = cf.load_issuer(certs.ca, certs.dir / "ca.key")
    return cf.server_pair(
        issuer, d, not_after=datetime.datetime.now(datetime.timezone.utc) + days * cf.DAY
    )


def test_check_config_and_start_warn(certs: Certs, tmp_path: Path) -> None:
    """A server certificate with 3 days left: check-config and the start-up log warn."""
    crt, key = _short_lived(certs, tmp_path / "c", 3)
    a = AgentProcess(
        tmp_path / "a",
        certs,
        "version: 1\nentries: []\n",
        grpc_server={"crt_file": str(crt), "key_file": str(key), "cert_expiry_warning_days": 14},
    )
    r = subprocess.run(
        [sys.executable, "-m", "agent", "check-config", "-c", str(a.config_path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "warning: server certificate CN=localhost" in r.stderr and "days" in r.stderr
    a.start()
    try:
        assert "server certificate CN=localhost" in a.log()
    finally:
        a.stop()


def test_rotation_to_a_short_lived_certificate_warns(certs: Certs, tmp_path: Path) -> None:
    """Rotating to a certificate inside the window logs the warning without a restart."""
    crt, key = _short_lived(certs, tmp_path / "c", 300)
    a = AgentProcess(
        tmp_path / "a",
        certs,
        "version: 1\nentries: []\n",
        grpc_server={"crt_file": str(crt), "key_file": str(key), "cert_expiry_warning_days": 30},
    ).start()
    try:
        assert "expires on" not in a.log()
        new_crt, new_key = _short_lived(certs, tmp_path / "n", 2)
        key.write_bytes(new_key.read_bytes())
        crt.write_bytes(new_crt.read_bytes())
        # A new connection's handshake makes the server compare its files.
        a.client().list()
        wait_for(lambda: "expires on" in a.log(), timeout=10)
    finally:
        a.stop()
