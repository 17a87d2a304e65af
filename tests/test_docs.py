"""Documentation matches the code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import ROOT


def test_readme_configuration_reference_is_current() -> None:
    """README's configuration table is generated from agent.daemon.config."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "update_docs.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr


def test_sample_config_is_valid() -> None:
    """The committed config.toml and policy.yaml pass validation (parse step)."""
    from agent.daemon import policy
    from agent.daemon.config import load

    cfg = load(ROOT / "config.toml")
    assert cfg.mtls
    pol = policy.load(ROOT / "policy.yaml")
    assert {e.name for e in pol.entries} >= {"example-bash-scripts", "true"}


def test_certs_dir_holds_no_keys_in_git() -> None:
    """certs/ tracks only its README and .gitignore."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (an unpacked source release): nothing is tracked")
    r = subprocess.run(["git", "ls-files", "certs"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert set(r.stdout.split()) <= {"certs/README.md", "certs/.gitignore"}
    r = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT)
    assert not [f for f in r.stdout.split() if f.endswith((".key", ".pem"))]


def test_policy_example_is_valid() -> None:
    """policy.example.yaml documents a policy the loader accepts."""
    import os

    from agent.daemon import policy

    if not os.path.exists("/usr/bin/systemctl"):
        pytest.skip("the example names /usr/bin/systemctl")
    text = (ROOT / "policy.example.yaml").read_text().replace("cwd: /var/lib/agent", "cwd: /")
    pol = policy.parse(text, "policy.example.yaml", base=ROOT)
    names = [e.name for e in pol.entries]
    assert names == ["maintenance", "restart-service"]
    m = pol.entries[0]
    assert m.is_interpreter and m.identities == frozenset({"scheduler", "admin"})
    assert m.scripts is not None and m.scripts[3].sha256 == "0" * 64
    assert any(r.matches(str(ROOT / "relative/scripts/x.sh")) for r in m.scripts)
    assert m.env == {"TZ", "BACKUP_TARGET"}
