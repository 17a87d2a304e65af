"""Hostile input over real gRPC: random and adversarial requests to a real agent.

One agent process (real mTLS, real policy, real file system) serves the whole
module. Its policy is built so that nothing a hostile caller sends as
``client`` can legitimately run:

* ``traps``   -- bash scripts under ``trap/``, every one of them unsafe in a
  different way (world/group-writable, set-uid, FIFO, directory, foreign owner,
  escaping symlinks, a wrong sha256 pin), plus ``/dev/null``;
* ``tool``    -- an executable entry whose file is made non-executable after
  the policy was loaded;
* ``legit``   -- a correct ``sh`` script, only for identity ``scheduler``
  (used by the explicit cases that need an otherwise allowed request);
* ``alive``/``badinterp``/``noshebang`` -- only for ``admin``.

Every script and tool is a canary: if it ever ran it would create a file in
``marker/``. Each call is checked with :meth:`World.check`: a proper status
(never UNKNOWN/INTERNAL, no traceback text), the agent alive and answering,
no new child process, output file, ``job_start`` audit line or marker, and no
new file in the test's folders or in any folder a request names.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import resource
import shutil
import stat
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import hostile_strategies as hs
from helpers import (
    IS_ROOT,
    AgentProcess,
    Certs,
    job_children,
    make_safe_dir,
    pb,
    pb_grpc,
    wait_for,
    write_script,
)

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
# What a refused StartJob may answer; never OK, UNKNOWN or INTERNAL.
REFUSALS = frozenset({INVALID, DENIED, NOT_FOUND, PRECONDITION, EXHAUSTED})
NEVER = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
    }
)
TRACEBACK_MARKS = (
    "Traceback",
    'File "',
    "Unexpected <class",
    "Exception calling application",
    "Exception iterating responses",
)
MIB = 1024 * 1024
TIMEOUT = 15.0

EXAMPLES = int(os.environ.get("HOSTILE_MAX_EXAMPLES", "120"))
HYPOTHESIS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
BAD_PIN = "0" * 64


# ---------------------------------------------------------------- the world


class AuditTail:
    """Reads the audit log incrementally: only lines written since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0
        self.job_starts = 0

    def read(self) -> list[dict[str, Any]]:
        """New whole lines, parsed; also counts ``job_start`` events."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # only whole lines
        self.pos += end
        lines = [json.loads(x) for x in data[:end].splitlines() if x.strip()]
        self.job_starts += sum(1 for e in lines if e.get("event") == "job_start")
        return lines


@dataclass(frozen=True)
class Snapshot:
    """What a denied request must not change."""

    children: frozenset[int]
    outputs: frozenset[str]
    job_starts: int
    audit: tuple[dict[str, Any], ...]  # lines written since the previous snapshot
    markers: frozenset[str]
    tree: frozenset[str]
    named: dict[str, frozenset[str]] = field(default_factory=dict)


NOISY_ROOTS = ("/proc", "/sys", "/dev", "/run")


def _listing(d: str) -> frozenset[str] | None:
    try:
        with os.scandir(d) as it:
            return frozenset(e.name for e in it)
    except (OSError, ValueError):
        return None


def _components(strings: Iterable[str]) -> set[str]:
    out: set[str] = set()
    for s in strings:
        out.update(p for p in re.split(r"[/\x00]", s) if p not in ("", ".", ".."))
    return out


def request_strings(req: Any) -> list[str]:
    """Every string a StartJobReq carries."""
    return [req.command, req.path, *req.args, *req.env.keys(), *req.env.values()]


@dataclass
class World:
    """The agent under attack, its folders and its clients."""

    agent: AgentProcess
    base: Path
    legit: Path
    trap: Path
    outside: Path
    bin: Path
    marker: Path
    channels: dict[str, grpc.Channel]
    audit: AuditTail
    alive_job: str = ""
    log_pos: int = 0
    last_rules: frozenset[str] = frozenset()  # rules audited for the last checked call
    # canary marks left by runs a test deliberately allowed
    allowed_marks: set[str] = field(default_factory=set)

    # ------------------------------------------------------------ clients

    def stub(self, identity: str = "client") -> pb_grpc.WorkerStub:
        return pb_grpc.WorkerStub(self.channels[identity])

    def raw(self, method: str, identity: str = "client") -> Callable[[bytes], Any]:
        """Call a Worker method with hand-made request bytes."""
        ch = self.channels[identity]
        name = f"/jobscheduler.Worker/{method}"
        if method == "StreamJobOutput":
            call = ch.unary_stream(
                name, request_serializer=lambda b: b, response_deserializer=lambda b: b
            )
            return lambda data: list(call(data, timeout=TIMEOUT))
        uu = ch.unary_unary(name, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        return lambda data: uu(data, timeout=TIMEOUT)

    def start(self, req: pb.StartJobReq, identity: str = "client") -> Callable[[], Any]:
        return lambda: self.stub(identity).StartJob(req, timeout=TIMEOUT)

    # ------------------------------------------------------------ checks

    def snapshot(self, strings: Iterable[str] = ()) -> Snapshot:
        named: dict[str, frozenset[str]] = {}
        candidates = ["/", "/tmp", "/etc", str(self.agent.workdir)]
        for s in strings:
            if not s or "\x00" in s or len(s) > 1024:
                continue
            p = s if s.startswith("/") else os.path.join(self.agent.workdir, s)
            candidates += [p, os.path.dirname(p)]
        for d in candidates[:16]:
            if d.startswith(NOISY_ROOTS) or d in named:
                continue
            with contextlib.suppress(OSError, ValueError):
                if os.path.isdir(d):
                    listing = _listing(d)
                    if listing is not None:
                        named[d] = listing
        audit = tuple(self.audit.read())
        return Snapshot(
            children=frozenset(job_children(self.agent.pid)),
            outputs=frozenset(self.agent.output_files()),
            job_starts=self.audit.job_starts,
            audit=audit,
            markers=frozenset(os.listdir(self.marker)),
            tree=frozenset(self._tree()),
            named=named,
        )

    def _tree(self) -> Iterator[str]:
        for root in (self.base, self.agent.workdir):
            for dirpath, dirnames, filenames in os.walk(root):
                rel = os.path.relpath(dirpath, root)
                if Path(dirpath) == self.agent.state:
                    # the history database, its WAL and the audit log change
                    # with every call; job output is checked separately
                    dirnames[:] = [d for d in dirnames if d != "output"]
                    filenames = []
                elif Path(dirpath) == self.agent.state / "output":
                    continue
                for n in dirnames + filenames:
                    yield f"{root.name}:{rel}/{n}"

    def assert_unchanged(
        self, before: Snapshot, after: Snapshot, strings: Iterable[str] = ()
    ) -> None:
        """Nothing was started and no file appeared."""
        new_children = after.children - before.children
        assert not new_children, f"the agent has new children {new_children}"
        assert after.outputs == before.outputs, "a job output file was created"
        assert after.job_starts == before.job_starts, "a job_start was audited"
        assert after.markers == before.markers, f"a canary ran: {after.markers - before.markers}"
        assert after.tree <= before.tree, f"new files: {after.tree - before.tree}"
        names = _components(strings)
        for d, listing in before.named.items():
            later = after.named.get(d)
            if later is None:
                continue
            new = later - listing
            assert not (new & names), f"{d}: {new & names} appeared"

    def assert_alive(self) -> None:
        """The agent process lives and answers a normal QueryJob."""
        assert self.agent.proc is not None and self.agent.proc.poll() is None, (
            f"the agent died:\n{self.agent.log()[-3000:]}"
        )
        res = self.stub("admin").QueryJob(pb.QueryJobReq(jobID=self.alive_job), timeout=TIMEOUT)
        assert res.done and res.state == pb.SUCCEEDED

    def new_log(self) -> str:
        """Agent log written since the last call."""
        text = self.agent.log()
        new, self.log_pos = text[self.log_pos :], len(text)
        return new

    def check(
        self,
        call: Callable[[], Any],
        codes: Iterable[grpc.StatusCode],
        *,
        strings: Iterable[str] = (),
        rule: str | None = None,
    ) -> tuple[grpc.StatusCode, str]:
        """Make one call that must be refused (or answered) without side effects."""
        strings = list(strings)
        before = self.snapshot(strings)
        code, details = outcome(call)
        after = self.snapshot(strings)
        allowed = frozenset(codes)
        assert code not in NEVER, f"{code}: {details}"
        assert code in allowed, f"{code} not in {sorted(c.name for c in allowed)}: {details}"
        assert_clean_details(details)
        # every refusal is audited with the rule(s) that made it
        rules = frozenset(
            r
            for e in after.audit
            if e.get("decision") == "deny"
            for r in e.get("rule", "").split(",")
            if r
        )
        self.last_rules = rules
        if rule is not None:
            assert rule in rules, f"rule {rule!r} not in audited {set(rules)}: {details}"
        self.assert_unchanged(before, after, strings)
        self.assert_alive()
        return code, details


def outcome(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a call (OK and '' when it succeeded)."""
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return OK, ""


def assert_clean_details(details: str) -> None:
    """A person-readable message: no Python traceback, no exception repr."""
    for mark in TRACEBACK_MARKS:
        assert mark not in details, details


def _canary(marker: Path) -> str:
    return f"""
        #!/bin/sh
        touch "{marker}/$(basename "$0")-$$"
        echo ran
        """


def _policy(w: dict[str, Path]) -> str:
    return f"""
version: 1
entries:
  - name: alive
    command: /bin/true
    aliases: ["true"]
    identities: [admin]
    args: {{max_count: 0}}
  - name: legit
    command: /bin/sh
    aliases: [sh]
    identities: [scheduler]
    scripts: ["{w["legit"]}/*.sh"]
    args: {{max_count: 2, max_length: 16, patterns: ['[a-z0-9]+']}}
    env: [CANARY_OK]
    landlock: {{write: ["{w["marker"]}"]}}
  - name: traps
    command: /bin/bash
    aliases: [bash]
    scripts:
      - "{w["trap"]}/"
      - /dev/null
      - {{path: "{w["trap"]}/pinned.sh", sha256: "{BAD_PIN}"}}
    args: {{max_count: 4, max_length: 64}}
    env: [CANARY_OK]
    landlock: {{write: ["{w["marker"]}"]}}
  - name: tool
    command: {w["bin"]}/tool
    aliases: [tool]
    args: {{max_count: 2, patterns: ['[a-z]+']}}
    landlock: {{write: ["{w["marker"]}"]}}
  - name: badinterp
    command: {w["bin"]}/badinterp
    identities: [admin]
  - name: noshebang
    command: {w["bin"]}/noshebang
    identities: [admin]
"""


def _build_traps(trap: Path, legit: Path, outside: Path, canary: str) -> None:
    for name, mode in [
        ("ww.sh", 0o757),
        ("gw.sh", 0o775),
        ("suid.sh", 0o4755),
        ("sgid.sh", 0o2755),
        ("pinned.sh", 0o755),
        ("badowner.sh", 0o755),
    ]:
        write_script(trap, name, canary, mode)
        os.chmod(trap / name, mode)  # write_script's chmod; explicit for set-id bits
    for sub, mode in [("gwdir", 0o775), ("wwdir", 0o777)]:
        (trap / sub).mkdir()
        os.chmod(trap / sub, mode)
        write_script(trap / sub, "inner.sh", canary)
    if IS_ROOT:
        os.chown(trap / "badowner.sh", 12345, 12345)
    os.mkfifo(trap / "fifo.sh", 0o644)
    (trap / "dir.sh").mkdir(mode=0o755)
    for name, target in [
        ("escape-abs.sh", str(legit / "ok.sh")),
        ("escape-rel.sh", "../legit/ok.sh"),
        ("escape-outside.sh", str(outside / "evil.sh")),
        ("escape-passwd.sh", "/etc/passwd"),
        ("escape-dev.sh", "/dev/null"),
        ("dangling.sh", f"/nonexistent-{uuid.uuid4().hex}/x.sh"),
        ("loop.sh", "loop.sh"),
    ]:
        os.symlink(target, trap / name)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[World]:
    """One agent under attack for the whole module, with its canary folders."""
    base = make_safe_dir()
    dirs = {n: base / n for n in ("legit", "trap", "outside", "bin", "marker")}
    for d in dirs.values():
        d.mkdir(mode=0o755)
        os.chmod(d, 0o755)
    # jobs run as 'nobody': the canary must be able to leave its mark
    os.chmod(dirs["marker"], 0o1777)
    canary = _canary(dirs["marker"])
    write_script(dirs["legit"], "ok.sh", canary)
    write_script(dirs["outside"], "evil.sh", canary)
    write_script(dirs["bin"], "tool", canary)
    write_script(dirs["bin"], "badinterp", "#!/nonexistent/interpreter\necho hi\n")
    write_script(dirs["bin"], "noshebang", "echo this file has no interpreter line\n")
    _build_traps(dirs["trap"], dirs["legit"], dirs["outside"], canary)

    agent = AgentProcess(tmp_path_factory.mktemp("hostile") / "agent", certs, _policy(dirs))
    channels: dict[str, grpc.Channel] = {}
    try:
        agent.start()
        # Loaded as a valid executable; from now on it is not executable,
        # so every request for it must be refused at start time.
        os.chmod(dirs["bin"] / "tool", 0o644)
        for ident in ("client", "scheduler", "admin", "agent"):
            channels[ident] = grpc.secure_channel(agent.addr, certs.creds(ident))
        w = World(
            agent=agent,
            base=base,
            legit=dirs["legit"],
            trap=dirs["trap"],
            outside=dirs["outside"],
            bin=dirs["bin"],
            marker=dirs["marker"],
            channels=channels,
            audit=AuditTail(agent.state / "audit.log"),
        )
        stub = w.stub("admin")
        w.alive_job = stub.StartJob(pb.StartJobReq(command="true"), timeout=TIMEOUT).jobID
        res = stub.WaitJob(pb.WaitJobReq(jobID=w.alive_job), timeout=TIMEOUT)
        assert res.state == pb.SUCCEEDED, res
        w.new_log()
        yield w
    finally:
        for ch in channels.values():
            ch.close()
        agent.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(autouse=True)
def still_serving(world: World) -> Iterator[None]:
    """After every test: a normal StartJob still runs, and the agent logged no traceback."""
    yield
    world.assert_alive()
    stub = world.stub("admin")
    job = stub.StartJob(pb.StartJobReq(command="true"), timeout=TIMEOUT).jobID
    assert stub.WaitJob(pb.WaitJobReq(jobID=job), timeout=TIMEOUT).state == pb.SUCCEEDED
    log = world.new_log()
    for mark in ("Traceback", "Unexpected ["):
        assert mark not in log, log


# ---------------------------------------------------------------- oracles


def _spellings(w: World) -> set[str]:
    """Every command string the policy knows (anything else is command-not-allowed)."""
    out = {"true", "/bin/true", "sh", "/bin/sh", "bash", "/bin/bash", "tool"}
    for p in ("/bin/true", "/bin/sh", "/bin/bash"):
        out.add(os.path.realpath(p))
    for n in ("tool", "badinterp", "noshebang"):
        out |= {str(w.bin / n), os.path.realpath(w.bin / n)}
    return out


_BAD_TEXT_CATEGORIES = ("Cc", "Cf", "Cs", "Co", "Cn")


def _bad_text(s: str) -> bool:
    return s == "" or any(unicodedata.category(c) in _BAD_TEXT_CATEGORIES for c in s)


def obviously_malformed(req: pb.StartJobReq) -> bool:
    """Requests that are wrong whatever the policy says (INVALID_ARGUMENT)."""
    if _bad_text(req.command) or (req.path and _bad_text(req.path)):
        return True
    if any("\x00" in a for a in req.args) or (req.args and not req.path):
        return True
    if any(
        not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k) or "\x00" in v for k, v in req.env.items()
    ):
        return True
    if any(i >= len(req.args) for i in req.secretArgs):
        return True
    return _kernel_cannot_give(req)


def _kernel_cannot_give(req: pb.StartJobReq) -> bool:
    """Limits refused before any policy rule: above rlim_t, the agent's hard limits, int64.

    Memory and processes are the job cgroup's memory.max and pids.max: no rlimit
    of the agent bounds them.
    """
    if not req.HasField("limits"):
        return False
    for wire, kernel in (
        ("cpuSeconds", "RLIMIT_CPU"),
        ("memoryBytes", None),
        ("openFiles", "RLIMIT_NOFILE"),
        ("processes", None),
        ("outputBytes", None),
    ):
        if not req.limits.HasField(wire):
            continue
        value = getattr(req.limits, wire)
        if not value:
            continue
        if value > 2**63 - 1:
            return True
        if kernel is None:
            continue
        need = value + 2 if wire == "cpuSeconds" else value
        hard = resource.getrlimit(getattr(resource, kernel))[1]
        if need >= 2**64 - 1 or (hard != resource.RLIM_INFINITY and need > hard):
            return True
    return False


# ---------------------------------------------------------------- properties


def _anchors(w: World) -> list[str]:
    return [
        str(w.legit),
        str(w.trap),
        str(w.outside),
        str(w.bin),
        str(w.base),
        "/etc",
        "/tmp",
        "/dev",
        "/",
        "/proc/self",
        "legit",
        "trap",
        ".",
        "",
    ]


_TRAP_NAMES = [
    "ok.sh",
    "evil.sh",
    "tool",
    "ww.sh",
    "gw.sh",
    "suid.sh",
    "sgid.sh",
    "pinned.sh",
    "badowner.sh",
    "gwdir",
    "wwdir",
    "inner.sh",
    "fifo.sh",
    "dir.sh",
    "escape-abs.sh",
    "escape-rel.sh",
    "escape-outside.sh",
    "escape-passwd.sh",
    "escape-dev.sh",
    "dangling.sh",
    "loop.sh",
    "null",
    "passwd",
    "legit",
    "trap",
]


@st.composite
def _hostile_start(draw: st.DrawFn, w: World) -> tuple[str, pb.StartJobReq]:
    near = [
        "/bin/sh -c id",
        "env",
        "/usr/bin/env",
        "python3",
        "/bin//bash",
        "/bin/./bash",
        "/usr/bin/../bin/bash",
        "BASH",
        "./tool",
        "../bin/tool",
        "bash ",
        " sh",
        str(w.legit / "ok.sh"),
        str(w.trap / "ww.sh"),
        "/dev/null",
        "/bin",
        "/",
    ]
    # weighted towards the entries and places where the file checks happen
    commands = sorted(_spellings(w)) + ["bash", "/bin/bash", "tool"] * 3
    anchors = _anchors(w) + [str(w.trap)] * 6 + [str(w.trap / "gwdir"), str(w.legit)]
    req = draw(hs.start_requests(commands, anchors, _TRAP_NAMES, near))
    identity = draw(st.sampled_from(["client"] * 7 + ["agent"]))
    return identity, req


@pytest.mark.slow
@HYPOTHESIS
@given(data=st.data())
def test_random_start_requests_are_refused_cleanly(world: World, data: st.DataObject) -> None:
    """Random hostile StartJob requests: a proper refusal, nothing runs, no file appears."""
    identity, req = data.draw(_hostile_start(world))
    code, details = world.check(world.start(req, identity), REFUSALS, strings=request_strings(req))
    event(f"{identity}: {code.name}")
    for r in sorted(world.last_rules):
        event(f"rule {r}")
    if identity == "agent":
        assert code == DENIED and "is not allowed to use this agent" in details
    elif obviously_malformed(req):
        assert code == INVALID, details
    elif req.command not in _spellings(world):
        assert code == DENIED and "[command-not-allowed]" in details, details


@HYPOTHESIS
@given(
    where=st.sampled_from(["command", "path", "arg", "env-name"]),
    piece=hs.weird_char,
    data=st.data(),
)
@pytest.mark.slow
def test_one_hostile_character_in_an_allowed_request(
    world: World, where: str, piece: str, data: st.DataObject
) -> None:
    """One hostile character in an otherwise allowed request: the exact refusal, nothing runs."""
    ok = str(world.legit / "ok.sh")
    base = {"command": "sh", "path": ok, "arg": "abc", "env-name": "CANARY_OK"}
    value = base[where]
    i = data.draw(st.integers(0, len(value)), label="position")
    value = value[:i] + piece + value[i:]
    v = {**base, where: value}
    req = pb.StartJobReq(
        command=v["command"], path=v["path"], args=[v["arg"]], env={v["env-name"]: "1"}
    )
    control = any(unicodedata.category(c) in ("Cc", "Cf") for c in piece)
    expected = {
        "command": (INVALID, "malformed-command") if control else (DENIED, "command-not-allowed"),
        "path": (INVALID, "malformed-path") if control else None,
        "arg": (INVALID, "malformed-arg")
        if "\x00" in piece
        else (INVALID, "arg-too-long")
        if len(value) > 16
        else (DENIED, "arg-pattern"),
        "env-name": (INVALID, "malformed-env"),
    }[where]
    if expected is None:  # a respelled path: outside the allowed place, or missing inside it
        world.check(
            world.start(req, "scheduler"), {DENIED, NOT_FOUND}, strings=request_strings(req)
        )
        assert world.last_rules <= {
            "script-path-not-canonical",
            "script-not-allowed",
            "script-missing",
        }, world.last_rules
    else:
        world.check(
            world.start(req, "scheduler"),
            {expected[0]},
            strings=request_strings(req),
            rule=expected[1],
        )


def _trap_paths(w: World) -> list[str]:
    """Every file-system object in the traps entry's places (all unsafe) and around them."""
    out = ["/dev/null", str(w.legit / "ok.sh"), str(w.outside / "evil.sh"), str(w.bin / "tool")]
    for dirpath, dirnames, filenames in os.walk(w.trap):
        out += [os.path.join(dirpath, n) for n in dirnames + filenames]
    return sorted(out)


@pytest.mark.slow
@HYPOTHESIS
@given(data=st.data())
def test_random_requests_for_unsafe_files_never_run(world: World, data: st.DataObject) -> None:
    """Unsafe scripts (writable, set-id, FIFO, escaping links...), possibly respelled: never run."""
    target = st.sampled_from(_trap_paths(world))
    path = data.draw(st.one_of(target, target, target.flatmap(hs.mutate)), label="path")
    command = data.draw(st.sampled_from(["bash", "/bin/bash", os.path.realpath("/bin/bash")]))
    args = data.draw(
        st.one_of(
            st.just([]),
            st.lists(st.sampled_from(hs.PLAIN_ARGS), max_size=6),
            st.lists(hs.hostile_text, max_size=3),
        ),
        label="args",
    )
    env = data.draw(st.one_of(st.just({}), st.just({"CANARY_OK": "1"}), hs.env_maps), label="env")
    req = pb.StartJobReq(command=command, path=path, args=args, env=env)
    code, _ = world.check(world.start(req), REFUSALS - {EXHAUSTED}, strings=request_strings(req))
    if obviously_malformed(req):
        assert code == INVALID
    event(code.name)
    for r in sorted(world.last_rules):
        event(f"rule {r}")


@pytest.mark.slow
@HYPOTHESIS
@given(
    method=st.sampled_from(["QueryJob", "StopJob", "WaitJob", "StreamJobOutput"]), job_id=hs.job_ids
)
def test_random_job_ids_are_invalid_or_not_found(world: World, method: str, job_id: str) -> None:
    """Bad job ids are INVALID_ARGUMENT, well-formed unknown ones NOT_FOUND, for every RPC."""
    stub = world.stub()
    calls: dict[str, Callable[[], Any]] = {
        "QueryJob": lambda: stub.QueryJob(pb.QueryJobReq(jobID=job_id), timeout=TIMEOUT),
        "StopJob": lambda: stub.StopJob(pb.StopJobReq(jobID=job_id), timeout=TIMEOUT),
        "WaitJob": lambda: stub.WaitJob(
            pb.WaitJobReq(jobID=job_id, waitMillis=100), timeout=TIMEOUT
        ),
        "StreamJobOutput": lambda: list(
            stub.StreamJobOutput(pb.StreamJobOutputReq(jobID=job_id, follow=True), timeout=TIMEOUT)
        ),
    }
    expected = NOT_FOUND if hs.is_canonical_uuid(job_id) else INVALID
    world.check(calls[method], {expected}, strings=[job_id])


def _token_problem(token: str) -> bool:
    """True unless ``token`` is one the agent could have issued (v1:<seq>)."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return True
    tag, _, num = raw.partition(":")
    return not (tag == "v1" and re.fullmatch(r"[0-9]{1,18}", num))


@pytest.mark.slow
@HYPOTHESIS
@given(req=hs.list_requests)
def test_random_list_requests(world: World, req: pb.ListJobsReq) -> None:
    """ListJobs answers OK or a precise refusal for any filter, size or token."""
    code, details = world.check(
        lambda: world.stub().ListJobs(req, timeout=TIMEOUT),
        {OK, INVALID, DENIED},
        strings=[req.owner, req.pageToken],
    )
    if any(s not in range(1, 7) for s in req.states):
        assert code == INVALID and "is not a job state" in details
    elif req.owner not in ("", "client"):
        assert code == DENIED
    elif req.pageSize > 1000:
        assert code == INVALID
    elif req.pageToken and _token_problem(req.pageToken):
        assert code == INVALID and "pageToken" in details
    else:
        assert code == OK, details


@pytest.mark.slow
@HYPOTHESIS
@given(method=st.sampled_from(hs.WORKER_METHODS), data=hs.raw_messages)
def test_random_raw_bytes_never_internal(world: World, method: str, data: bytes) -> None:
    """Arbitrary request bytes: never UNKNOWN/INTERNAL, never a started job."""
    codes = REFUSALS | ({OK} if method == "ListJobs" else set())
    world.check(lambda: world.raw(method)(data), codes)


@settings(HYPOTHESIS, max_examples=max(10, EXAMPLES // 4))
@given(
    offset=st.one_of(
        st.integers(0, 2**64 - 1), st.sampled_from([2**62, 2**62 + 1, 2**63 - 1, 2**63, 2**64 - 1])
    ),
    follow=st.booleans(),
)
def test_random_stream_offsets(world: World, offset: int, follow: bool) -> None:
    """Any uint64 offset into a finished job's output: data, nothing, or INVALID_ARGUMENT."""
    stub = world.stub("admin")

    def call() -> None:
        chunks = list(
            stub.StreamJobOutput(
                pb.StreamJobOutputReq(jobID=world.alive_job, offset=offset, follow=follow),
                timeout=TIMEOUT,
            )
        )
        assert b"".join(c.data for c in chunks) == b""  # /bin/true prints nothing

    code, _ = world.check(call, {OK, INVALID})
    assert code == (OK if offset <= 2**62 else INVALID)


# ---------------------------------------------------------------- explicit: size


def _oversize_cases() -> list[Any]:
    big = "x" * (4 * MIB + 1024)
    return [
        pytest.param("StartJob", pb.StartJobReq(command=big, path="/x"), id="command"),
        pytest.param("StartJob", pb.StartJobReq(command="bash", path="/" + big), id="path"),
        pytest.param(
            "StartJob",
            pb.StartJobReq(command="bash", path="/x", args=["y" * 1024] * (4 * 1024 + 8)),
            id="many-args",
        ),
        pytest.param(
            "StartJob",
            pb.StartJobReq(command="bash", path="/x", env={"CANARY_OK": big}),
            id="env-value",
        ),
        pytest.param("QueryJob", pb.QueryJobReq(jobID=big), id="job-id"),
        pytest.param("ListJobs", pb.ListJobsReq(pageToken=big), id="page-token"),
    ]


@pytest.mark.parametrize(("method", "req"), _oversize_cases())
def test_messages_over_the_size_limit_are_resource_exhausted(
    world: World, method: str, req: Any
) -> None:
    """A request above 4 MiB is refused RESOURCE_EXHAUSTED before any handler runs."""
    world.check(lambda: world.raw(method)(req.SerializeToString()), {EXHAUSTED})


def _just_under_cases() -> list[Any]:
    n = 4 * MIB - 4096
    return [
        pytest.param(pb.StartJobReq(command="x" * n, path="/x"), "malformed-command", id="command"),
        pytest.param(
            pb.StartJobReq(command="bash", path="/" + "x" * n), "malformed-path", id="path"
        ),
        pytest.param(
            pb.StartJobReq(command="bash", path="/x", args=["a" * n]), "arg-too-long", id="one-arg"
        ),
        pytest.param(
            pb.StartJobReq(command="bash", path="/x", env={"CANARY_OK": "v" * n}),
            "malformed-env",
            id="env-value",
        ),
    ]


@pytest.mark.parametrize(("req", "rule"), _just_under_cases())
def test_huge_fields_under_the_size_limit_are_invalid_argument(
    world: World, req: Any, rule: str
) -> None:
    """A field of almost 4 MiB gets through gRPC and is refused INVALID_ARGUMENT by the policy."""
    world.check(world.start(req), {INVALID}, rule=rule)


@pytest.mark.parametrize(
    ("identity", "command", "path", "count", "code", "rule"),
    [
        ("client", "bash", "TRAP/ww.sh", 10_000, INVALID, "too-many-args"),
        ("client", "bash", "TRAP/ww.sh", 1025, INVALID, "too-many-args"),
        ("client", "/bin/nope", "/x", 10_000, INVALID, "too-many-args"),
        ("scheduler", "sh", "LEGIT/ok.sh", 3, INVALID, "too-many-args"),
    ],
)
def test_too_many_arguments(
    world: World,
    identity: str,
    command: str,
    path: str,
    count: int,
    code: grpc.StatusCode,
    rule: str,
) -> None:
    """Over the global cap (1024) or the entry's max_count: INVALID_ARGUMENT, nothing runs."""
    req = pb.StartJobReq(command=command, path=_at(world, path), args=["a"] * count)
    world.check(world.start(req, identity), {code}, rule=rule)


def _at(w: World, path: str) -> str:
    """Expand LEGIT/, TRAP/, OUTSIDE/, BIN/ and BASE/ prefixes."""
    for key, d in (
        ("LEGIT", w.legit),
        ("TRAP", w.trap),
        ("OUTSIDE", w.outside),
        ("BIN", w.bin),
        ("BASE", w.base),
    ):
        path = path.replace(key, str(d))
    return path


# ---------------------------------------------------------------- explicit: characters

CONTROL_CHARS = [
    "\x00",
    "\x01",
    "\n",
    "\r",
    "\t",
    "\x1b",
    "\x7f",
    "\x85",
    "\u202e",
    "\u200d",
    "\u200b",
    "\ufeff",
    "\u2066",
]


def _char_cases() -> list[Any]:
    out = []
    for ch in CONTROL_CHARS:
        cid = f"U+{ord(ch):04X}"
        out += [
            pytest.param("command", ch, "malformed-command", id=f"command-{cid}"),
            pytest.param("path", ch, "malformed-path", id=f"path-{cid}"),
            pytest.param("env-name", ch, "malformed-env", id=f"env-name-{cid}"),
        ]
    out += [
        pytest.param("arg", "\x00", "malformed-arg", id="arg-U+0000"),
        pytest.param("env-value", "\x00", "malformed-env", id="env-value-U+0000"),
    ]
    return out


@pytest.mark.parametrize(("where", "ch", "rule"), _char_cases())
def test_control_and_format_characters_are_invalid_argument(
    world: World, where: str, ch: str, rule: str
) -> None:
    """NUL, C0/C1 controls, bidi overrides and zero-width characters: INVALID_ARGUMENT."""
    req = pb.StartJobReq(command="sh", path=str(world.legit / "ok.sh"))
    if where == "command":
        req.command = "s" + ch + "h"
    elif where == "path":
        req.path = str(world.legit / f"o{ch}k.sh")
    elif where == "arg":
        req.args.append("a" + ch)
    elif where == "env-name":
        req.env["CANARY" + ch + "OK"] = "1"
    else:
        req.env["CANARY_OK"] = "a" + ch
    world.check(world.start(req, "scheduler"), {INVALID}, strings=request_strings(req), rule=rule)


@pytest.mark.parametrize(
    ("identity", "command", "path", "args", "code", "rule"),
    [
        # format characters are malformed wherever a path or command is expected
        ("scheduler", "sh", "LEGIT/\u202ehs.ko", [], INVALID, "malformed-path"),
        ("scheduler", "sh", "LEGIT/ok\u200d.sh", [], INVALID, "malformed-path"),
        ("scheduler", "sh\u200b", "LEGIT/ok.sh", [], INVALID, "malformed-command"),
        # look-alikes are just other names: not in the policy, or missing where allowed
        ("scheduler", "\u0455h", "LEGIT/ok.sh", [], DENIED, "command-not-allowed"),
        ("scheduler", "\uff0fbin\uff0fsh", "LEGIT/ok.sh", [], DENIED, "command-not-allowed"),
        ("scheduler", "/bin\u2215sh", "LEGIT/ok.sh", [], DENIED, "command-not-allowed"),
        ("scheduler", "sh", "LEGIT/\u043ek.sh", [], NOT_FOUND, "script-missing"),
        ("scheduler", "sh", "LEGIT/o\u0301k.sh", [], NOT_FOUND, "script-missing"),
        ("scheduler", "sh", "LEGIT/ok.sh\u0301", [], DENIED, "script-not-allowed"),
        ("scheduler", "sh", "LEGIT\uff0fok.sh", [], DENIED, "script-not-allowed"),
        ("scheduler", "sh", "LEGIT/ok\uff0esh", [], DENIED, "script-not-allowed"),
        ("scheduler", "sh", "BASE/legit\uff0f..\uff0fok.sh", [], DENIED, "script-not-allowed"),
        ("client", "bash", "TRAP\uff0f..\uff0flegit\uff0fok.sh", [], DENIED, "script-not-allowed"),
        # arguments are data: a bidi override there is an ordinary (refused) character
        ("scheduler", "sh", "LEGIT/ok.sh", ["a\u202eb"], DENIED, "arg-pattern"),
        ("scheduler", "sh", "LEGIT/ok.sh", ["\uff41"], DENIED, "arg-pattern"),
    ],
)
def test_unicode_tricks(
    world: World,
    identity: str,
    command: str,
    path: str,
    args: list[str],
    code: grpc.StatusCode,
    rule: str,
) -> None:
    """RTL override, zero-width joiners, fullwidth solidus, homoglyphs, combining marks."""
    req = pb.StartJobReq(command=command, path=_at(world, path), args=args)
    world.check(world.start(req, identity), {code}, strings=request_strings(req), rule=rule)


def _bad_utf8_cases() -> list[Any]:
    ld = hs.length_delimited
    out = []
    for bad in hs.BAD_UTF8:
        h = bad.hex()
        s = b"a" + bad + b"b"
        out += [
            pytest.param("StartJob", ld(1, s) + ld(2, b"/x"), id=f"StartJob-command-{h}"),
            pytest.param("StartJob", ld(1, b"bash") + ld(2, b"/" + s), id=f"StartJob-path-{h}"),
            pytest.param(
                "StartJob", ld(1, b"bash") + ld(2, b"/x") + ld(3, s), id=f"StartJob-arg-{h}"
            ),
            pytest.param(
                "StartJob",
                ld(1, b"bash") + ld(4, ld(1, s) + ld(2, b"v")),
                id=f"StartJob-env-name-{h}",
            ),
            pytest.param(
                "StartJob",
                ld(1, b"bash") + ld(4, ld(1, b"CANARY_OK") + ld(2, s)),
                id=f"StartJob-env-value-{h}",
            ),
        ]
    bad = hs.BAD_UTF8[0]
    for method in ("QueryJob", "StopJob", "WaitJob", "StreamJobOutput"):
        out.append(pytest.param(method, ld(1, bad), id=f"{method}-jobID"))
    out.append(pytest.param("ListJobs", ld(2, bad), id="ListJobs-owner"))
    out.append(pytest.param("ListJobs", ld(4, bad), id="ListJobs-pageToken"))
    return out


@pytest.mark.parametrize(("method", "data"), _bad_utf8_cases())
def test_invalid_utf8_is_invalid_argument(world: World, method: str, data: bytes) -> None:
    """Overlong, surrogate or truncated UTF-8 in any string field: INVALID_ARGUMENT."""
    _, details = world.check(lambda: world.raw(method)(data), {INVALID})
    assert "could not be decoded" in details


# ---------------------------------------------------------------- explicit: paths


@pytest.mark.parametrize(
    ("identity", "path", "code", "rule"),
    [
        ("scheduler", "LEGIT/../legit/ok.sh", DENIED, "script-path-not-canonical"),
        ("scheduler", "BASE//legit/ok.sh", DENIED, "script-path-not-canonical"),
        ("scheduler", "LEGIT//ok.sh", DENIED, "script-path-not-canonical"),
        ("scheduler", "LEGIT/./ok.sh", DENIED, "script-path-not-canonical"),
        ("scheduler", "LEGIT/ok.sh/", DENIED, "script-path-not-canonical"),
        ("scheduler", "LEGIT/ok.sh/.", DENIED, "script-path-not-canonical"),
        ("scheduler", "LEGIT/../outside/evil.sh", DENIED, "script-path-not-canonical"),
        ("scheduler", "LEGIT/../../../../../etc/passwd", DENIED, "script-path-not-canonical"),
        ("scheduler", "ok.sh", DENIED, "script-path-not-canonical"),
        ("scheduler", "legit/ok.sh", DENIED, "script-path-not-canonical"),
        ("scheduler", "./ok.sh", DENIED, "script-path-not-canonical"),
        ("scheduler", "~/ok.sh", DENIED, "script-path-not-canonical"),
        ("scheduler", "LEGIT", DENIED, "script-not-allowed"),
        ("scheduler", "LEGIT/", DENIED, "script-path-not-canonical"),
        ("scheduler", "OUTSIDE/evil.sh", DENIED, "script-not-allowed"),
        ("scheduler", "/etc/passwd", DENIED, "script-not-allowed"),
        ("scheduler", "/dev/null", DENIED, "script-not-allowed"),
        ("scheduler", "LEGIT/*.sh", NOT_FOUND, "script-missing"),
        ("client", "TRAP/../legit/ok.sh", DENIED, "script-path-not-canonical"),
        ("client", "TRAP/gwdir/../../legit/ok.sh", DENIED, "script-path-not-canonical"),
        ("client", "TRAP//ww.sh", DENIED, "script-path-not-canonical"),
        ("client", "TRAP/dir.sh/", DENIED, "script-path-not-canonical"),
        ("client", "TRAP", DENIED, "script-not-allowed"),
        ("client", "/proc/self/exe", DENIED, "script-not-allowed"),
        ("client", "/proc/self/fd/0", DENIED, "script-not-allowed"),
    ],
)
def test_path_traversal_is_refused(
    world: World, identity: str, path: str, code: grpc.StatusCode, rule: str
) -> None:
    """'..', '//', '/./', relative paths, trailing slashes and outside paths never run."""
    command = "sh" if identity == "scheduler" else "bash"
    req = pb.StartJobReq(command=command, path=_at(world, path))
    world.check(world.start(req, identity), {code}, strings=request_strings(req), rule=rule)


@pytest.mark.parametrize(
    ("name", "code", "rule"),
    [
        ("escape-abs.sh", DENIED, "script-symlink-escape"),
        ("escape-rel.sh", DENIED, "script-symlink-escape"),
        ("escape-outside.sh", DENIED, "script-symlink-escape"),
        ("escape-passwd.sh", DENIED, "script-symlink-escape"),
        # /dev/null is itself an allowed location of this entry: no escape, but a device
        ("escape-dev.sh", DENIED, "not-regular-file"),
        ("dangling.sh", NOT_FOUND, "script-missing"),
        ("loop.sh", PRECONDITION, "script-unreadable"),
    ],
)
def test_symlinks_out_of_the_allowed_place(
    world: World, name: str, code: grpc.StatusCode, rule: str
) -> None:
    """A symlink inside the allowed place that leads elsewhere is refused; its target never runs."""
    req = pb.StartJobReq(command="bash", path=str(world.trap / name))
    world.check(world.start(req), {code}, strings=request_strings(req), rule=rule)


@pytest.mark.parametrize(
    "target", ["OUTSIDE/evil.sh", "../outside/evil.sh", "/etc/passwd", "TRAP/ww.sh", "/dev/null"]
)
def test_symlink_swapped_between_requests(world: World, target: str) -> None:
    """Allowed through a symlink once; after the link is swapped outside, refused, nothing runs."""
    link = world.legit / "link.sh"
    stub = world.stub("scheduler")
    req = pb.StartJobReq(command="sh", path=str(link))
    os.symlink("ok.sh", link)
    try:
        markers = set(os.listdir(world.marker))
        job = stub.StartJob(req, timeout=TIMEOUT).jobID
        res = stub.WaitJob(pb.WaitJobReq(jobID=job), timeout=TIMEOUT)
        assert res.state == pb.SUCCEEDED, res
        ran = set(os.listdir(world.marker)) - markers
        # the canary did run, as the symlink's canonical target (never via the link)
        assert len(ran) == 1 and ran.pop().startswith("ok.sh-")
        world.allowed_marks |= set(os.listdir(world.marker)) - markers
        tmp = world.legit / ".link.tmp"
        os.symlink(_at(world, target), tmp)
        os.replace(tmp, link)
        world.check(world.start(req, "scheduler"), {DENIED}, rule="script-symlink-escape")
    finally:
        with contextlib.suppress(FileNotFoundError):
            link.unlink()


# ---------------------------------------------------------------- explicit: unsafe files


@pytest.mark.parametrize(
    ("path", "code", "rule"),
    [
        ("TRAP/ww.sh", DENIED, "writable-by-others"),
        ("TRAP/gw.sh", DENIED, "writable-by-others"),
        ("TRAP/suid.sh", DENIED, "setuid-setgid"),
        ("TRAP/sgid.sh", DENIED, "setuid-setgid"),
        ("TRAP/gwdir/inner.sh", DENIED, "parent-writable-by-others"),
        ("TRAP/wwdir/inner.sh", DENIED, "parent-writable-by-others"),
        ("TRAP/fifo.sh", DENIED, "not-regular-file"),
        ("TRAP/dir.sh", DENIED, "not-regular-file"),
        ("TRAP/gwdir", DENIED, "not-regular-file"),
        ("/dev/null", DENIED, "not-regular-file"),
        ("TRAP/pinned.sh", DENIED, "sha256-mismatch"),
        pytest.param(
            "TRAP/badowner.sh",
            DENIED,
            "bad-owner",
            marks=pytest.mark.skipif(not IS_ROOT, reason="chown needs root"),
        ),
    ],
)
def test_unsafe_files_are_refused(
    world: World, path: str, code: grpc.StatusCode, rule: str
) -> None:
    """Writable, set-id, FIFO, device, directory, foreign-owned or mis-pinned scripts: refused."""
    req = pb.StartJobReq(command="bash", path=_at(world, path))
    _, details = world.check(world.start(req), {code}, strings=request_strings(req), rule=rule)
    if rule == "not-regular-file":
        assert re.search(r"is a (FIFO|directory|device)", details), details


@pytest.mark.parametrize(
    ("mode", "rule"),
    [
        (0o757, "writable-by-others"),
        (0o775, "writable-by-others"),
        (0o4755, "setuid-setgid"),
        (0o6755, "setuid-setgid"),
    ],
)
def test_script_made_unsafe_after_load_is_refused(world: World, mode: int, rule: str) -> None:
    """A script that was fine becomes writable/set-id: the next start is refused."""
    script = world.legit / "changing.sh"
    shutil.copy(world.legit / "ok.sh", script)
    os.chmod(script, 0o755)
    try:
        os.chmod(script, mode)
        req = pb.StartJobReq(command="sh", path=str(script))
        world.check(world.start(req, "scheduler"), {DENIED}, rule=rule)
    finally:
        script.unlink()


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777])
def test_script_dir_made_writable_is_refused(world: World, mode: int) -> None:
    """The allowed folder becomes group/world-writable: its scripts are refused."""
    os.chmod(world.legit, mode)
    try:
        req = pb.StartJobReq(command="sh", path=str(world.legit / "ok.sh"))
        world.check(world.start(req, "scheduler"), {DENIED}, rule="parent-writable-by-others")
    finally:
        os.chmod(world.legit, 0o755)


def test_non_executable_program_is_failed_precondition(world: World) -> None:
    """An executable entry whose file lost its x bits: FAILED_PRECONDITION, nothing runs."""
    req = pb.StartJobReq(command="tool", path="abc")
    world.check(world.start(req), {PRECONDITION}, rule="not-executable")
    req = pb.StartJobReq(command=str(world.bin / "tool"), path="abc", args=["def"])
    world.check(world.start(req), {PRECONDITION}, rule="not-executable")


@pytest.mark.parametrize(
    ("name", "rule"),
    [("badinterp", "interpreter-file-missing"), ("noshebang", "not-executable-format")],
)
def test_unexecutable_file_is_refused_at_decision(world: World, name: str, rule: str) -> None:
    """A bad interpreter line / no interpreter line: FAILED_PRECONDITION before anything starts."""
    req = pb.StartJobReq(command=str(world.bin / name))
    world.check(world.start(req, "admin"), {PRECONDITION}, rule=rule)


# ---------------------------------------------------------------- explicit: missing files


def test_missing_script_is_not_found_only_inside_allowed_places(world: World) -> None:
    """NOT_FOUND inside an allowed place; outside, one refusal whether the file exists or not."""
    world.check(
        world.start(pb.StartJobReq(command="bash", path=str(world.trap / "nope.sh"))),
        {NOT_FOUND},
        rule="script-missing",
    )
    world.check(
        world.start(pb.StartJobReq(command="sh", path=str(world.legit / "nope.sh")), "scheduler"),
        {NOT_FOUND},
        rule="script-missing",
    )
    pairs = [
        ("/etc/passwd", "/etc/no-such-file"),
        (str(world.outside / "evil.sh"), str(world.outside / "nope.sh")),
        ("/root/.bashrc", "/root/.no-such-file"),
        (str(world.bin / "tool"), str(world.bin / "nope")),
    ]
    for existing, missing in pairs:
        answers = []
        for path in (existing, missing):
            req = pb.StartJobReq(command="bash", path=path)
            _, details = world.check(world.start(req), {DENIED}, rule="script-not-allowed")
            answers.append(details.replace(path, "<path>"))
        assert answers[0] == answers[1]


# ---------------------------------------------------------------- explicit: arguments, env


@pytest.mark.parametrize(
    ("args", "env", "code", "rule"),
    [
        (["a", "b", "c"], {}, INVALID, "too-many-args"),
        (["a" * 17], {}, INVALID, "arg-too-long"),
        (["A"], {}, DENIED, "arg-pattern"),
        (["$(id)"], {}, DENIED, "arg-pattern"),
        (["-c"], {}, DENIED, "arg-pattern"),
        ([""], {}, DENIED, "arg-pattern"),
        (["a\nb"], {}, DENIED, "arg-pattern"),
        (["a\x00"], {}, INVALID, "malformed-arg"),
        ([], {"FOO": "1"}, DENIED, "env-not-allowed"),
        ([], {"LD_PRELOAD": "/tmp/x.so"}, DENIED, "env-not-allowed"),
        ([], {"BASH_ENV": "/tmp/x"}, DENIED, "env-not-allowed"),
        ([], {"PYTHONPATH": "/tmp"}, DENIED, "env-not-allowed"),
        ([], {"PATH": "/tmp"}, DENIED, "env-not-allowed"),
        ([], {"AGENT_JOB_ID": "x"}, DENIED, "env-not-allowed"),
        ([], {"canary_ok": "1"}, DENIED, "env-not-allowed"),
        ([], {"1X": "1"}, INVALID, "malformed-env"),
        ([], {"A=B": "1"}, INVALID, "malformed-env"),
        ([], {"": "1"}, INVALID, "malformed-env"),
        # regression: '$' in the name regex let a trailing newline through
        ([], {"CANARY_OK\n": "1"}, INVALID, "malformed-env"),
        ([], {f"V{i}": "1" for i in range(65)}, INVALID, "too-many-env"),
    ],
)
def test_argument_and_environment_rules(
    world: World, args: list[str], env: dict[str, str], code: grpc.StatusCode, rule: str
) -> None:
    """Per-entry argument count, length and pattern, and the env whitelist."""
    req = pb.StartJobReq(command="sh", path=str(world.legit / "ok.sh"), args=args, env=env)
    world.check(world.start(req, "scheduler"), {code}, strings=request_strings(req), rule=rule)


@pytest.mark.parametrize(
    ("identity", "command", "path", "code", "rule"),
    [
        ("client", "sh", "LEGIT/ok.sh", DENIED, "command-not-allowed"),
        ("admin", "sh", "LEGIT/ok.sh", DENIED, "command-not-allowed"),
        ("client", "true", "", DENIED, "command-not-allowed"),
        ("agent", "sh", "LEGIT/ok.sh", DENIED, "identity-not-allowed"),
        ("client", "bash", "", INVALID, "script-required"),
        ("client", "tool", "ABC", DENIED, "arg-pattern"),
        ("client", "", "", INVALID, "malformed-command"),
        ("client", "/bin/sh -c id", "", DENIED, "command-not-allowed"),
        ("client", "/usr/bin/env", "touch", DENIED, "command-not-allowed"),
    ],
)
def test_who_may_run_what(
    world: World, identity: str, command: str, path: str, code: grpc.StatusCode, rule: str
) -> None:
    """Entries limited to identities, unknown identities, empty and unknown commands."""
    req = pb.StartJobReq(command=command, path=_at(world, path))
    world.check(world.start(req, identity), {code}, strings=request_strings(req), rule=rule)


# ---------------------------------------------------------------- explicit: ids, lists


BAD_JOB_IDS = [
    "",
    "not-a-uuid",
    "../../etc/passwd",
    "00000000-0000-4000-8000-00000000000",
    "00000000-0000-4000-8000-0000000000000",
    "00000000000040008000000000000000",
    "{00000000-0000-4000-8000-000000000000}",
    "00000000-0000-4000-8000-00000000000A",
    "00000000-0000-4000-8000-000000000000\x00",
    "00000000-0000-4000-8000-00000000000\u0660",
    "urn:uuid:00000000-0000-4000-8000-000000000000",
    "x" * 70_000,
    "\u202e" * 36,
]


@pytest.mark.parametrize("method", ["QueryJob", "StopJob", "WaitJob", "StreamJobOutput"])
def test_bad_job_ids_are_invalid_argument(world: World, method: str) -> None:
    """Malformed job ids for Query/Stop/Wait/Stream: INVALID_ARGUMENT; unknown ones NOT_FOUND."""
    stub = world.stub()

    def call(job_id: str) -> Callable[[], Any]:
        if method == "StreamJobOutput":
            return lambda: list(
                stub.StreamJobOutput(pb.StreamJobOutputReq(jobID=job_id), timeout=TIMEOUT)
            )
        req_cls = {"QueryJob": pb.QueryJobReq, "StopJob": pb.StopJobReq, "WaitJob": pb.WaitJobReq}[
            method
        ]
        return lambda: getattr(stub, method)(req_cls(jobID=job_id), timeout=TIMEOUT)

    for job_id in BAD_JOB_IDS:
        world.check(call(job_id), {INVALID}, rule="bad-job-id")
    world.check(call(str(uuid.uuid4())), {NOT_FOUND}, rule="unknown-job")
    # another identity's job: refused, never shown or stopped
    world.check(call(world.alive_job), {DENIED}, rule="not-job-owner")


def _b64(s: str) -> str:
    return base64.urlsafe_b64encode(s.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        "x",
        "!!!",
        "\u202e",
        "\x00",
        "v1:5",
        _b64("v2:5"),
        _b64("v1:"),
        _b64("v1:-5"),
        _b64("v1:5 "),
        _b64("v1:\u0665"),
        _b64("v1:" + "9" * 19),
        _b64("v1:" + "9" * 400),
        _b64("v1:9223372036854775808"),
        _b64("v1:18446744073709551616"),
        base64.urlsafe_b64encode(b"v1:\xff").decode(),
        "=" * 8,
        "A" * 10_000,
    ],
)
def test_bad_page_tokens_are_invalid_argument(world: World, token: str) -> None:
    """A page token the agent did not issue (including out-of-range numbers): INVALID_ARGUMENT."""
    world.check(
        lambda: world.stub().ListJobs(pb.ListJobsReq(pageToken=token), timeout=TIMEOUT),
        {INVALID},
        rule="bad-page-token",
    )


@pytest.mark.parametrize("states", [[0], [7], [-1], [2**31 - 1], [-(2**31)], [1, 99], [3, 0, 2]])
def test_invalid_states_in_list_jobs_are_invalid_argument(world: World, states: list[int]) -> None:
    """Unknown JobState enum values in ListJobs.states: INVALID_ARGUMENT."""
    req = pb.ListJobsReq(states=states)  # type: ignore[arg-type]  # values outside the enum
    world.check(lambda: world.stub().ListJobs(req, timeout=TIMEOUT), {INVALID}, rule="bad-state")


@pytest.mark.parametrize(
    ("owner", "size", "code", "rule"),
    [
        ("admin", 0, DENIED, "list-other-owner"),
        ("\u202eadmin", 0, DENIED, "list-other-owner"),
        ("", 1001, INVALID, "page-size"),
        ("", 2**32 - 1, INVALID, "page-size"),
    ],
)
def test_list_jobs_owner_and_size(
    world: World, owner: str, size: int, code: grpc.StatusCode, rule: str
) -> None:
    """Another owner (for a non-admin) and oversize pages are refused."""
    req = pb.ListJobsReq(owner=owner, pageSize=size)
    world.check(lambda: world.stub().ListJobs(req, timeout=TIMEOUT), {code}, rule=rule)


@pytest.mark.parametrize("offset", [2**62 + 1, 2**63 - 1, 2**63, 2**64 - 1])
def test_stream_offset_beyond_any_file_is_invalid_argument(world: World, offset: int) -> None:
    """Regression: offsets past 2**62 made pread raise (UNKNOWN); now INVALID_ARGUMENT."""
    stub = world.stub("admin")
    req = pb.StreamJobOutputReq(jobID=world.alive_job, offset=offset)
    world.check(
        lambda: list(stub.StreamJobOutput(req, timeout=TIMEOUT)), {INVALID}, rule="bad-offset"
    )


def test_unknown_method_is_unimplemented_and_harmless(world: World) -> None:
    """A method the service does not have: UNIMPLEMENTED, the agent carries on."""
    ch = world.channels["client"]
    call = ch.unary_unary(
        "/jobscheduler.Worker/RunShell",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    code, _ = outcome(lambda: call(b"\x0a\x02id", timeout=TIMEOUT))
    assert code == grpc.StatusCode.UNIMPLEMENTED
    world.assert_alive()


def test_nothing_ever_ran(world: World) -> None:
    """After everything above, no canary left a mark except the symlink tests' allowed runs."""
    assert set(os.listdir(world.marker)) == world.allowed_marks
    assert stat.S_IMODE(os.stat(world.legit).st_mode) == 0o755
    wait_for(lambda: not job_children(world.agent.pid), timeout=10)


# ---------------------------------------------------------------- escapes (job cgroups)

_RESPAWNER = """#!/bin/bash
# A loop in its own session, scrubbed environment, ignoring TERM, that keeps
# starting new sessions whose processes carry new names.
( setsid env -i /bin/bash -c '
    trap "" TERM HUP INT
    echo "pid $$"
    while :; do
        ( setsid /bin/bash -c "trap \\"\\" TERM; exec -a respawn-\\$RANDOM sleep 1000" & )
        sleep 0.01
    done' & )
sleep 0.3
echo ready
exec sleep 1000
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="job cgroups need root on this machine")
@pytest.mark.parametrize("end", ["stop", "timeout"])
def test_respawning_escapee_leaves_nothing_alive(make_agent: Any, end: str) -> None:
    """A job that keeps spawning new sessions with new names: nothing of it is left at the end."""
    d = make_safe_dir()
    (d / "respawn.sh").write_text(_RESPAWNER)
    os.chmod(d / "respawn.sh", 0o755)
    a = make_agent(
        f"""
version: 1
entries:
  - name: respawn
    command: /bin/bash
    aliases: [bash]
    scripts: ["{d}/*.sh"]
"""
    )
    c = a.client()
    job = c.start("bash", str(d / "respawn.sh"), timeout_seconds=2 if end == "timeout" else None)
    wait_for(lambda: b"ready" in b"".join(c.stream(job)), timeout=10)
    if end == "stop":
        c.stop(job)
    st_ = c.wait(job, timeout=30)
    assert st_.state == ("STOPPED" if end == "stop" else "TIMED_OUT")
    loop = int(
        next(ln for ln in b"".join(c.stream(job)).split(b"\n") if ln.startswith(b"pid "))[4:]
    )
    assert not os.path.exists(f"/proc/{loop}") or _zombie(loop)
    marker = b"respawn-"
    alive = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{name}/cmdline", "rb") as f:
                if f.read().startswith(marker):
                    alive.append(int(name))
    assert not alive


def _zombie(pid: int) -> bool:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
        return data[data.rfind(b")") + 2 :][:1] == b"Z"
    return True
