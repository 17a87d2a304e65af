"""systemd/worker-agent.service, checked on the host with systemd-analyze (no container, quick).

The same unit is run for real under systemd in tests/systemd_tier; these checks
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
UNIT = ROOT / "systemd" / "worker-agent.service"
MAX_EXPOSURE = 2.0
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


def _verify_copy_with_stub(tmp_path: Path) -> tuple[int, str, str]:
    """Verify a copy of the unit whose ExecStart=/ExecReload= binary is a stub (no root needed)."""
    binary = "/opt/worker-agent/bin/agent"
    stub = tmp_path / "agent"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text()
    assert f"ExecStart={binary} " in text
    copy = tmp_path / "worker-agent.service"
    copy.write_text(text.replace(f"={binary} ", f"={stub} "))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, check=False
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_unit_verifies(analyze: None, tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit without a warning."""
    if os.access("/opt/worker-agent/bin/agent", os.X_OK) or os.geteuid() == 0:
        # The file itself; a missing binary is stubbed in a private mount namespace.
        rc, out, err = nspawn.verify_unit(UNIT)
    else:
        rc, out, err = _verify_copy_with_stub(tmp_path)
    assert rc == 0, (out, err)
    assert err.strip() == "", err


def test_unit_security_exposure_is_at_most_2(analyze: None) -> None:
    """systemd-analyze security --offline=true rates the unit at most 2.0 ("OK")."""
    exposure, report = nspawn.security_exposure(UNIT)
    print(f"exposure {exposure}\n{report}")
    assert exposure <= MAX_EXPOSURE, report
