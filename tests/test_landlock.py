"""Landlock confinement: pure planning on a fake tree, enforcement on the real kernel.

Kernel tests never confine the pytest process: each runs PROBE in a fresh interpreter
(forking a process that has imported grpc crashes children), which confines itself and
reports what each attempt gave as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.keeper import landlock
from agent.keeper.landlock import (
    FILE_RIGHTS,
    READ,
    READ_EXEC,
    WRITE,
    Child,
    LandlockError,
    LandlockSpec,
    PathRule,
    degrade,
    handled_access,
    plan_rules,
    required_abi,
)

# --- pure planning -------------------------------------------------------------------

# A fake tree: dict = directory, None = file, str = symlink target.
Tree = dict[str, Any]
ETC: Tree = {
    "r": {
        "etc": {
            "hosts": None,
            "passwd": None,
            "agent": {"key.pem": None, "agent.toml": None},
            "ssl": {"certs": {"ca.pem": None}, "private": {"host.key": None}},
            "agent-link": "/r/etc/agent",
            "outside-link": "/r/srv",
        },
        "srv": {"data": None},
        "var": {"lib": {"agent": {"state.db": None}, "other": {}}},
    }
}


@dataclass
class FakeFs:
    tree: Tree

    def node(self, path: str) -> Any:
        node: Any = self.tree
        for part in [p for p in path.split("/") if p]:
            if not isinstance(node, dict) or part not in node:
                raise FileNotFoundError(path)
            node = node[part]
        return node

    def listdir(self, path: str) -> list[Child]:
        node = self.node(path)
        if not isinstance(node, dict):
            raise NotADirectoryError(path)
        return [Child(n, isinstance(c, dict), isinstance(c, str)) for n, c in node.items()]

    def resolve(self, path: str) -> str:
        try:
            node = self.node(path)
        except FileNotFoundError:
            return os.path.normpath(path)
        return node if isinstance(node, str) else os.path.normpath(path)


def plan(spec: LandlockSpec, tree: Tree = ETC) -> dict[str, int]:
    fs = FakeFs(tree)
    return {r.path: r.access for r in plan_rules(spec, listdir=fs.listdir, resolve=fs.resolve)}


def test_denied_file_inside_allowed_tree_is_punched_out() -> None:
    """A denied file makes its allowed ancestor expand into its siblings, minus the file."""
    rules = plan(LandlockSpec(read=("/r/etc",), deny=("/r/etc/ssl/private/host.key",)))
    assert "/r/etc" not in rules and "/r/etc/ssl" not in rules
    assert "/r/etc/ssl/private/host.key" not in rules
    assert rules["/r/etc/hosts"] == READ
    assert rules["/r/etc/ssl/certs"] == READ
    assert "/r/etc/ssl/private" not in rules  # its only child is the denied file


def test_denied_directory_is_kept_out_and_siblings_granted() -> None:
    """A denied directory gets no rule and no rule on any of its ancestors."""
    rules = plan(LandlockSpec(read_exec=("/r/etc",), deny=("/r/etc/agent",)))
    assert set(rules) == {"/r/etc/hosts", "/r/etc/passwd", "/r/etc/ssl"}
    assert all(a == READ_EXEC for a in rules.values())


def test_denied_equal_to_allowed_is_dropped() -> None:
    """An allowed path equal to a denied path yields no rule at all."""
    assert plan(LandlockSpec(write=("/r/var/lib/agent",), deny=("/r/var/lib/agent",))) == {}


def test_allowed_inside_denied_is_dropped() -> None:
    """An allowed path below a denied one is dropped; others stay."""
    rules = plan(LandlockSpec(read=("/r/etc/agent/key.pem", "/r/srv"), deny=("/r/etc/agent",)))
    assert rules == {"/r/srv": READ}


def test_symlink_children_get_no_rule() -> None:
    """A symlink into a denied dir (or out of the tree) is never granted: no widening."""
    rules = plan(LandlockSpec(read=("/r/etc",), deny=("/r/etc/agent",)))
    assert "/r/etc/agent-link" not in rules
    assert "/r/etc/outside-link" not in rules and "/r/srv" not in rules


def test_allowed_symlink_is_resolved_before_the_deny_check() -> None:
    """An allowed path that is a symlink to a denied dir is resolved, then dropped."""
    assert plan(LandlockSpec(read=("/r/etc/agent-link",), deny=("/r/etc/agent",))) == {}


def test_nonexistent_denied_path_is_still_kept_out() -> None:
    """A denied path that does not exist yet still forbids a rule on its parent."""
    rules = plan(LandlockSpec(write=("/r/var/lib",), deny=("/r/var/lib/agent/audit.log",)))
    assert "/r/var/lib" not in rules and "/r/var/lib/agent" not in rules
    assert rules == {"/r/var/lib/agent/state.db": WRITE, "/r/var/lib/other": WRITE}


def test_denied_symlink_keeps_both_link_and_target_out() -> None:
    """A denied path that is a symlink keeps out its target and the link's own name."""
    rules = plan(LandlockSpec(read=("/r/etc", "/r/srv"), deny=("/r/etc/outside-link",)))
    assert "/r/srv" not in rules and "/r/etc" not in rules
    assert set(rules) == {"/r/etc/hosts", "/r/etc/passwd", "/r/etc/agent", "/r/etc/ssl"}


def test_overlapping_grants_are_merged() -> None:
    """The same path allowed twice gets one rule with the union of both accesses."""
    rules = plan(LandlockSpec(read_exec=("/r/srv",), write=("/r/srv",)))
    assert rules == {"/r/srv": READ_EXEC | WRITE}


def test_proc_self_is_kept_literal_for_the_child() -> None:
    """/proc/self is not resolved in the spawner (it would name the spawner's pid)."""
    assert plan(LandlockSpec(read=("/proc/self",))) == {"/proc/self": READ}


def test_every_problem_is_reported_at_once() -> None:
    """Relative paths, bad ports and unlistable dirs are all reported in one error."""

    def listdir(path: str) -> list[Child]:
        raise PermissionError(13, "Permission denied")

    spec = LandlockSpec(read=("etc", "/r"), connect_tcp=(70000,), deny=("/r/x", "rel"))
    with pytest.raises(LandlockError) as err:
        plan_rules(spec, listdir=listdir, resolve=os.path.normpath)
    assert len(err.value.problems) == 4, err.value.problems
    assert "'etc'" in str(err.value) and "70000" in str(err.value) and "/r/x" in str(err.value)


def test_rule_count_is_capped() -> None:
    """Hole punching that explodes into too many rules is refused, not silently kept."""
    tree: Tree = {"d": {f"f{i}": None for i in range(20)} | {"secret": None}}
    fs = FakeFs(tree)
    with pytest.raises(LandlockError, match="20 rules after"):
        plan_rules(
            LandlockSpec(read=("/d",), deny=("/d/secret",)),
            listdir=fs.listdir,
            resolve=fs.resolve,
            max_rules=10,
        )


def test_real_scandir_does_not_follow_symlinks(tmp_path: Path) -> None:
    """On a real tree, a symlinked dir holding the secret is skipped, not entered."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "key").write_text("k")
    (tmp_path / "pub").write_text("p")
    (tmp_path / "via").symlink_to(tmp_path / "conf")
    rules = plan_rules(LandlockSpec(read=(str(tmp_path),), deny=(str(tmp_path / "conf"),)))
    assert [r.path for r in rules] == [str(tmp_path / "pub")]


@pytest.mark.parametrize(
    ("spec", "abi", "features"),
    [
        (LandlockSpec(connect_tcp=None, bind_tcp=None, scope_signals=False,
                      scope_abstract_unix=False), 3, ["fs", "truncate"]),
        (LandlockSpec(write=("/tmp",), connect_tcp=None, bind_tcp=None, scope_signals=False,
                      scope_abstract_unix=False), 3, ["fs", "refer", "truncate"]),
        (LandlockSpec(connect_tcp=(443,), bind_tcp=None, scope_signals=False,
                      scope_abstract_unix=False), 4, ["fs", "truncate", "tcp_connect"]),
        (LandlockSpec(read=("/dev/null",), connect_tcp=None, bind_tcp=None,
                      scope_signals=False, scope_abstract_unix=False),
         5, ["fs", "truncate", "ioctl_dev"]),
        (LandlockSpec(connect_tcp=None, bind_tcp=None, scope_abstract_unix=False),
         6, ["fs", "truncate", "scope_signals"]),
        (LandlockSpec(), 6,
         ["fs", "truncate", "tcp_connect", "tcp_bind", "scope_signals", "scope_abstract_unix"]),
    ],
)  # fmt: skip
def test_required_abi_per_feature(spec: LandlockSpec, abi: int, features: list[str]) -> None:
    """Each feature a spec uses raises the required ABI to the one that brought it."""
    assert required_abi(spec) == (abi, features)


def test_handled_access_masks_per_abi() -> None:
    """Each ABI handles exactly the rights it introduced, cumulatively."""
    base = (1 << 13) - 1
    assert handled_access(0) == (0, 0, 0)
    assert handled_access(1) == (base, 0, 0)
    assert bin(handled_access(1)[0]).count("1") == 13
    assert handled_access(2) == (base | landlock.FS_REFER, 0, 0)
    assert handled_access(3) == (base | landlock.FS_REFER | landlock.FS_TRUNCATE, 0, 0)
    assert handled_access(4) == (handled_access(3)[0], 0b11, 0)
    assert handled_access(5) == (handled_access(3)[0] | landlock.FS_IOCTL_DEV, 0b11, 0)
    assert handled_access(6) == (handled_access(5)[0], 0b11, 0b11)
    assert handled_access(7) == handled_access(6) == handled_access(99)
    assert FILE_RIGHTS == 0b1100000000000111


def test_degrade_strips_and_reports_what_the_abi_cannot_enforce() -> None:
    """degrade() drops ports and scopes an ABI lacks and names each lost feature."""
    spec = LandlockSpec(write=("/tmp",), connect_tcp=(80,))
    kept, lost = degrade(spec, 3)
    assert kept == LandlockSpec(
        write=("/tmp",), connect_tcp=None, bind_tcp=None, scope_signals=False,
        scope_abstract_unix=False,
    )  # fmt: skip
    assert [t.split(" ")[0] for t in lost] == [
        "tcp_connect", "tcp_bind", "scope_signals", "scope_abstract_unix",
    ]  # fmt: skip
    assert "kernel has 3" in lost[0]
    assert degrade(spec, 7) == (spec, [])
    assert required_abi(kept)[0] == 3


def test_prepare_refuses_what_the_abi_cannot_express() -> None:
    """prepare() fails closed on a spec needing net rules on ABI 3, or on ABI 0."""
    with pytest.raises(LandlockError, match="cannot enforce tcp_connect"):
        landlock.prepare([], LandlockSpec(connect_tcp=(80,)), 3)
    with pytest.raises(LandlockError, match="ABI 0"):
        landlock.prepare([PathRule("/usr", READ)], degrade(LandlockSpec(), 0)[0], 0)


# --- the kernel ----------------------------------------------------------------------

needs_landlock = pytest.mark.skipif(
    landlock.abi_version() < 6,
    reason=f"Landlock ABI 6+ needed, kernel has {landlock.abi_version()} (0: disabled)",
)

PROBE = textwrap.dedent(
    """
    import errno, json, os, signal, socket, subprocess, sys
    from agent.keeper import landlock as ll

    cfg = json.loads(sys.argv[1])
    spec = ll.LandlockSpec(**{k: tuple(v) if isinstance(v, list) else v
                              for k, v in cfg["spec"].items()})
    abi = ll.effective_abi(cfg["cap"])
    kept, lost = ll.degrade(spec, abi)
    prepared = ll.prepare(ll.plan_rules(kept), kept, abi)
    out = {"lost": lost, "skipped": prepared.skipped}
    try:
        if cfg["restrict"]:
            prepared.restrict(cfg["extra"])
    except OSError as e:
        out["restrict"] = [errno.errorcode[e.errno], str(e)]
        print(json.dumps(out)); sys.exit(0)
    p = cfg["paths"]

    def attempt(name, fn):
        try:
            fn()
            out[name] = "ok"
        except OSError as e:
            out[name] = errno.errorcode[e.errno]

    def read(path):
        with open(path) as f:
            f.read()

    def write(path):
        with open(path, "w") as f:
            f.write("x")

    def connect(port):
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass

    def abstract(name):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect("\\0" + name)

    attempt("read_allowed", lambda: read(p["hosts"]))
    attempt("read_denied_key", lambda: read(p["key"]))
    attempt("read_denied_file", lambda: read(p["secret"]))
    attempt("write_readonly", lambda: write(p["etc"] + "/new"))
    attempt("write_ungranted", lambda: write(p["root"] + "/new"))
    attempt("write_scratch", lambda: write(p["scratch"] + "/out"))
    attempt("planted_symlink", lambda: read(p["scratch"] + "/planted"))
    attempt("new_symlink", lambda: (os.symlink(p["key"], p["scratch"] + "/mine"),
                                    read(p["scratch"] + "/mine")))
    attempt("link_key_in", lambda: os.link(p["key"], p["scratch"] + "/key"))
    attempt("link_readonly_in", lambda: os.link(p["hosts"], p["scratch"] + "/hosts"))
    attempt("rename_readonly_in", lambda: os.rename(p["hosts"], p["scratch"] + "/h2"))
    attempt("rename_within_scratch", lambda: os.rename(p["scratch"] + "/out",
                                                       p["scratch"] + "/sub/out"))
    attempt("connect_allowed", lambda: connect(p["port_ok"]))
    attempt("connect_denied", lambda: connect(p["port_no"]))
    attempt("signal_parent", lambda: os.kill(os.getppid(), 0))
    attempt("abstract_unix", lambda: abstract(p["abstract"]))
    attempt("exec_allowed", lambda: subprocess.run([p["true"]], check=True))
    attempt("exec_not_allowed", lambda: subprocess.run([p["copied_true"]], check=True))
    attempt("exec_from_scratch", lambda: subprocess.run([p["scratch_true"]], check=True))
    print(json.dumps(out))
    """
)

CONFINED = {
    "read_allowed": "ok",
    "read_denied_key": "EACCES",
    "read_denied_file": "EACCES",
    "write_readonly": "EACCES",
    "write_ungranted": "EACCES",
    "write_scratch": "ok",
    "planted_symlink": "EACCES",
    "new_symlink": "EACCES",
    "link_key_in": "EXDEV",
    "link_readonly_in": "EXDEV",
    "rename_readonly_in": "EACCES",
    "rename_within_scratch": "ok",
    "connect_allowed": "ok",
    "connect_denied": "EACCES",
    "signal_parent": "EPERM",
    "abstract_unix": "EPERM",
    "exec_allowed": "ok",
    "exec_not_allowed": "EACCES",
    "exec_from_scratch": "EACCES",
}


@dataclass
class Box:
    """A tmp_path tree, two TCP listeners and an abstract socket for PROBE to try."""

    paths: dict[str, Any]
    spec: dict[str, Any]
    extra: list[str]

    def run(self, restrict: bool = True, cap: int | None = None, **spec: Any) -> dict[str, Any]:
        cfg = {
            "spec": self.spec | spec,
            "extra": self.extra,
            "paths": self.paths,
            "restrict": restrict,
            "cap": cap,
        }
        proc = subprocess.run(
            [sys.executable, "-c", PROBE, json.dumps(cfg)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        result: dict[str, Any] = json.loads(proc.stdout)
        return result


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    root = tmp_path / "root"
    etc, scratch = root / "etc", root / "scratch"
    (etc / "agent").mkdir(parents=True)
    (etc / "hosts").write_text("127.0.0.1 localhost\n")
    (etc / "secret.key").write_text("s")
    (etc / "agent" / "key.pem").write_text("k")
    (scratch / "sub").mkdir(parents=True)
    (scratch / "planted").symlink_to(etc / "agent" / "key.pem")
    copied = shutil.copy("/usr/bin/true", etc / "true")
    shutil.copy("/usr/bin/true", scratch / "true")
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0landlock-test-{os.getpid()}")
    abstract.listen()
    ports = [s.getsockname()[1] for s in listeners]
    prefixes = sorted({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix})
    pkg = str(Path(landlock.__file__).resolve().parents[2])
    try:
        yield Box(
            paths={
                "root": str(root), "etc": str(etc), "hosts": str(etc / "hosts"),
                "key": str(etc / "agent" / "key.pem"), "secret": str(etc / "secret.key"),
                "scratch": str(scratch), "port_ok": ports[0], "port_no": ports[1],
                "abstract": f"landlock-test-{os.getpid()}", "true": "/usr/bin/true",
                "copied_true": str(copied), "scratch_true": str(scratch / "true"),
            },
            spec={
                "read_exec": ["/usr", "/lib", "/lib64", "/bin", *prefixes, pkg],
                "read": [str(etc), "/proc/self"],
                "write": ["/dev/null"],
                "connect_tcp": [ports[0]],
                "bind_tcp": [],
                "scope_signals": True,
                "scope_abstract_unix": True,
                "deny": [str(etc / "agent"), str(etc / "secret.key")],
            },
            extra=[str(scratch)],
        )  # fmt: skip
    finally:
        for s in [*listeners, abstract]:
            s.close()


@needs_landlock
def test_probes_succeed_unconfined(box: Box) -> None:
    """Without restrict() every probe succeeds, so each denial below is Landlock's."""
    result = box.run(restrict=False)
    assert {k: v for k, v in result.items() if k in CONFINED and v != "ok"} == {}


@needs_landlock
def test_confined_job_reaches_only_what_the_spec_allows(box: Box) -> None:
    """Reads, writes, links, symlinks, TCP, signals, abstract sockets and exec are confined."""
    result = box.run()
    assert {k: result.get(k) for k in CONFINED} == CONFINED
    assert result["lost"] == [] and result["skipped"] == []


@needs_landlock
def test_shared_ruleset_without_per_job_paths(box: Box) -> None:
    """With no per-job path the prebuilt ruleset is enforced, with the same denials."""
    box.extra = []
    box.spec["read"] = [box.paths["etc"]]  # no /proc/self: nothing to open in the child
    result = box.run()
    assert result["read_denied_key"] == result["write_scratch"] == "EACCES"
    assert result["read_allowed"] == result["connect_allowed"] == "ok"
    assert result["connect_denied"] == "EACCES" and result["signal_parent"] == "EPERM"


@needs_landlock
def test_abi_cap_reports_net_and_scopes_unenforced(box: Box) -> None:
    """Capped at ABI 3, TCP and scopes are reported lost and not enforced; files still are."""
    result = box.run(cap=3)
    assert [t.split(" ")[0] for t in result["lost"]] == [
        "tcp_connect", "tcp_bind", "ioctl_dev", "scope_signals", "scope_abstract_unix",
    ]  # fmt: skip
    assert result["connect_denied"] == result["signal_parent"] == "ok"
    assert result["read_denied_key"] == result["write_readonly"] == "EACCES"
    assert result["write_scratch"] == "ok"


@needs_landlock
def test_extra_write_path_covering_a_denied_path_is_refused(box: Box) -> None:
    """A per-job write path above a denied path fails restrict() with EPERM, naming it."""
    box.extra = [box.paths["etc"]]
    err, text = box.run()["restrict"]
    assert err == "EPERM" and "extra write path" in text and "agent" in text


@needs_landlock
def test_missing_extra_path_names_the_step(box: Box) -> None:
    """A per-job path that does not exist fails restrict() with ENOENT and the step."""
    box.extra = [box.paths["root"] + "/nope"]
    err, text = box.run()["restrict"]
    assert err == "ENOENT" and f"open {box.paths['root']}/nope" in text


@needs_landlock
def test_prepare_skips_paths_that_vanished(tmp_path: Path) -> None:
    """A planned path removed before prepare() is skipped and reported, not fatal."""
    (tmp_path / "gone").mkdir()
    (tmp_path / "kept").mkdir()
    spec = LandlockSpec(read=(str(tmp_path / "gone"), str(tmp_path / "kept")))
    rules = plan_rules(spec)
    (tmp_path / "gone").rmdir()
    prepared = landlock.prepare(rules, spec, landlock.abi_version())
    try:
        assert len(prepared.skipped) == 1 and "gone" in prepared.skipped[0]
    finally:
        prepared.close()


@needs_landlock
@pytest.mark.parametrize("swap", ["last", "parent"])
def test_prepare_refuses_a_path_swapped_for_a_symlink(tmp_path: Path, swap: str) -> None:
    """A planned path replaced by a symlink (to the denied dir) before prepare() is skipped."""
    conf, pub = tmp_path / "conf", tmp_path / "x" / "pub"
    (conf / "pub").mkdir(parents=True)
    pub.mkdir(parents=True)
    spec = LandlockSpec(read=(str(pub),), deny=(str(conf),))
    rules = plan_rules(spec)
    assert [r.path for r in rules] == [str(pub)]
    moved = pub if swap == "last" else pub.parent
    moved.rename(tmp_path / "old")
    moved.symlink_to(conf if swap == "last" else tmp_path / "conf")
    prepared = landlock.prepare(rules, spec, landlock.abi_version())
    try:
        assert len(prepared.skipped) == 1 and "pub" in prepared.skipped[0], prepared.skipped
    finally:
        prepared.close()


def test_prepared_descriptors_are_close_on_exec_and_closed_by_close() -> None:
    """descriptors() lists what the spawner's child must keep: all close-on-exec (no job
    inherits one), and close() releases them."""
    if landlock.abi_version() < 1:
        pytest.skip("no Landlock")
    spec = LandlockSpec(read_exec=("/usr",), write=("/dev/null",))
    prepared = landlock.prepare(plan_rules(spec), spec, landlock.abi_version())
    fds = prepared.descriptors()
    assert fds
    for fd in fds:
        assert os.get_inheritable(fd) is False
    prepared.close()
    assert prepared.descriptors() == []
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


OWN_DIR_PROBE = textwrap.dedent(
    """
    import errno, json, os, sys
    from agent.keeper import landlock as ll

    root, own, other, pub = sys.argv[1:5]
    spec = ll.LandlockSpec(read_exec=tuple(json.loads(sys.argv[5])),
                           read=(os.path.dirname(root),), write=("/dev/null",), deny=(root,))
    prepared = ll.prepare(ll.plan_rules(spec), spec, ll.abi_version())
    own_fd = os.open(own, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    out = {"program": [item[0] for item in prepared.child_program([own_fd])],
           "shared": [item[0] for item in prepared.child_program()]}
    prepared.restrict(extra_write_dirs=[own_fd])

    def attempt(name, fn):
        try:
            fn()
            out[name] = "ok"
        except OSError as e:
            out[name] = errno.errorcode[e.errno]

    def read(path):
        with open(path) as f:
            f.read()

    def write(path):
        with open(path, "w") as f:
            f.write("x")

    attempt("list_root", lambda: os.listdir(root))
    attempt("list_other", lambda: os.listdir(other))
    attempt("read_other", lambda: read(other + "/f"))
    attempt("write_other", lambda: write(other + "/g"))
    attempt("write_root", lambda: write(root + "/h"))
    attempt("write_own", lambda: write(own + "/new"))
    attempt("read_own", lambda: read(own + "/new"))
    attempt("list_own", lambda: os.listdir(own))
    attempt("read_beside_root", lambda: read(pub))
    print(json.dumps(out))
    """
)


@needs_landlock
def test_own_directory_by_descriptor_and_nothing_else_below_a_denied_root(
    tmp_path: Path,
) -> None:
    """A scratch root denied inside a granted tree, the job's own directory granted by
    descriptor: one flat ruleset (no layer), the own directory readable and writable,
    the root and a sibling's directory neither listable, readable nor writable, whatever
    their modes; the rest of the granted tree stays readable."""
    root = tmp_path / "scratch"
    own, other = root / "own", root / "other"
    own.mkdir(parents=True)
    other.mkdir()
    (other / "f").write_text("other's\n")
    (tmp_path / "pub").write_text("pub\n")
    for p in (root, own, other):
        os.chmod(p, 0o777)
    os.chmod(other / "f", 0o666)
    prefixes = sorted({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix})
    pkg = str(Path(landlock.__file__).resolve().parents[2])
    read_exec = ["/usr", "/lib", "/lib64", "/bin", *prefixes, pkg]
    proc = subprocess.run(
        [sys.executable, "-c", OWN_DIR_PROBE, str(root), str(own), str(other),
         str(tmp_path / "pub"), json.dumps(read_exec)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    # Without a directory of its own a job enforces the prepared ruleset as is; with one,
    # it builds one flat ruleset: every prepared rule and its directory, one restrict.
    assert out.pop("shared") == ["nnp", "restrict"]
    program = out.pop("program")
    assert program[0] == "create" and program[-3:] == ["nnp", "restrict", "close"]
    assert program[1] == "adds" and set(program[2:-3]) == {"add"} and len(program) == 6
    assert out == {
        "list_root": "EACCES", "list_other": "EACCES", "read_other": "EACCES",
        "write_other": "EACCES", "write_root": "EACCES", "write_own": "ok", "read_own": "ok",
        "list_own": "ok", "read_beside_root": "ok",
    }  # fmt: skip
