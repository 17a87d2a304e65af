"""Configuration: parsing, validation, one-line errors, exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.configfile import ConfigError
from agent.daemon.cli import main as agent_main
from agent.keeper.config import load, parse

from helpers import ROOT, Certs, default_config, to_toml

BASE = """
[grpc_server]
addr = "127.0.0.1:50000"
crt_file = "certs/server.crt"
key_file = "certs/server.key"
ca_file = "certs/ca.crt"
[auth]
clients = ["client"]
[jobs]
policy_file = "policy.yaml"
"""


def p(text: str, path: Path = Path("/etc/agent/config.toml")):  # type: ignore[no-untyped-def]
    return parse(text, path)


def test_defaults_and_relative_paths_resolve_against_config_folder() -> None:
    """Relative paths are relative to the config file, not the working directory."""
    cfg = p(BASE)
    assert cfg.grpc_server.crt_file == Path("/etc/agent/certs/server.crt")
    assert cfg.jobs.policy_file == Path("/etc/agent/policy.yaml")
    assert cfg.jobs.state_dir == Path("/etc/agent/state")
    assert cfg.output_dir == Path("/etc/agent/state/output")
    assert cfg.mtls and cfg.grpc_server.use_tls


@pytest.mark.parametrize(
    "text,section,key,words",
    [
        (BASE + "[bogus]\nx=1\n", "bogus", "", "unknown section"),
        (BASE.replace("ca_file", "ca_flie"), "grpc_server", "ca_flie", "unknown key"),
        (BASE.replace('"127.0.0.1:50000"', "50000"), "grpc_server", "addr", "expected a string"),
        (BASE.replace('"127.0.0.1:50000"', '"localhost"'), "grpc_server", "addr", "host:port"),
        (
            BASE.replace("[auth]", 'use_tls = "yes"\n[auth]'),
            "grpc_server",
            "use_tls",
            "true or false",
        ),
        (
            BASE.replace("[auth]", "max_message_bytes = 1\n[auth]"),
            "grpc_server",
            "max_message_bytes",
            "at least",
        ),
        (BASE.replace('policy_file = "policy.yaml"', ""), "jobs", "policy_file", "required"),
        (BASE + "max_running = 0\n", "jobs", "max_running", "at least 1"),
        (BASE + 'on_output_cap = "explode"\n', "jobs", "on_output_cap", "one of"),
        (BASE + 'umask = "999"\n', "jobs", "umask", "octal"),
        (BASE + "dynamic_uid_min = 0\n", "jobs", "dynamic_uid_min", "at least 1"),
        (BASE + "dynamic_uid_max = 4294967295\n", "jobs", "dynamic_uid_max", "at most"),
        (
            BASE + "dynamic_uid_min = 61000\ndynamic_uid_max = 60000\n",
            "jobs",
            "dynamic_uid_max",
            "below dynamic_uid_min",
        ),
        (
            BASE + "dynamic_uid_min = 60000\ndynamic_uid_max = 70000\n",
            "jobs",
            "dynamic_uid_min",
            "65534",
        ),
        (BASE + 'dynamic_users = "yes"\n', "jobs", "dynamic_users", "true or false"),
        (BASE.replace('ca_file = "certs/ca.crt"', ""), "grpc_server", "ca_file", "no client"),
        (BASE.replace('clients = ["client"]', "clients = []"), "auth", "clients", "at least one"),
        (
            BASE.replace('clients = ["client"]', 'clients = ["a"]\nadmins = ["a"]'),
            "auth",
            "admins",
            "also listed",
        ),
        (BASE + "[limits.max]\ncpu_seconds = 10\n", "limits.default", "cpu_seconds", "between"),
        (
            BASE + '[scheduler]\nregister = true\naddr = "h:1"\n',
            "scheduler",
            "crt_file",
            "required",
        ),
        (BASE + '[scheduler]\nlabels = "web"\n', "scheduler", "labels", "a table of strings"),
        (BASE + "[scheduler]\nlabels = {n = 1}\n", "scheduler", "labels", "a table of strings"),
        (BASE + '[scheduler]\nlabels = {"a b" = "x"}\n', "scheduler", "labels", "label key"),
        (BASE + '[scheduler]\nlabels = {role = "w/eb"}\n', "scheduler", "labels", "value"),
        (
            BASE + '[scheduler]\nregister = true\naddr = "h:1"\naddrs = ["h2"]\n',
            "scheduler",
            "addrs",
            "'h2'",
        ),
        (BASE + '[scheduler]\naddrs = "h:1"\n', "scheduler", "addrs", "list"),
    ],
)
def test_errors_name_file_section_and_key(text: str, section: str, key: str, words: str) -> None:
    """Every refusal is one line naming the file, the section and the key."""
    with pytest.raises(ConfigError) as e:
        p(text)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("/etc/agent/config.toml: ")
    assert f"[{section}]" in msg and key in msg and words in msg


def test_scheduler_labels_load_as_a_table() -> None:
    """[scheduler] labels is an inline table (or a sub-table) of strings."""
    cfg = p(BASE + '[scheduler]\nlabels = {role = "web", "topology.zone" = "eu-1a"}\n')
    assert cfg.scheduler.labels == {"role": "web", "topology.zone": "eu-1a"}
    assert p(BASE).scheduler.labels == {}
    assert p(BASE + '[scheduler.labels]\nrole = "db"\n').scheduler.labels == {"role": "db"}


def test_retired_options_still_load_and_are_ignored() -> None:
    """An old config setting [jobs] prlimit_path/setpriv_path loads; a misspelt key still fails."""
    old = BASE + 'prlimit_path = "/usr/bin/prlimit"\nsetpriv_path = "/usr/bin/setpriv"\n'
    cfg = p(old)
    assert not hasattr(cfg.jobs, "prlimit_path") and not hasattr(cfg.jobs, "setpriv_path")
    assert cfg.jobs == p(BASE).jobs
    with pytest.raises(ConfigError, match=r"\[jobs\] prlimit_pth: unknown key"):
        p(BASE + 'prlimit_pth = "/usr/bin/prlimit"\n')


@pytest.mark.parametrize("addr", ["0.0.0.0:50000", "10.1.2.3:50000", "[::]:1", "example.com:1"])
def test_plaintext_refused_off_loopback(addr: str) -> None:
    """use_tls = false is refused on any non-loopback address, whatever else is set."""
    text = f"""
[grpc_server]
addr = "{addr}"
use_tls = false
allow_plaintext_loopback = true
[auth]
allow_anonymous = true
[jobs]
policy_file = "p.yaml"
"""
    with pytest.raises(ConfigError, match="non-loopback"):
        p(text)


def test_plaintext_on_loopback_needs_explicit_setting() -> None:
    """Plaintext on loopback needs allow_plaintext_loopback = true in so many words."""
    text = """
[grpc_server]
addr = "127.0.0.1:1"
use_tls = false
[auth]
allow_anonymous = true
[jobs]
policy_file = "p.yaml"
"""
    with pytest.raises(ConfigError, match="allow_plaintext_loopback"):
        p(text)
    cfg = p(text.replace("use_tls = false", "use_tls = false\nallow_plaintext_loopback = true"))
    assert not cfg.grpc_server.use_tls and not cfg.mtls


def test_toml_syntax_error_is_one_line(tmp_path: Path) -> None:
    """A TOML syntax error names the file."""
    f = tmp_path / "c.toml"
    f.write_text("[grpc_server\n")
    with pytest.raises(ConfigError, match=str(f)):
        load(f)
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "missing.toml")


def test_check_config_cli_exit_codes(
    tmp_path: Path, certs: Certs, standard_policy: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`agent check-config` prints ok and exits 0, or one line and exits 2."""
    pol = tmp_path / "policy.yaml"
    pol.write_text(standard_policy)
    cfg = tmp_path / "config.toml"
    cfg.write_text(default_config("127.0.0.1:1", certs, pol, tmp_path / "state"))
    assert agent_main(["check-config", "--config", str(cfg)]) == 0
    assert "ok" in capsys.readouterr().out
    cfg.write_text(cfg.read_text() + "\n[jobs.extra]\n")
    assert agent_main(["check-config", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(cfg) in err and "[jobs]" in err


def test_missing_files_are_refused_at_start(
    tmp_path: Path, certs: Certs, standard_policy: str
) -> None:
    """A missing certificate or policy file: one line, exit 2, from the real command."""
    pol = tmp_path / "policy.yaml"
    pol.write_text(standard_policy)
    cfg = tmp_path / "config.toml"
    cfg.write_text(default_config("127.0.0.1:1", certs, tmp_path / "nope.yaml", tmp_path / "state"))
    r = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "[jobs] policy_file" in r.stderr and "no such file" in r.stderr
    assert not (tmp_path / "state").exists()


def test_to_toml_roundtrip_helper() -> None:
    """The tests' TOML writer produces what the parser reads."""
    text = to_toml(
        {"jobs": {"policy_file": "/x", "max_running": 3}, "limits": {"default": {"cpu_seconds": 5}}}
    )
    cfg = parse(
        BASE.replace('policy_file = "policy.yaml"', "") + text.replace("[jobs]", ""),
        Path("/c.toml"),
    )
    assert cfg.limits.default.cpu_seconds == 5
