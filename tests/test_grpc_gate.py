"""The daemon's gate before grpc is imported (agent.daemon.grpc_gate), in fresh interpreters."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_open_gate_sets_the_process_wide_settings() -> None:
    """Before grpc: fork support off and, for a key type, the cipher suites set."""
    r = _run(
        "import os\n"
        "os.environ.pop('GRPC_SSL_CIPHER_SUITES', None)\n"
        "from agent.daemon.grpc_gate import open_gate\n"
        "open_gate(key_type='ec', tls13_only=False)\n"
        "print(os.environ['GRPC_ENABLE_FORK_SUPPORT'])\n"
        "print('ECDHE' in os.environ['GRPC_SSL_CIPHER_SUITES'])\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "True"]


def test_open_gate_without_a_key_type_leaves_the_ciphers_alone() -> None:
    """No key type (no TLS): the cipher variable is not set, fork support still off."""
    r = _run(
        "import os\n"
        "os.environ.pop('GRPC_SSL_CIPHER_SUITES', None)\n"
        "from agent.daemon.grpc_gate import open_gate\n"
        "open_gate(key_type=None, tls13_only=False)\n"
        "print(os.environ.get('GRPC_SSL_CIPHER_SUITES'), os.environ['GRPC_ENABLE_FORK_SUPPORT'])\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["None", "0"]


def test_open_gate_refuses_once_grpc_is_imported() -> None:
    """grpc already imported: GateError, since the settings would silently not apply."""
    r = _run(
        "import grpc\n"
        "from agent.daemon.grpc_gate import GateError, open_gate\n"
        "try:\n"
        "    open_gate(key_type='ec', tls13_only=False)\n"
        "except GateError as e:\n"
        "    print('refused:', e)\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("refused: grpc was imported before")
