"""The installed package: what a user gets from `pip install`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, Certs

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def _installed() -> bool:
    r = subprocess.run(
        [sys.executable, "-I", "-c", "import agent, sys; print(agent.__file__)"],
        capture_output=True,
        text=True,
        cwd="/",
    )
    return r.returncode == 0 and "site-packages" in r.stdout


@pytest.mark.skipif(not _installed(), reason="package not installed (run scripts/test.sh)")
def test_installed_package_has_stubs_and_commands() -> None:
    """pip install gives the stubs and the agent, agentctl commands, without a generator."""
    r = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            "import agent._proto.jobscheduler_pb2_grpc as g, agent.client, "
            "agent.daemon.server; print(g.__file__)",
        ],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    assert "site-packages" in r.stdout
    bindir = Path(sys.executable).parent
    for cmd in ("agent", "agentctl"):
        exe = bindir / cmd
        assert exe.exists() or shutil.which(cmd), cmd
        out = subprocess.run(
            [str(exe), "--help"],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=""),
        )
        assert out.returncode == 0, out.stderr
    v = subprocess.run([str(bindir / "agent"), "--version"], capture_output=True, text=True)
    assert v.stdout.startswith("agent ")
    m = subprocess.run(
        [sys.executable, "-I", "-m", "agent", "--version"], capture_output=True, text=True, cwd="/"
    )
    assert m.returncode == 0 and m.stdout.startswith("agent ")


PACKAGED_CONFIG = ROOT / "packaging" / "debian" / "config.toml"


def test_packaged_config_boxes_jobs_as_documented() -> None:
    """The package's config.toml sets cgroups and Landlock "required", explicitly and as loaded."""
    from agent.keeper.config import load

    raw = tomllib.loads(PACKAGED_CONFIG.read_text())
    assert raw["cgroups"]["mode"] == "required"
    assert raw["confinement"]["landlock"] == "required"
    cfg = load(PACKAGED_CONFIG)
    assert cfg.cgroups.mode == "required"
    assert cfg.confinement.landlock == "required"
    assert cfg.confinement.seccomp
    assert cfg.mtls


# ---------------------------------------------------------------- scripts/test.sh


def _test_sh(*args: str) -> tuple[str, list[str]]:
    """What scripts/test.sh would do with ``args``: (systemd set-up yes/no, pytest args)."""
    script = ROOT / "scripts" / "test.sh"
    if not script.exists():
        pytest.skip("not a source checkout")
    r = subprocess.run(
        ["sh", str(script), *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, AGENT_TEST_DRY_RUN="1", PYTHON=sys.executable),
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    setup = lines[0].removeprefix("systemd set-up: ")
    return setup, [line.removeprefix("pytest arg: ") for line in lines[1:]]


@pytest.mark.parametrize(
    ("args", "setup", "pytest_args"),
    [
        ((), "no", ["-m", "not systemd"]),
        (("-m", "not systemd"), "no", ["-m", "not systemd"]),
        (("-q", "--durations=25"), "no", ["-m", "not systemd", "-q", "--durations=25"]),
        (("-k", "reload"), "no", ["-m", "not systemd", "-k", "reload"]),
        (("-m", "systemd"), "yes", ["-m", "systemd"]),
        (("-msystemd",), "yes", ["-msystemd"]),
        (("-m", "systemd and not slow"), "yes", ["-m", "systemd and not slow"]),
        (("-m", "slow"), "no", ["-m", "slow"]),
    ],
)
def test_test_sh_keeps_the_default_marker_and_sets_up_systemd_only_when_selected(
    args: tuple[str, ...], setup: str, pytest_args: list[str]
) -> None:
    """test.sh keeps -m "not systemd" unless given a -m; only a -m selecting the tier sets it up."""
    assert _test_sh(*args) == (setup, pytest_args)


# ---------------------------------------------------------------- scripts/build_deb.sh


def test_build_deb_takes_a_version_and_refuses_one_python_cannot_carry() -> None:
    """build_deb.sh --version VERSION exists; one that is no Python version is refused at once."""
    script = ROOT / "scripts" / "build_deb.sh"
    if not script.exists():
        pytest.skip("not a source checkout")
    usage = subprocess.run(["sh", str(script), "--help"], capture_output=True, text=True)
    assert "--version VERSION" in usage.stdout
    r = subprocess.run(
        ["sh", str(script), "--version", "1:0.1.1", "--out", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "--version 1:0.1.1: expected N.N.N" in r.stderr


# ---------------------------------------------------------------- scripts/pki.sh


def test_pki_sh_issues_host_certificates_from_a_clone(certs: Certs, tmp_path: Path) -> None:
    """scripts/pki.sh runs `agent pki` of the clone's .venv, the caller's relative paths intact."""
    scripts = ROOT / "scripts"
    if not (scripts / "pki.sh").exists():
        pytest.skip("not a source checkout")
    clone = tmp_path / "clone"
    (clone / "scripts").mkdir(parents=True)
    for name in ("pki.sh", "venv.sh"):
        shutil.copy2(scripts / name, clone / "scripts" / name)
    shutil.copy2(ROOT / "pyproject.toml", clone / "pyproject.toml")
    # A .venv that scripts/venv.sh takes as current: its agent is this test's.
    digest = hashlib.sha256((clone / "pyproject.toml").read_bytes()).hexdigest()[:16]
    (clone / ".venv" / "bin").mkdir(parents=True)
    (clone / ".venv" / f".installed-{digest}").touch()
    agent = clone / ".venv" / "bin" / "agent"
    agent.write_text(f'#!/bin/sh\nexec {sys.executable} -m agent "$@"\n')
    agent.chmod(0o755)
    ca = tmp_path / "ca"
    ca.mkdir()
    shutil.copy2(certs.ca, ca / "ca.crt")
    shutil.copy2(certs.key("ca"), ca / "ca.key")
    r = subprocess.run(
        [str(clone / "scripts" / "pki.sh"), "issue", "--ca-cert", "ca.crt", "--ca-key",
         "ca.key", "--host", "h01.agents.example.com", "--ip", "10.0.0.1",
         "--trust-domain", "example.com", "--out", "out/h01"],
        capture_output=True, text=True, cwd=ca, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    names = {p.name for p in (ca / "out" / "h01").iterdir()}
    assert names == {"server.crt", "server.key", "client.crt", "client.key", "ca.crt"}


# ---------------------------------------------------------------- python -m bench


def _bench_help(tmp_path: Path, pythonpath: str) -> subprocess.CompletedProcess[str]:
    src = tmp_path / "src"
    if not (src / "bench").exists():
        shutil.copytree(ROOT / "bench", src / "bench")  # bench/ alone: never ./agent
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run(
        [sys.executable, "-m", "bench", "--help"],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_bench_says_why_an_editable_install_cannot_be_imported(tmp_path: Path) -> None:
    """python -m bench names an editable install its agents cannot import, before they fail."""
    if not (ROOT / "bench" / "__main__.py").exists():
        pytest.skip("not a source checkout")
    checkout = tmp_path / "private-checkout"
    checkout.mkdir(mode=0o700)
    # What pip records for `pip install -e`, found first on the path.
    fake = tmp_path / "site" / "worker_agent-0.1.0.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: worker-agent\nVersion: 0.1.0\n")
    (fake / "direct_url.json").write_text(
        json.dumps({"url": checkout.as_uri(), "dir_info": {"editable": True}})
    )
    r = _bench_help(tmp_path, str(fake.parent))
    assert r.returncode == 0, r.stderr
    assert f"the agent is installed editable (pip install -e) from {checkout}" in r.stderr
    assert "will fail with 'No module named agent'" in r.stderr
    assert "the unprivileged modes' user cannot read the checkout (" in r.stderr
    assert "pip install '.[bench]'" in r.stderr
    plain = _bench_help(tmp_path, "")  # this venv's copy: nothing to say
    assert plain.returncode == 0 and "editable" not in plain.stderr, plain.stderr
