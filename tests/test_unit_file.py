"""The shipped units, checked on the host with systemd-analyze (no container, quick).

systemd/worker-agent.service (the agent), worker-agent-keeper.service (the job keeper)
and worker-agent-keeper-privileged.service (the keeper of the privileged deployment).
The same units are run for real under systemd in tests/systemd_tier; these checks
only need the ``systemd-analyze`` binary (Debian package ``systemd``), not systemd
as PID 1.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

nspawn = pytest.importorskip(
    "systemd_tier.nspawn", reason="the systemd tier harness needs Python 3.11+"
)

ROOT = Path(__file__).resolve().parent.parent
UNITS = {
    # The agent faces the network and holds no job and no capability.
    "worker-agent.service": 1.5,
    "worker-agent-keeper.service": 2.0,
    # Measured 2.0 (systemd 252): worker-agent with ambient CAP_SETUID, CAP_SETGID and
    # CAP_SETPCAP (jobs as per-entry users, each with its entry's capabilities). Each
    # capability a drop-in adds for an entry costs more (CAP_NET_BIND_SERVICE: 2.1).
    "worker-agent-keeper-privileged.service": 2.0,
}
# `systemd-analyze security --offline=` appeared in systemd 250.
MIN_SYSTEMD = 250


def _systemd_version() -> int:
    out = subprocess.run(
        ["systemd-analyze", "--version"], capture_output=True, text=True, check=False
    ).stdout
    match = re.search(r"systemd (\d+)", out)
    return int(match.group(1)) if match else 0


@pytest.fixture(scope="module")
def analyze() -> None:
    """Skip unless a recent enough systemd-analyze is installed."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not found (Debian package: systemd)")
    version = _systemd_version()
    if version < MIN_SYSTEMD:
        pytest.skip(f"systemd-analyze {version or '?'} is older than {MIN_SYSTEMD}")


def _verify_copy_with_stub(unit: Path, tmp_path: Path) -> tuple[int, str, str]:
    """Verify a copy of the unit whose ExecStart=/ExecReload= binary is a stub (no root needed)."""
    binary = "/opt/worker-agent/bin/agent"
    stub = tmp_path / "agent"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = unit.read_text()
    assert f"ExecStart={binary} " in text
    copy = tmp_path / unit.name
    copy.write_text(text.replace(f"={binary} ", f"={stub} "))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, check=False
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_every_unit_is_shipped_and_checked() -> None:
    """Every unit file in systemd/ is in UNITS (so verified and rated below)."""
    assert {p.name for p in (ROOT / "systemd").glob("*.service")} == set(UNITS)


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_verifies(analyze: None, tmp_path: Path, name: str) -> None:
    """systemd-analyze verify accepts the unit without a warning."""
    unit = ROOT / "systemd" / name
    if os.access("/opt/worker-agent/bin/agent", os.X_OK) or os.geteuid() == 0:
        # The file itself; a missing binary is stubbed in a private mount namespace.
        rc, out, err = nspawn.verify_unit(unit)
    else:
        rc, out, err = _verify_copy_with_stub(unit, tmp_path)
    assert rc == 0, (out, err)
    assert err.strip() == "", err


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_security_exposure(analyze: None, name: str) -> None:
    """systemd-analyze security --offline=true rates the agent's unit at most 1.5 and
    either keeper's at most 2.0 ("OK")."""
    exposure, report = nspawn.security_exposure(ROOT / "systemd" / name)
    print(f"{name}: exposure {exposure}\n{report}")
    assert exposure <= UNITS[name], report
