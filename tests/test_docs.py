"""Documentation matches the code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT


def test_readme_configuration_reference_is_current() -> None:
    """README's configuration table is generated from agent.keeper.config."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "update_docs.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr


def test_sample_config_is_valid() -> None:
    """The committed config.toml and policy.yaml pass validation (parse step)."""
    from agent.keeper import policyfile
    from agent.keeper.config import load

    cfg = load(ROOT / "config.toml")
    assert cfg.mtls
    pol = policyfile.load(ROOT / "policy.yaml")
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

    from agent.keeper import policyfile

    if not os.path.exists("/usr/bin/systemctl"):
        pytest.skip("the example names /usr/bin/systemctl")
    text = (ROOT / "policy.example.yaml").read_text().replace("cwd: /var/lib/agent", "cwd: /")
    pol = policyfile.parse(text, "policy.example.yaml", base=ROOT)
    names = [e.name for e in pol.entries]
    assert names == ["maintenance", "restart-service"]
    m = pol.entries[0]
    assert m.is_interpreter and m.identities == frozenset({"scheduler", "admin"})
    assert m.scripts is not None and m.scripts[3].sha256 == "0" * 64
    assert any(r.matches(str(ROOT / "relative/scripts/x.sh")) for r in m.scripts)
    assert m.env == {"TZ", "BACKUP_TARGET"}


# ---------------------------------------------------------------- names in README and docs

# A path of the tree as the docs write it: systemd/worker-agent.service, scripts/test.sh,
# "docs/deployment.md"; not part of a longer path ("/opt/scripts/x.sh", "$PWD/examples/...").
_TREE_PATH = re.compile(
    r"(?<![\w./$~@-])((?:systemd|scripts|packaging|docs|examples|tests|agent|bench|proto|\.ci)"
    r"/[\w./*-]*[\w*])"
)
_VERBS = (
    "start|stop|restart|try-restart|reload|reload-or-restart|status|enable|disable|edit|"
    "is-active|is-enabled|is-failed|show|kill|mask|unmask|reset-failed|cat"
)
_OPTS = r"(?:-[-\w=]+\s+)*"
_SYSTEMCTL_UNIT = re.compile(rf"systemctl\s+{_OPTS}(?:{_VERBS})\s+{_OPTS}([\w@.$-]+)")
_JOURNAL_UNIT = re.compile(rf"journalctl\s+{_OPTS}?-u\s+([\w@.$-]+)")
_SNIPPET = re.compile(r"systemd-(?:tmpfiles\s+--create|sysusers)\s+([\w@.$-]+\.conf)")


def _docs() -> list[Path]:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    if not (ROOT / "systemd").is_dir():
        pytest.skip("not a source checkout")
    return docs


def test_every_tree_path_in_readme_and_docs_exists() -> None:
    """Each systemd/..., scripts/..., packaging/..., docs/... (etc.) path the docs name exists."""
    missing = []
    for doc in _docs():
        for m in _TREE_PATH.finditer(doc.read_text()):
            path = m.group(1)
            if path.endswith(".so"):
                continue  # a build product (the C extension), not a file of the tree
            found = any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()
            if not found:
                missing.append(f"{doc.name}: {path}")
    assert not missing, missing


def test_every_unit_name_in_readme_and_docs_is_the_shipped_one() -> None:
    """systemctl/journalctl commands name the shipped units (the agent's and its keeper's,
    each installed under its own name), and their snippets' names."""
    unit = "worker-agent"  # systemd/worker-agent.service, installed under its own name
    units = set()
    for name in (unit, f"{unit}-keeper"):
        assert (ROOT / "systemd" / f"{name}.service").exists()
        units |= {name, f"{name}.service"}
    wrong = []
    for doc in _docs():
        text = doc.read_text()
        for m in [*_SYSTEMCTL_UNIT.finditer(text), *_JOURNAL_UNIT.finditer(text)]:
            name = m.group(1)
            # Units of other software (a job's `systemctl restart nginx`) are not ours.
            if "agent" in name and not name.startswith("$") and name not in units:
                wrong.append(f"{doc.name}: {' '.join(m.group(0).split())}")
        for m in _SNIPPET.finditer(text):
            if m.group(1) != f"{unit}.conf":  # the package's sysusers.d/tmpfiles.d names
                wrong.append(f"{doc.name}: {' '.join(m.group(0).split())}")
    assert not wrong, wrong


# ---------------------------------------------------------------- the module map

# A table of README's "Architecture" section and the package folder the line that
# introduces it names: "Shared (`agent/`):", "The daemon (`agent/daemon/`), ...:".
_MAP_TABLE = re.compile(r"\(`(agent/(?:\w+/)?)`\)[^\n]*:\n\n((?:\|[^\n]*\n)+)")


def _module_map() -> dict[str, set[str]]:
    """Package folder -> the names README's module map gives it (`x.py`, `_proto/`)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Architecture\n", 1)[1].split("\n## ", 1)[0]
    found: dict[str, set[str]] = {}
    for folder, table in _MAP_TABLE.findall(section):
        for row in table.splitlines()[2:]:  # after the header and the |---| line
            first = row.split("|")[1]
            found.setdefault(folder, set()).update(re.findall(r"`([^`]+)`", first))
    return found


def _modules(folder: Path) -> set[str]:
    """The modules (and C sources, and sub-packages that are not programs) of ``folder``."""
    names = {p.name for p in folder.iterdir() if p.suffix in (".py", ".c")}
    names.discard("__init__.py")
    if folder.name == "agent":
        names.add("_proto/")
    return names


def test_readme_module_map_names_every_module() -> None:
    """README's module map names every module of agent/, agent/daemon, agent/client and
    agent/scheduler in its package's table, and nothing that does not exist."""
    if not (ROOT / "agent" / "daemon").is_dir():
        pytest.skip("not a source checkout")
    found = _module_map()
    folders = {"agent/": ROOT / "agent"} | {
        f"agent/{p.name}/": p
        for p in sorted((ROOT / "agent").iterdir())
        if (p / "__init__.py").exists() and p.name != "_proto"
    }
    assert sorted(found) == sorted(folders)
    for key, folder in folders.items():
        actual = _modules(folder)
        assert sorted(actual - found[key]) == [], f"{key}: missing from README's module map"
        assert sorted(found[key] - actual) == [], f"{key}: README names modules that are gone"
