"""The module graph is one-way: client and scheduler never import the daemon, and the
job keeper (agent/keeper) never imports the agent (agent/daemon), grpc, the client or the
scheduler: the agent imports the keeper, never the other way round."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import agent

PACKAGE = Path(agent.__file__).resolve().parent
PROGRAMS = ("agent.daemon", "agent.keeper", "agent.client", "agent.scheduler")
# What the job keeper never imports: the agent, the network, the other programs.
KEEPER_FORBIDDEN = ("agent.daemon", "grpc", "agent.client", "agent.scheduler")
KEEPER_FILES = sorted((PACKAGE / "keeper").rglob("*.py"))

# Modules of the client library and the scheduler, and the names to touch so
# that a lazily loading package (agent.client) really loads what it exports.
PROGRAM_MODULES = {
    "agent.client": "[getattr(agent.client, n) for n in agent.client.__all__]",
    "agent.client.cli": "None",
    "agent.scheduler.config": "None",
    "agent.scheduler.registry": "None",
    "agent.scheduler.service": "None",
    "agent.scheduler.server": "None",
    "agent.scheduler.cli": "None",
    "agent.scheduler.store": "None",
    "agent.scheduler.targets": "None",
    "agent.scheduler.runs": "None",
    "agent.scheduler.runservice": "None",
    "agent.scheduler.fanoutcli": "None",
    "agent.client.runs": "None",
}


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("module", sorted(PROGRAM_MODULES))
def test_programs_do_not_load_daemon_modules(module: str) -> None:
    """Importing the client library or the scheduler loads no agent.daemon module."""
    touch = PROGRAM_MODULES[module]
    code = (
        f"import {module}, sys; {touch}; "
        "print([m for m in sys.modules if m.startswith('agent.daemon')])"
    )
    assert _run(code) == "[]"


@pytest.mark.parametrize("module", ["agent.daemon.cli", "agent.keeper.config"])
def test_daemon_entry_and_config_do_not_import_grpc(module: str) -> None:
    """The daemon's CLI and config load without grpc (its cipher policy comes first)."""
    assert _run(f"import {module}, sys; print('grpc' in sys.modules)") == "False"


@pytest.mark.parametrize(
    "module", ["agent.keeper.keeper", "agent.keeper.keeperstate", "agent.keeper.decision"]
)
def test_the_keeper_imports_no_grpc_asyncio_or_yaml(module: str) -> None:
    """The job keeper faces no network: grpc and asyncio stay out of it (and out of its
    memory), whatever it grows. It decides with the policy but parses none itself (its
    loader process does, see agent.keeper.decision), so yaml stays out too."""
    code = (
        f"import {module}, sys; "
        "print(sorted(m for m in ('grpc', 'asyncio', 'yaml', 'tomllib', 'hashlib') "
        "if m in sys.modules))"
    )
    assert _run(code) == "[]"


def test_the_keeper_loads_inspect_policyfile_and_threading_only_when_used() -> None:
    """The keeper's idle memory: dataclasses' inspect (with ast, dis, tokenize: about a
    megabyte) stays a stand-in until something uses it (agent.keeper.deferred; up to
    Python 3.11, where dataclasses needs it only for a class without a docstring, and
    every class the keeper loads has one); the policy's reading (policyfile, glob, grp),
    threading and unicodedata are not loaded either. The first use of a name of inspect
    loads the real module, which then stands in sys.modules."""
    code = (
        "import agent.keeper.keeper, agent.keeper.decision, agent.keeper.spawner, sys; "
        "print(sorted(m for m in ('ast', 'dis', 'tokenize', 'agent.keeper.policyfile', "
        "'glob', 'grp', 'threading', 'unicodedata') if m in sys.modules)); "
        "import inspect; sig = inspect.signature(len); "
        "print(str(sig), sys.modules['inspect'].__spec__.name, 'ast' in sys.modules)"
    )
    idle, used = _run(code).splitlines()
    if sys.version_info < (3, 12):
        assert idle == "[]"
    else:  # 3.12 and later: every dataclass reads its annotations with inspect
        assert "agent.keeper.policyfile" not in idle and "threading" not in idle
    assert used == "(obj, /) inspect True"


def test_the_agent_parses_no_policy_itself() -> None:
    """The agent decides no start (the keeper does): its server and start-up checks do
    not bring yaml into its memory (the policy is checked by a loader process)."""
    code = (
        "import agent.daemon.server, agent.daemon.startup, agent.daemon.cli, sys; "
        "print('yaml' in sys.modules)"
    )
    assert _run(code) == "False"


def test_agentctl_module_does_not_import_grpc_early() -> None:
    """Importing agentctl's module sets grpc's log environment and does not load grpc."""
    code = (
        "import os, sys; os.environ.pop('GRPC_VERBOSITY', None); "
        "import agent.client.cli; "
        "print('grpc' in sys.modules, os.environ['GRPC_VERBOSITY'])"
    )
    assert _run(code).split() == ["False", "NONE"]


def _imported(argv: list[str]) -> dict[str, list[str]]:
    """Run the installed ``agentctl`` with ARGV under ``-X importtime``.

    Returns every module it imported, each with the modules whose import
    loaded it, innermost first (none for a top-level import).
    """
    script = Path(sys.executable).with_name("agentctl")
    r = subprocess.run(
        [sys.executable, "-X", "importtime", str(script), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    # "import time: self | cumulative | <2 spaces a level>name", each module
    # after the ones it imported: its importer is the next line a level up.
    rows = []
    for line in r.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            field = line.split("|")[2]
            name = field.strip()
            if name != "imported package":
                rows.append(((len(field) - len(field.lstrip()) - 1) // 2, name))
    out: dict[str, list[str]] = {}
    for i, (depth, name) in enumerate(rows):
        chain = []
        for d, n in rows[i + 1 :]:
            if d < depth:
                chain.append(n)
                depth = d
        out.setdefault(name, chain)
    return out


@pytest.mark.parametrize(
    "argv", [["--version"], ["--help"], ["start", "--help"], ["completion", "bash"]]
)
def test_agentctl_commands_without_a_call_load_no_grpc(argv: list[str]) -> None:
    """agentctl --version, --help and completion load neither grpc, protobuf nor the client."""
    mods = _imported(argv)
    assert "agent.client.cli" in mods
    loaded = sorted(
        m
        for m in mods
        if m.split(".")[0] in ("grpc", "google", "asyncio", "shutil")
        or m.startswith(("agent.client.", "agent._proto"))
    )
    assert loaded == ["agent.client.cli"]


def test_agentctl_call_loads_the_synchronous_client_only(agent: Any) -> None:
    """agentctl start --wait: no asyncio client; asyncio comes only inside grpc's own import.

    grpcio imports asyncio itself (grpc.aio, cygrpc), so a grpc client cannot do
    without it; agentctl's own modules never import it.
    """
    c = agent.certs
    flags = ["--addr", agent.addr, "--ca", str(c.ca), "--cert", str(c.crt("client"))]
    mods = _imported([*flags, "--key", str(c.key("client")), "start", "--wait", "true"])
    assert "agent.client.sync" in mods and "agent.client.aio" not in mods

    def by_grpc(module: str) -> bool:
        return any(m.split(".")[0] == "grpc" for m in mods[module])

    assert by_grpc("asyncio")
    # Nor what only other commands need (unless grpc brings it).
    assert [m for m in ("json", "tomllib", "shlex", "shutil") if m in mods and not by_grpc(m)] == []


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; relative ones resolved)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1]  # a module's package; for __init__.py the package itself
    return _imports_of(path.read_text(encoding="utf-8"), package)


def _imports_of(source: str, package: list[str]) -> set[str]:
    """Modules imported anywhere in ``source`` (also inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def _violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for f in files:
        for m in sorted(_imports(f)):
            if any(m == p or m.startswith(p + ".") for p in forbidden):
                bad.append(f"{f.relative_to(PACKAGE.parent)} imports {m}")
    return bad


def test_client_and_scheduler_never_import_the_daemon_statically() -> None:
    """No module of agent/client or agent/scheduler names agent.daemon in an import."""
    files = sorted((PACKAGE / "client").rglob("*.py")) + sorted(
        (PACKAGE / "scheduler").rglob("*.py")
    )
    assert files
    assert _violations(files, ("agent.daemon",)) == []


def test_shared_modules_import_no_program() -> None:
    """agent/*.py (shared by all three programs) import none of the three programs."""
    # __main__.py is not shared: it is ``python -m agent``, the daemon's entry.
    files = sorted(f for f in PACKAGE.glob("*.py") if f.name != "__main__.py")
    assert PACKAGE / "channel.py" in files
    assert _violations(files, PROGRAMS) == []


def test_the_keeper_never_imports_the_agent_statically() -> None:
    """No module of agent/keeper names agent.daemon, grpc, the client or the scheduler in
    an import, not even inside a function (the agent imports the keeper, not back)."""
    assert PACKAGE / "keeper" / "keeper.py" in KEEPER_FILES
    assert _violations(KEEPER_FILES, KEEPER_FORBIDDEN) == []


def test_the_keeper_loads_nothing_of_the_agent() -> None:
    """Importing every module of agent.keeper (in a fresh interpreter) loads no module of
    agent.daemon, grpc, the client or the scheduler, whatever they import in turn."""
    names = sorted(
        ".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for f in KEEPER_FILES
    )
    assert "agent.keeper.keeperservice" in names
    code = (
        f"import importlib, sys; [importlib.import_module(n) for n in {names!r}]; "
        f"print(sorted(m for m in sys.modules if m.startswith({KEEPER_FORBIDDEN!r})))"
    )
    assert _run(code) == "[]"


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One loop of imports in ``graph`` (module -> the modules it imports), [] if none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(m: str) -> list[str]:
        if m in path:
            return [*path[path.index(m) :], m]
        if m in done:
            return []
        path.append(m)
        for n in sorted(graph[m]):
            if found := visit(n):
                return found
        path.pop()
        done.add(m)
        return []

    for m in sorted(graph):
        if found := visit(m):
            return found
    return []


def test_the_modules_import_one_way() -> None:
    """No loop of imports among the modules of agent/, not even through an import inside a
    function or one for a type only (a package's __init__ handing names on is not a
    module of its own here; the generated code is left out)."""
    files = [f for f in PACKAGE.rglob("*.py") if "_proto" not in f.parts]
    modules = {
        ".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts): f
        for f in files
        if f.name != "__init__.py"
    }
    assert "agent.keeper.keeperstate" in modules
    graph = {m: {n for n in _imports(f) if n in modules and n != m} for m, f in modules.items()}
    assert _cycle(graph) == []
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_static_check_sees_every_form_of_import() -> None:
    """The static check finds plain, from, relative and function-local imports."""
    source = (
        "import agent.daemon.server\n"
        "from agent.daemon import policy\n"
        "from ..daemon.config import load\n"
        "def f() -> None:\n    from agent.daemon.spawn import x\n"
    )
    found = _imports_of(source, ["agent", "client"])
    assert {
        "agent.daemon.server",
        "agent.daemon.policy",
        "agent.daemon.config",
        "agent.daemon.spawn",
    } <= found
