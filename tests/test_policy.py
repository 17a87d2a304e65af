"""The whitelist policy as pure code: ``parse``/``load`` and ``decide``, on real files.

Every denial rule of ``agent.keeper.policy`` has a case here that fails if the rule
is removed (``test_each_rule_denies``), and a meta-test checks that no rule
name in the source is without a case. Rules that need a file to change
between two checks (the time-of-check races StrictModes defends against)
change a real file at that moment through the ``FileSystem`` seam.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.keeper import filetrust as trust
from agent.keeper import policy, policyfile, validation
from agent.keeper.errors import (
    FailedPrecondition,
    InvalidArgument,
    Kind,
    NotFound,
    PermissionDenied,
)
from agent.keeper.filetrust import RealFileSystem
from agent.keeper.policy import (
    Decision,
    Denial,
    JobRequest,
    PolicyError,
    decide,
)
from agent.keeper.policyfile import load, parse

from helpers import IS_ROOT, make_safe_dir, write_script

POLICY_SOURCE = "".join(Path(str(m.__file__)).read_text() for m in (policy, trust, validation))
TRUE = os.path.realpath("/bin/true")
needs_root = pytest.mark.skipif(not IS_ROOT, reason="chown to another uid needs root")


# ---------------------------------------------------------------- fixtures


@dataclass
class Env:
    """A safe folder with an allowed script place, an outside place and a program."""

    dir: Path
    scripts: Path
    outside: Path
    tool: Path

    @property
    def ok(self) -> Path:
        return self.scripts / "ok.sh"

    def yaml(self, extra: str = "") -> str:
        return f"""
version: 1
entries:
  - name: interp
    command: /bin/sh
    aliases: [sh]
    scripts: ["{self.scripts}/"]
    args: {{max_count: 2, max_length: 8, patterns: ['[a-z]+']}}
    env: [GOOD]
  - name: tool
    command: {self.tool}
    aliases: [tool]
    args: {{max_count: 2, max_length: 8}}
  - name: only-ops
    command: /bin/echo
    aliases: [echo]
    identities: [ops]
{extra}"""

    def policy(self, extra: str = "") -> policy.Policy:
        return parse(self.yaml(extra), "test.yaml")

    def req(self, **kw: Any) -> JobRequest:
        """A request the default policy allows; keywords change it."""
        base: dict[str, Any] = {
            "command": "sh",
            "path": str(self.ok),
            "args": ("abc",),
            "env": {"GOOD": "1"},
            "identity": "client",
        }
        base.update(kw)
        return JobRequest(**base)

    def script(self, rel: str, mode: int = 0o755) -> Path:
        p = self.scripts / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        write_script(p.parent, p.name, "#!/bin/sh\necho hi\n", mode)
        os.chmod(p, mode)
        return p


@pytest.fixture
def env() -> Iterator[Env]:
    """A fresh StrictModes-safe folder for one test."""
    d = make_safe_dir()
    e = Env(dir=d, scripts=d / "scripts", outside=d / "outside", tool=d / "bin" / "tool")
    for sub in (e.scripts, e.outside, e.tool.parent):
        sub.mkdir(mode=0o755)
        os.chmod(sub, 0o755)
    e.script("ok.sh")
    write_script(e.outside, "evil.sh", "#!/bin/sh\necho evil\n")
    shutil.copy(TRUE, e.tool)
    os.chmod(e.tool, 0o755)
    yield e
    shutil.rmtree(d, ignore_errors=True)


def rules(d: Decision) -> set[str]:
    return {x.rule for x in d.denials}


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ---------------------------------------------------------------- allowed requests


def test_allowed_script_gives_exact_plan(env: Env) -> None:
    """An allowed interpreter request plans `interpreter canonical-script args` with its env."""
    d = decide(env.policy(), env.req())
    assert d.allowed and d.plan is not None and not d.denials
    assert d.plan.executable == os.path.realpath("/bin/sh")
    assert d.plan.argv == (os.path.realpath("/bin/sh"), str(env.ok), "abc")
    assert dict(d.plan.env) == {"GOOD": "1"} and d.plan.script == str(env.ok)
    assert d.plan.exec_fd is None


def test_allowed_executable_gets_path_as_first_argument(env: Env) -> None:
    """For an executable entry, path is argv[1] and counts against the argument rules."""
    d = decide(env.policy(), env.req(command="tool", path="first", args=("second",), env={}))
    assert d.plan is not None and d.plan.argv == (str(env.tool), "first", "second")
    d = decide(env.policy(), env.req(command="tool", path="first", args=("a", "b"), env={}))
    assert rules(d) == {"too-many-args"}


def test_symlink_inside_the_allowed_place_runs_its_canonical_target(env: Env) -> None:
    """A link that stays inside the allowed place is followed; the plan names the real file."""
    os.symlink("ok.sh", env.scripts / "link.sh")
    d = decide(env.policy(), env.req(path=str(env.scripts / "link.sh")))
    assert d.plan is not None and d.plan.script == str(env.ok)
    assert d.plan.argv[1] == str(env.ok)


def test_pinned_program_is_executed_through_its_verified_descriptor(env: Env) -> None:
    """A sha256-pinned command yields a sealed copy holding exactly the pinned bytes."""
    p = env.policy(f"""  - name: pinned
    command: {TRUE}
    aliases: [pinned-true]
    sha256: "{sha256(Path(TRUE))}"
""")
    d = decide(p, JobRequest(command="pinned-true", path="", identity="client"))
    assert d.plan is not None and d.plan.exec_fd is not None
    try:
        seals = fcntl.fcntl(d.plan.exec_fd, fcntl.F_GET_SEALS)
        want = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
        assert seals & want == want
        size = os.fstat(d.plan.exec_fd).st_size
        assert os.pread(d.plan.exec_fd, size + 1, 0) == Path(TRUE).read_bytes()
    finally:
        os.close(d.plan.exec_fd)


def test_every_entry_for_a_command_is_tried(env: Env) -> None:
    """Two entries for one command: the second allows what the first refuses."""
    other = env.dir / "other"
    other.mkdir(mode=0o755)
    os.chmod(other, 0o755)
    write_script(other, "x.sh", "#!/bin/sh\n")
    p = env.policy(f"""  - name: interp2
    command: /bin/sh
    scripts: ["{other}/*.sh"]
""")
    d = decide(p, env.req(command="/bin/sh", path=str(other / "x.sh"), args=(), env={}))
    assert d.plan is not None and d.plan.entry == "interp2"


# ---------------------------------------------------------------- the races, for real


class _RaceFS(RealFileSystem):
    """The real file system, with one real change made at a chosen moment."""

    def __init__(
        self,
        *,
        after_realpath: Path | None = None,
        after_lstat: Path | None = None,
        before_open: Path | None = None,
        change: Callable[[], None] = lambda: None,
        crash: bool = False,
    ) -> None:
        self.after_realpath = after_realpath
        self.after_lstat = after_lstat
        self.before_open = before_open
        self.change = change
        self.crash = crash
        self.done = False

    def _maybe(self, path: str, trigger: Path | None) -> None:
        if trigger is not None and path == str(trigger) and not self.done:
            self.done = True
            self.change()

    def realpath(self, path: str) -> str:
        if self.crash:
            raise RuntimeError("unexpected")
        out = super().realpath(path)
        self._maybe(out, self.after_realpath)
        return out

    def lstat(self, path: str) -> os.stat_result:
        st = super().lstat(path)
        self._maybe(path, self.after_lstat)
        return st

    def open_verified(self, path: str, st: os.stat_result) -> int:
        self._maybe(path, self.before_open)
        return super().open_verified(path, st)


def _replace_dir_with_file(d: Path) -> Callable[[], None]:
    def change() -> None:
        d.rename(d.with_name(d.name + ".gone"))
        d.write_text("")

    return change


def _remove_dir(d: Path) -> Callable[[], None]:
    def change() -> None:
        d.rename(d.with_name(d.name + ".gone"))

    return change


def _replace_file(p: Path) -> Callable[[], None]:
    def change() -> None:
        tmp = p.with_name(p.name + ".new")
        shutil.copy(p, tmp)  # same bytes, new inode
        os.replace(tmp, p)

    return change


# ---------------------------------------------------------------- one case per rule

Case = Callable[[Env], Decision]


def _fifo(e: Env) -> Decision:
    os.mkfifo(e.scripts / "fifo.sh")
    return decide(e.policy(), e.req(path=str(e.scripts / "fifo.sh")))


def _chown(e: Env, p: Path, target: Path) -> Decision:
    os.chown(p, 12345, 12345)
    return decide(e.policy(), e.req(path=str(target)))


def _not_executable(e: Env) -> Decision:
    p = e.policy()
    os.chmod(e.tool, 0o644)  # after loading: files change
    return decide(p, e.req(command="tool", path="a", args=(), env={}))


def _command_missing(e: Env) -> Decision:
    p = e.policy()
    e.tool.unlink()
    return decide(p, e.req(command="tool", path="a", args=(), env={}))


def _command_moved(e: Env) -> Decision:
    p = e.policy()
    shutil.copy(e.tool, e.tool.with_name("tool2"))
    e.tool.unlink()
    os.symlink("tool2", e.tool)
    return decide(p, e.req(command="tool", path="a", args=(), env={}))


def _command_dir_moved(e: Env) -> Decision:
    """The program's folder (not the program) replaced by a link to a copy of it."""
    p = e.policy()
    bindir = e.tool.parent
    shutil.copytree(bindir, bindir.with_name("bin2"))
    shutil.rmtree(bindir)
    os.symlink("bin2", bindir)
    return decide(p, e.req(command="tool", path="a", args=(), env={}))


def _pinned(e: Env, digest: str | None = None) -> tuple[policy.Policy, Path]:
    pinned = e.script("pinned.sh")
    p = e.policy(f"""  - name: pinned
    command: /bin/sh
    aliases: [pinned-sh]
    scripts: [{{path: "{pinned}", sha256: "{digest or sha256(pinned)}"}}]
""")
    return p, pinned


def _file_changed(e: Env) -> Decision:
    p, pinned = _pinned(e)
    assert decide(p, JobRequest("pinned-sh", str(pinned), identity="c")).allowed
    return decide(
        p,
        JobRequest("pinned-sh", str(pinned), identity="c"),
        fs=_RaceFS(before_open=pinned, change=_replace_file(pinned)),
    )


class _ReadFailsFS(RealFileSystem):
    """Opening the verified file works, reading it fails (an I/O error while hashing)."""

    def open_verified(self, path: str, st: os.stat_result) -> int:
        os.close(super().open_verified(path, st))
        # a descriptor whose read fails with an OSError (EISDIR)
        return os.open(os.path.dirname(path), os.O_RDONLY | os.O_CLOEXEC)


def _unreadable_while_hashing(e: Env) -> Decision:
    p, pinned = _pinned(e)
    return decide(p, JobRequest("pinned-sh", str(pinned), identity="c"), fs=_ReadFailsFS())


def _sha_mismatch_script(e: Env) -> Decision:
    p, pinned = _pinned(e, "0" * 64)
    return decide(p, JobRequest("pinned-sh", str(pinned), identity="c"))


def _sha_mismatch_command(e: Env) -> Decision:
    p = e.policy(f"""  - name: pinned
    command: {TRUE}
    aliases: [pinned-true]
    sha256: "{"0" * 64}"
""")
    return decide(p, JobRequest("pinned-true", "", identity="c"))


def _file_missing(e: Env) -> Decision:
    s = e.script("sub/x.sh")
    return decide(e.policy(), e.req(path=str(s)), fs=_RaceFS(after_realpath=s, change=s.unlink))


def _file_unreadable(e: Env) -> Decision:
    s = e.script("sub/x.sh")
    fs = _RaceFS(after_realpath=s, change=_replace_dir_with_file(s.parent))
    return decide(e.policy(), e.req(path=str(s)), fs=fs)


def _parent_not_directory(e: Env) -> Decision:
    s = e.script("sub/x.sh")
    fs = _RaceFS(after_lstat=s, change=_replace_dir_with_file(s.parent))
    return decide(e.policy(), e.req(path=str(s)), fs=fs)


def _parent_unreadable(e: Env) -> Decision:
    s = e.script("sub/x.sh")
    return decide(
        e.policy(), e.req(path=str(s)), fs=_RaceFS(after_lstat=s, change=_remove_dir(s.parent))
    )


def _loop(e: Env) -> Decision:
    os.symlink("loop.sh", e.scripts / "loop.sh")
    return decide(e.policy(), e.req(path=str(e.scripts / "loop.sh")))


def _escape(e: Env) -> Decision:
    os.symlink(e.outside / "evil.sh", e.scripts / "link.sh")
    return decide(e.policy(), e.req(path=str(e.scripts / "link.sh")))


def _group_writable_dir(e: Env) -> Decision:
    s = e.script("gw/x.sh")
    os.chmod(s.parent, 0o775)
    return decide(e.policy(), e.req(path=str(s)))


def _directory(e: Env) -> Decision:
    e.script("d.sh/x.sh")
    return decide(e.policy(), e.req(path=str(e.scripts / "d.sh")))


def _symlinked_interpreter(e: Env) -> Decision:
    """A #! naming a symlink inside a group-writable directory (it could be re-pointed)."""
    os.makedirs(e.dir / "gw", mode=0o775)
    os.chmod(e.dir / "gw", 0o775)
    os.symlink(TRUE, e.dir / "gw" / "link")
    return _shebang(e, f"#!{e.dir}/gw/link\n".encode())


def _shebang(
    e: Env,
    content: bytes,
    interp: Path | None = None,
    mode: int = 0o755,
    iparent_mode: int | None = None,
    iowner: int | None = None,
) -> Decision:
    """The program ``tool`` rewritten to ``content``; ``interp`` made an ELF with ``mode``."""
    p = e.policy()
    if interp is not None:
        interp.parent.mkdir(parents=True, exist_ok=True)
        if not interp.exists():
            shutil.copy(TRUE, interp)
        os.chmod(interp, mode)
        if iparent_mode is not None:
            os.chmod(interp.parent, iparent_mode)
        if iowner is not None:
            os.chown(interp, iowner, iowner)
    e.tool.write_bytes(content)
    os.chmod(e.tool, 0o755)
    return decide(p, e.req(command="tool", path="a", args=(), env={}))


def _not_elf_interp(e: Env) -> Decision:
    fake = e.dir / "ibin" / "fake"
    fake.parent.mkdir(mode=0o755)
    os.chmod(fake.parent, 0o755)
    fake.write_bytes(b"\x7fELX not really\n")
    return _shebang(e, f"#!{fake}\n".encode(), fake)


def _d(e: Env, **kw: Any) -> Decision:
    return decide(e.policy(), e.req(**kw))


RULE_CASES: dict[str, tuple[Kind, Case]] = {
    # malformed requests, whatever the policy says
    "malformed-command": (Kind.INVALID_ARGUMENT, lambda e: _d(e, command="s\x00h")),
    "malformed-command/format-char": (Kind.INVALID_ARGUMENT, lambda e: _d(e, command="s\u202eh")),
    "malformed-command/empty": (Kind.INVALID_ARGUMENT, lambda e: _d(e, command="")),
    "malformed-path": (Kind.INVALID_ARGUMENT, lambda e: _d(e, path=str(e.ok) + "\x01")),
    "malformed-path/too-long": (Kind.INVALID_ARGUMENT, lambda e: _d(e, path="/" + "a" * 5000)),
    "malformed-arg": (Kind.INVALID_ARGUMENT, lambda e: _d(e, args=("a\x00b",))),
    # an unknown command: the request cap must act before (and without) any entry
    "too-many-args/request-cap": (
        Kind.INVALID_ARGUMENT,
        lambda e: _d(e, command="/bin/nope", args=("a",) * (validation.MAX_ARGS + 1)),
    ),
    "too-many-args/entry": (Kind.INVALID_ARGUMENT, lambda e: _d(e, args=("a", "b", "c"))),
    "arg-too-long/request-cap": (
        Kind.INVALID_ARGUMENT,
        lambda e: _d(e, command="/bin/nope", args=("a" * (validation.MAX_ARG_BYTES + 1),)),
    ),
    "arg-too-long/entry": (Kind.INVALID_ARGUMENT, lambda e: _d(e, args=("abcdefghi",))),
    "args-without-path": (
        Kind.INVALID_ARGUMENT,
        lambda e: _d(e, command="tool", path="", args=("a",), env={}),
    ),
    "too-many-env": (
        Kind.INVALID_ARGUMENT,
        lambda e: _d(e, env={f"V{i}": "1" for i in range(validation.MAX_ENV + 1)}),
    ),
    "malformed-env/name": (Kind.INVALID_ARGUMENT, lambda e: _d(e, env={"1X": "1"})),
    "malformed-env/trailing-newline": (Kind.INVALID_ARGUMENT, lambda e: _d(e, env={"GOOD\n": "1"})),
    "malformed-env/value": (Kind.INVALID_ARGUMENT, lambda e: _d(e, env={"GOOD": "a\x00"})),
    # the policy's own rules
    "command-not-allowed": (Kind.PERMISSION_DENIED, lambda e: _d(e, command="/bin/sh -c")),
    "command-not-allowed/other-identity": (
        Kind.PERMISSION_DENIED,
        lambda e: _d(e, command="echo", path="", args=(), env={}),
    ),
    "arg-pattern": (Kind.PERMISSION_DENIED, lambda e: _d(e, args=("ABC",))),
    "env-not-allowed": (Kind.PERMISSION_DENIED, lambda e: _d(e, env={"OTHER": "1"})),
    "script-required": (Kind.INVALID_ARGUMENT, lambda e: _d(e, path="", args=())),
    "script-path-not-canonical": (
        Kind.PERMISSION_DENIED,
        lambda e: _d(e, path=f"{e.scripts}/../scripts/ok.sh"),
    ),
    "script-path-not-canonical/relative": (Kind.PERMISSION_DENIED, lambda e: _d(e, path="ok.sh")),
    "script-not-allowed": (
        Kind.PERMISSION_DENIED,
        lambda e: _d(e, path=str(e.outside / "evil.sh")),
    ),
    "script-missing": (Kind.NOT_FOUND, lambda e: _d(e, path=str(e.scripts / "nope.sh"))),
    "script-unreadable": (Kind.FAILED_PRECONDITION, _loop),
    "script-symlink-escape": (Kind.PERMISSION_DENIED, _escape),
    "not-regular-file": (Kind.PERMISSION_DENIED, _fifo),
    "not-regular-file/directory": (Kind.PERMISSION_DENIED, _directory),
    "setuid-setgid": (
        Kind.PERMISSION_DENIED,
        lambda e: _d(e, path=str(e.script("suid.sh", 0o4755))),
    ),
    "setuid-setgid/setgid": (
        Kind.PERMISSION_DENIED,
        lambda e: _d(e, path=str(e.script("sgid.sh", 0o2755))),
    ),
    "writable-by-others": (
        Kind.PERMISSION_DENIED,
        lambda e: _d(e, path=str(e.script("ww.sh", 0o757))),
    ),
    "writable-by-others/group": (
        Kind.PERMISSION_DENIED,
        lambda e: _d(e, path=str(e.script("gw.sh", 0o775))),
    ),
    "bad-owner": (
        Kind.PERMISSION_DENIED,
        lambda e: _chown(e, e.script("theirs.sh"), e.scripts / "theirs.sh"),
    ),
    "not-executable": (Kind.FAILED_PRECONDITION, _not_executable),
    "parent-writable-by-others": (Kind.PERMISSION_DENIED, _group_writable_dir),
    "parent-bad-owner": (
        Kind.PERMISSION_DENIED,
        lambda e: _chown(e, e.script("theirs/x.sh").parent, e.scripts / "theirs" / "x.sh"),
    ),
    "parent-not-directory": (Kind.PERMISSION_DENIED, _parent_not_directory),
    "parent-unreadable": (Kind.FAILED_PRECONDITION, _parent_unreadable),
    "file-missing": (Kind.NOT_FOUND, _file_missing),
    "file-unreadable": (Kind.FAILED_PRECONDITION, _file_unreadable),
    "file-changed": (Kind.FAILED_PRECONDITION, _file_changed),
    "file-unreadable/while-hashing": (Kind.FAILED_PRECONDITION, _unreadable_while_hashing),
    "sha256-mismatch": (Kind.PERMISSION_DENIED, _sha_mismatch_script),
    "sha256-mismatch/command": (Kind.PERMISSION_DENIED, _sha_mismatch_command),
    "command-missing": (Kind.FAILED_PRECONDITION, _command_missing),
    "command-moved": (Kind.FAILED_PRECONDITION, _command_moved),
    "command-moved/folder": (Kind.FAILED_PRECONDITION, _command_dir_moved),
    # the program's format and its #! interpreter
    "not-executable-format": (Kind.FAILED_PRECONDITION, lambda e: _shebang(e, b"echo hi\n")),
    "not-executable-format/fake-elf": (
        Kind.FAILED_PRECONDITION,
        lambda e: _shebang(e, b"\x7fEL\n"),
    ),
    "interpreter-missing": (Kind.FAILED_PRECONDITION, lambda e: _shebang(e, b"#!  \n")),
    "interpreter-line-too-long": (
        Kind.FAILED_PRECONDITION,
        lambda e: _shebang(e, b"#!/" + b"a" * 300),
    ),
    "interpreter-not-absolute": (Kind.PERMISSION_DENIED, lambda e: _shebang(e, b"#!bash\n")),
    "interpreter-nested-script": (
        Kind.FAILED_PRECONDITION,
        lambda e: _shebang(e, f"#!{e.ok} -x\n".encode()),
    ),
    "interpreter-not-elf": (Kind.FAILED_PRECONDITION, _not_elf_interp),
    "interpreter-file-missing": (
        Kind.FAILED_PRECONDITION,
        lambda e: _shebang(e, f"#!{e.dir}/nope/sh\n".encode()),
    ),
    "interpreter-parent-writable-by-others": (
        Kind.PERMISSION_DENIED,
        lambda e: _shebang(
            e, f"#!{e.dir}/ww/sh\n".encode(), e.dir / "ww" / "sh", iparent_mode=0o777
        ),
    ),
    "interpreter-parent-writable-by-others/via-symlink": (
        Kind.PERMISSION_DENIED,
        lambda e: _symlinked_interpreter(e),
    ),
    "interpreter-writable-by-others": (
        Kind.PERMISSION_DENIED,
        lambda e: _shebang(e, f"#!{e.dir}/gwi/sh\n".encode(), e.dir / "gwi" / "sh", 0o775),
    ),
    "interpreter-bad-owner": (
        Kind.PERMISSION_DENIED,
        lambda e: _shebang(e, f"#!{e.dir}/oth/sh\n".encode(), e.dir / "oth" / "sh", iowner=12345),
    ),
    "interpreter-not-executable": (
        Kind.FAILED_PRECONDITION,
        lambda e: _shebang(e, f"#!{e.dir}/nx/sh\n".encode(), e.dir / "nx" / "sh", 0o644),
    ),
    "internal-check-error": (
        Kind.FAILED_PRECONDITION,
        lambda e: decide(e.policy(), e.req(), fs=_RaceFS(crash=True)),
    ),
}
ROOT_ONLY = {"bad-owner", "parent-bad-owner", "interpreter-bad-owner"}


def _case_params() -> list[Any]:
    return [
        pytest.param(name, marks=needs_root if name.split("/")[0] in ROOT_ONLY else ())
        for name in RULE_CASES
    ]


def test_the_base_request_is_allowed(env: Env) -> None:
    """The request every rule case starts from is allowed (so each denial is the rule's doing)."""
    assert decide(env.policy(), env.req()).allowed


@pytest.mark.parametrize("case", _case_params())
def test_each_rule_denies(env: Env, case: str) -> None:
    """Each rule, on its own, denies with its name and its status kind."""
    kind, make = RULE_CASES[case]
    rule = case.split("/")[0]
    d = make(env)
    assert not d.allowed and d.plan is None
    assert rule in rules(d), f"{rule} not in {rules(d)}: {d.denials}"
    mine = [x for x in d.denials if x.rule == rule]
    assert all(x.kind is kind for x in mine), mine
    err = d.error()
    assert rule in err.rule.split(",") and f"[{rule}]" in err.message
    assert "Traceback" not in err.message


def test_every_rule_in_the_code_has_a_case() -> None:
    """No denial rule name in the policy, trust or validation code is without a case above."""
    in_code = set(re.findall(r'(?:deny|bad)\(\s*"([a-z0-9-]+)"', POLICY_SOURCE))
    in_code |= set(re.findall(r'Denial\([^,]+,\s*"([a-z0-9-]+)"', POLICY_SOURCE))
    assert len(in_code) > 25, in_code  # the patterns still find the rules
    covered = {c.split("/")[0] for c in RULE_CASES}
    assert in_code <= covered, in_code - covered


def test_request_outside_allowed_places_reveals_nothing_about_existence(env: Env) -> None:
    """Outside the allowed places, an existing and a missing file get the same answer."""
    p = env.policy()
    a = decide(p, env.req(path=str(env.outside / "evil.sh"))).error()
    b = decide(p, env.req(path=str(env.outside / "nope.sh"))).error()
    assert type(a) is type(b) is PermissionDenied
    assert a.message.replace("evil.sh", "X") == b.message.replace("nope.sh", "X")


def test_all_reasons_are_reported_at_once(env: Env) -> None:
    """Several problems in one request: every reason is listed, the status is PERMISSION_DENIED."""
    d = decide(env.policy(), env.req(args=("ABC", "abcdefghij"), env={"OTHER": "1"}))
    assert {"arg-pattern", "arg-too-long", "env-not-allowed"} <= rules(d)
    assert isinstance(d.error(), PermissionDenied)


@pytest.mark.parametrize(
    ("kinds", "cls"),
    [
        ([Kind.NOT_FOUND], NotFound),
        ([Kind.INVALID_ARGUMENT, Kind.INVALID_ARGUMENT], InvalidArgument),
        ([Kind.FAILED_PRECONDITION], FailedPrecondition),
        ([Kind.PERMISSION_DENIED], PermissionDenied),
        ([Kind.NOT_FOUND, Kind.INVALID_ARGUMENT], PermissionDenied),
        ([Kind.NOT_FOUND, Kind.PERMISSION_DENIED], PermissionDenied),
    ],
)
def test_decision_error_kind(kinds: list[Kind], cls: type) -> None:
    """One shared kind gives that status; any mix is PERMISSION_DENIED."""
    d = Decision(None, tuple(Denial("e", f"r{i}", "m", k) for i, k in enumerate(kinds)))
    err = d.error()
    assert type(err) is cls
    assert err.rule == ",".join(sorted(f"r{i}" for i in range(len(kinds))))


# ---------------------------------------------------------------- decide never raises

_PIECES = [
    "/",
    "//",
    "/./",
    "/../",
    "..",
    ".",
    "\x00",
    "\x1b",
    "\u202e",
    "\u200d",
    "\uff0f",
    "\u0430",
    "\u0301",
    "\n",
    "*",
    "?",
    "[",
    "ok.sh",
    "evil.sh",
    "scripts",
    "outside",
    "x" * 300,
]


@st.composite
def _paths(draw: st.DrawFn, e: Env) -> str:
    anchor = draw(
        st.sampled_from(
            [str(e.scripts), str(e.outside), str(e.dir), "/", "", "/etc", "/dev/null", "/proc/self"]
        )
    )
    parts = draw(st.lists(st.one_of(st.sampled_from(_PIECES), st.text(max_size=5)), max_size=5))
    return anchor + "".join(parts)


@pytest.mark.slow
@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_decide_never_raises_and_only_allows_what_is_allowed(env: Env, data: st.DataObject) -> None:
    """Any request: a Decision (never an exception); allowed only for files in the allowed place."""
    p = env.policy()
    command = data.draw(
        st.one_of(st.sampled_from(["sh", "/bin/sh", "tool", "echo", ""]), st.text(max_size=10))
    )
    req = JobRequest(
        command=command,
        path=data.draw(_paths(env)),
        args=tuple(
            data.draw(
                st.lists(
                    st.one_of(st.sampled_from(["abc", "A", "\x00"]), st.text(max_size=10)),
                    max_size=4,
                )
            )
        ),
        env=data.draw(
            st.dictionaries(
                st.sampled_from(["GOOD", "OTHER", "LD_PRELOAD", "1X", "GOOD\n", ""]),
                st.text(max_size=3),
                max_size=2,
            )
        ),
        identity=data.draw(st.sampled_from(["client", "ops"])),
    )
    d = decide(p, req)
    if d.allowed:
        assert d.plan is not None
        if d.plan.script is not None:
            assert d.plan.script.startswith(str(env.scripts) + "/")
            assert os.path.realpath(req.path) == d.plan.script
        else:
            assert d.plan.executable in (str(env.tool), os.path.realpath("/bin/echo"))
    else:
        err = d.error()
        assert err.message.startswith("not started: ") and err.rule
        if any(c in req.command + req.path for c in "\x00\x1b\u202e\u200d\n"):
            assert isinstance(err, InvalidArgument), err.message


# ---------------------------------------------------------------- loading


GOOD_ENTRY = """  - name: good
    command: /bin/true
"""


def _entry(e: Env, body: str) -> str:
    return (
        "version: 1\nentries:\n"
        + GOOD_ENTRY
        + body.format(dir=e.dir, tool=e.tool, scripts=e.scripts)
    )


# (name, second entry, expected fragment) -- every error names entry #2 ('bad')
ENTRY_ERRORS = [
    ("unknown-key", "  - name: bad\n    comand: /bin/true\n", "unknown key(s): comand"),
    (
        "unknown-args-key",
        "  - name: bad\n    command: /bin/true\n    args: {{max: 1}}\n",
        "args: unknown key(s): max",
    ),
    (
        "unknown-script-key",
        "  - name: bad\n    command: /bin/sh\n    scripts: [{{path: /x.sh, shasum: x}}]\n",
        "scripts: unknown key(s): shasum",
    ),
    ("duplicate-name", "  - name: good\n    command: /bin/echo\n", "duplicate entry name"),
    ("missing-command", "  - name: bad\n", "command: required"),
    ("relative-command", "  - name: bad\n    command: bin/true\n", "an absolute path"),
    ("bare-command", "  - name: bad\n    command: 'true'\n", "nothing is looked up in PATH"),
    (
        "non-canonical-command",
        "  - name: bad\n    command: /bin/../bin/true\n",
        "not in canonical form",
    ),
    ("nul-in-command", '  - name: bad\n    command: "/bin/tr\\0ue"\n', "NUL"),
    (
        "missing-command-file",
        "  - name: bad\n    command: /nonexistent/prog\n",
        "/nonexistent/prog",
    ),
    ("directory-command", "  - name: bad\n    command: /usr\n", "not a regular file"),
    (
        "args-not-mapping",
        "  - name: bad\n    command: /bin/true\n    args: [1, 2]\n",
        "args: must be a mapping",
    ),
    (
        "bad-regex",
        "  - name: bad\n    command: /bin/true\n    args: {{patterns: ['(']}}\n",
        "not a valid regular expression",
    ),
    (
        "max-count-range",
        "  - name: bad\n    command: /bin/true\n    args: {{max_count: 5000}}\n",
        "max_count",
    ),
    (
        "max-count-bool",
        "  - name: bad\n    command: /bin/true\n    args: {{max_count: true}}\n",
        "max_count",
    ),
    (
        "max-length-negative",
        "  - name: bad\n    command: /bin/true\n    args: {{max_length: -1}}\n",
        "max_length",
    ),
    ("bad-sha256", "  - name: bad\n    command: /bin/true\n    sha256: xyz\n", "sha256"),
    ("sha256-not-a-string", "  - name: bad\n    command: /bin/true\n    sha256: 1234\n", "sha256"),
    (
        "uppercase-sha256",
        f'  - name: bad\n    command: /bin/true\n    sha256: "{"A" * 64}"\n',
        "sha256",
    ),
    (
        "sha256-trailing-newline",
        f'  - name: bad\n    command: /bin/true\n    sha256: "{"a" * 64}\\n"\n',
        "sha256",
    ),
    (
        "bad-script-sha256",
        "  - name: bad\n    command: /bin/sh\n    scripts: [{{path: /x/y.sh, sha256: nope}}]\n",
        "sha256",
    ),
    (
        "sha256-on-directory",
        "  - name: bad\n    command: /bin/sh\n"
        f'    scripts: [{{{{path: /x/, sha256: "{"a" * 64}"}}}}]\n',
        "needs the path of one file",
    ),
    (
        "empty-identities",
        "  - name: bad\n    command: /bin/true\n    identities: []\n",
        "would allow nobody",
    ),
    (
        "blank-identity",
        "  - name: bad\n    command: /bin/true\n    identities: ['']\n",
        "non-empty strings",
    ),
    (
        "identities-not-list",
        "  - name: bad\n    command: /bin/true\n    identities: ops\n",
        "must be a list",
    ),
    (
        "env-bad-name",
        "  - name: bad\n    command: /bin/true\n    env: ['1X']\n",
        "not a valid variable name",
    ),
    (
        "env-trailing-newline",
        '  - name: bad\n    command: /bin/true\n    env: ["FOO\\n"]\n',
        "not a valid variable name",
    ),
    (
        "empty-scripts",
        "  - name: bad\n    command: /bin/sh\n    scripts: []\n",
        "at least one location",
    ),
    (
        "script-dotdot",
        "  - name: bad\n    command: /bin/sh\n    scripts: ['{scripts}/../x.sh']\n",
        "'..'",
    ),
    (
        "script-everything",
        "  - name: bad\n    command: /bin/sh\n    scripts: ['/']\n",
        "every file on the machine",
    ),
    (
        "script-everything-glob",
        "  - name: bad\n    command: /bin/sh\n    scripts: ['/**']\n",
        "every file on the machine",
    ),
    (
        "script-unclosed-class",
        "  - name: bad\n    command: /bin/sh\n    scripts: ['/x/[a.sh']\n",
        "unclosed '['",
    ),
    (
        "script-not-a-path",
        "  - name: bad\n    command: /bin/sh\n    scripts: [5]\n",
        "must be a path",
    ),
    (
        "alias-with-slash",
        "  - name: bad\n    command: /bin/true\n    aliases: ['bin/true']\n",
        "plain name",
    ),
    (
        "cwd-relative",
        "  - name: bad\n    command: /bin/true\n    cwd: tests\n",
        "cwd: must be an absolute path",
    ),
    ("cwd-missing", "  - name: bad\n    command: /bin/true\n    cwd: /nonexistent-dir\n", "cwd"),
]
DANGEROUS = [
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "LD_AUDIT",
    "BASH_ENV",
    "ENV",
    "SHELLOPTS",
    "PS4",
    "IFS",
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "PYTHONHOME",
    "PERL5LIB",
    "PERL5OPT",
    "RUBYOPT",
    "NODE_OPTIONS",
    "GCONV_PATH",
    "GLIBC_TUNABLES",
    "MALLOC_CHECK_",
    "TMPDIR",
    "PATH",
    "HOME",
    "SHELL",
    "USER",
    "LOGNAME",
    "AGENT_JOB_ID",
]


@pytest.mark.parametrize(
    ("body", "fragment"), [pytest.param(b, f, id=n) for n, b, f in ENTRY_ERRORS]
)
def test_invalid_entry_is_refused_naming_it(env: Env, body: str, fragment: str) -> None:
    """Each invalid entry is refused with a message naming the file, the entry and the problem."""
    with pytest.raises(PolicyError) as e:
        parse(_entry(env, body), "my-policy.yaml")
    msg = str(e.value)
    assert msg.startswith("my-policy.yaml: entry #2"), msg
    assert "('bad')" in msg or "('good')" in msg or "entry #2:" in msg, msg
    assert fragment in msg, msg


@pytest.mark.parametrize("name", DANGEROUS)
def test_dangerous_environment_names_are_refused(env: Env, name: str) -> None:
    """A policy may not let callers set loader/shell/interpreter variables."""
    body = f"  - name: bad\n    command: /bin/true\n    env: [{name}]\n"
    with pytest.raises(PolicyError, match=r"entry #2 \('bad'\): env: .* may not be set"):
        parse(_entry(env, body), "p.yaml")


@pytest.mark.parametrize(
    ("mode", "fragment"),
    [
        (0o757, "writable by group or others"),
        (0o775, "writable by group or others"),
        (0o4755, "set-uid"),
        (0o644, "not executable"),
    ],
)
def test_unsafe_command_file_is_refused_at_load(env: Env, mode: int, fragment: str) -> None:
    """A world/group-writable, set-uid or non-executable program is refused when loading."""
    os.chmod(env.tool, mode)
    with pytest.raises(PolicyError, match=r"entry #2 \('bad'\): command: .*" + fragment):
        parse(_entry(env, "  - name: bad\n    command: {tool}\n"), "p.yaml")


def test_command_in_writable_directory_is_refused_at_load(env: Env) -> None:
    """A program whose directory others can write is refused when loading."""
    os.chmod(env.tool.parent, 0o777)
    with pytest.raises(PolicyError, match=r"entry #2 \('bad'\): command: directory .* writable"):
        parse(_entry(env, "  - name: bad\n    command: {tool}\n"), "p.yaml")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("version: 1\nentries: [\n", "not valid YAML"),
        ("version: 1\nentries:\n  - name: a\n   command: x\n", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping"),
        ("", "expected a mapping"),
        ("version: 1\nentries: []\nextra: 1\n", "unknown top-level key(s): extra"),
        ("version: 2\nentries: []\n", "version: must be 1"),
        ("entries: []\n", "version: must be 1"),
        ("version: 1\nentries: {a: 1}\n", "entries: must be a list"),
        ("version: 1\nentries:\n  - just a string\n", "entry #1: must be a mapping"),
        ("version: 1\nentries:\n  - name: 'bad name!'\n    command: /bin/true\n", "name:"),
        ("version: 1\nentries:\n  - name: 123\n    command: /bin/true\n", "quote it"),
        ('version: 1\nentries:\n  - name: "bad\\n"\n    command: /bin/true\n', "name:"),
        ("version: 1\nentries:\n  - !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ],
)
def test_malformed_policy_file_is_refused(text: str, fragment: str) -> None:
    """Bad YAML, a wrong shape, unknown keys, bad names and YAML tags: refused, never executed."""
    with pytest.raises(PolicyError) as e:
        parse(text, "p.yaml")
    assert str(e.value).startswith("p.yaml: ") and fragment in str(e.value), str(e.value)


def test_relative_script_locations_need_a_base(env: Env) -> None:
    """Relative script places resolve against the policy file's folder, never the cwd."""
    body = "  - name: rel\n    command: /bin/sh\n    scripts: ['scripts/*.sh']\n"
    with pytest.raises(PolicyError, match="must be a path"):
        parse(_entry(env, body), "p.yaml")
    (env.dir / "p.yaml").write_text(_entry(env, body))
    p = load(env.dir / "p.yaml")
    assert decide(p, JobRequest("/bin/sh", str(env.ok), identity="c")).allowed


def test_load_reports_missing_and_undecodable_files(env: Env) -> None:
    """load(): a missing file and a non-UTF-8 file are PolicyErrors naming the file."""
    with pytest.raises(PolicyError, match=r"nope\.yaml: no such file"):
        load(env.dir / "nope.yaml")
    bad = env.dir / "bad.yaml"
    bad.write_bytes(b"version: 1\nentries: []\n# \xff\xfe\n")
    with pytest.raises(PolicyError, match=r"bad\.yaml: cannot read"):
        load(bad)


def test_policy_with_no_entries_denies_everything(env: Env) -> None:
    """An empty policy is valid and allows nothing."""
    p = parse("version: 1\nentries:\n", "p.yaml")
    assert rules(decide(p, JobRequest("/bin/true", "", identity="c"))) == {"command-not-allowed"}


def test_modes_are_those_the_cases_assume(env: Env) -> None:
    """Sanity: the fixture's folders are StrictModes-safe (so every case isolates one rule)."""
    for d in (env.dir, env.scripts, env.outside, env.tool.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755


# ---------------------------------------------------------------- sticky ancestors, reachability


@pytest.fixture
def sticky_dir() -> Iterator[Path]:
    """A root-owned (or own-user-owned) sticky world-writable directory, like /tmp."""
    base = make_safe_dir()
    d = base / "sticky"
    d.mkdir()
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(base, ignore_errors=True)


def _script_in(parent: Path) -> Path:
    sub = parent / "checkout"
    sub.mkdir(mode=0o755)
    os.chmod(sub, 0o755)
    f = sub / "job.sh"
    f.write_text("#!/bin/bash\necho hi\n")
    os.chmod(f, 0o644)
    return f


def test_sticky_ancestor_of_a_trusted_entry_is_accepted(sticky_dir: Path) -> None:
    """A trusted-owner sticky directory (/tmp) is a safe ancestor of a trusted-owner entry."""
    assert trust.trusted_file_problems(str(_script_in(sticky_dir)), want_exec=False) == []


def test_sticky_ancestor_of_an_untrusted_entry_is_refused(sticky_dir: Path) -> None:
    """Below a sticky directory, an entry owned by someone else is still refused."""
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    f = _script_in(sticky_dir)
    os.chown(f.parent, 12345, 12345)
    problems = trust.trusted_file_problems(str(f), want_exec=False)
    assert any("writable by group or others" in p for p in problems)
    assert any("owned by uid 12345" in p for p in problems)


def test_world_writable_ancestor_without_sticky_bit_is_refused(sticky_dir: Path) -> None:
    """Without the sticky bit a world-writable ancestor is refused as before."""
    os.chmod(sticky_dir, 0o777)
    problems = trust.trusted_file_problems(str(_script_in(sticky_dir)), want_exec=False)
    assert problems and "writable by group or others (mode 0777)" in problems[0]


def test_sticky_ancestor_owned_by_an_untrusted_user_is_refused(sticky_dir: Path) -> None:
    """A sticky directory owned by an untrusted user is refused (its owner may rename entries)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    os.chown(sticky_dir, 12345, 12345)
    problems = trust.trusted_file_problems(str(_script_in(sticky_dir)), want_exec=False)
    assert any("writable by group or others" in p for p in problems)


def _policy_with_script_location(loc: Path) -> Path:
    p = loc.parent / "policy.yaml"
    p.write_text(
        f"version: 1\nentries:\n  - name: scripts\n    command: /bin/bash\n    scripts: ['{loc}']\n"
    )
    return p


@pytest.mark.skipif(not IS_ROOT, reason="jobs run as another user only when the agent is root")
def test_policy_load_refuses_a_location_the_job_user_cannot_reach() -> None:
    """A script location the job user cannot search fails at load, naming the entry and dir."""
    d = make_safe_dir()
    try:
        f = _script_in(d)
        os.chmod(f.parent, 0o700)
        pf = _policy_with_script_location(f.parent / "*.sh")
        nobody = policyfile.Reader(uid=65534, gid=65534, name="nobody")
        with pytest.raises(PolicyError) as e:
            policyfile.load(pf, reader=nobody)
        msg = str(e.value)
        assert "entry #1 ('scripts')" in msg
        assert f"the job user 'nobody' cannot search directory {f.parent}" in msg
        assert "\n" not in msg
        os.chmod(f.parent, 0o755)
        os.chmod(f, 0o600)
        with pytest.raises(PolicyError, match=f"cannot read file {f}"):
            policyfile.load(pf, reader=nobody)
        os.chmod(f, 0o644)
        assert policyfile.load(pf, reader=nobody).entries
        assert policyfile.load(pf).entries  # without a reader: no reachability check
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_reachability_uses_owner_then_group_then_other_bits() -> None:
    """The check follows the kernel's classes: owner bits, else group, else other."""
    st_ = os.stat_result((0o40710, 0, 0, 0, 100, 200, 0, 0, 0, 0))
    assert policyfile._may(st_, policyfile.Reader(100, 1, "u"), 1)
    assert policyfile._may(st_, policyfile.Reader(101, 200, "g"), 1)
    assert not policyfile._may(st_, policyfile.Reader(101, 201, "o"), 1)
    assert policyfile._may(st_, policyfile.Reader(101, 201, "s", frozenset({200})), 1)


# ---------------------------------------------------------------- confinement keys (issue 14)

_T = "  - name: bad\n    command: /bin/true\n"
CONFINEMENT_ERRORS = [
    ("landlock-not-mapping", _T + "    landlock: [x]\n", "landlock: must be a mapping"),
    (
        "landlock-unknown",
        _T + "    landlock:\n      reed: [/x]\n",
        "landlock: unknown key(s): reed",
    ),
    (
        "landlock-relative",
        _T + "    landlock:\n      read: [etc]\n",
        "landlock: read: 'etc' is not",
    ),
    ("landlock-dotdot", _T + "    landlock:\n      write: [/a/../b]\n", "landlock: write:"),
    ("landlock-write-root", _T + "    landlock:\n      write: [/]\n", "write everywhere"),
    (
        "landlock-port-range",
        _T + "    landlock:\n      connect_tcp: [70000]\n",
        "connect_tcp: must",
    ),
    ("landlock-port-type", _T + "    landlock:\n      bind_tcp: ['80']\n", "bind_tcp: must"),
    ("landlock-port-word", _T + "    landlock:\n      bind_tcp: all\n", "bind_tcp: must be a list"),
    ("landlock-scope-type", _T + "    landlock:\n      scope_signals: 1\n", "scope_signals: must"),
    ("user-missing", _T + "    user: no-such-user-xyz\n", "user: no such user"),
    ("user-type", _T + "    user: 5\n", "user: must be a user name"),
    ("root-needs-allow", _T + "    user: root\n", "set allow_root: true"),
    ("allow-root-not-root", _T + "    user: nobody\n    allow_root: true\n", "allow_root: only"),
    ("group-needs-user", _T + "    group: nogroup\n", "group: needs user"),
    ("group-missing", _T + "    user: nobody\n    group: no-such-group-xyz\n", "no such group"),
    ("cap-unknown", _T + "    user: nobody\n    capabilities: [CAP_FLY]\n", "unknown capability"),
    (
        "cap-forbidden",
        _T + "    user: nobody\n    capabilities: [CAP_SYS_ADMIN]\n",
        "CAP_SYS_ADMIN is refused",
    ),
    ("cap-needs-user", _T + "    capabilities: [CAP_KILL]\n", "capabilities: needs user"),
    ("nnp-type", _T + "    no_new_privs: no-thanks\n", "no_new_privs: must be true or false"),
    (
        "nnp-not-root",
        _T + "    user: nobody\n    no_new_privs: false\n",
        "only possible for a root",
    ),
]


@pytest.mark.parametrize(
    ("body", "fragment"), [pytest.param(b, f, id=n) for n, b, f in CONFINEMENT_ERRORS]
)
def test_invalid_confinement_key_is_refused_naming_it(env: Env, body: str, fragment: str) -> None:
    """Each invalid confinement key is refused with one line naming file, entry and key."""
    with pytest.raises(PolicyError) as e:
        parse(_entry(env, body), "my-policy.yaml")
    msg = str(e.value)
    assert msg.startswith("my-policy.yaml: entry #2 ('bad'): ") and "\n" not in msg, msg
    assert fragment in msg, msg


def test_confinement_defaults_cover_the_os_the_program_and_its_scripts(env: Env) -> None:
    """Without the new keys: the OS tree, the program and the script folder are readable,
    the standard devices writable, no TCP at all, signals and abstract sockets scoped."""
    body = "  - name: sh\n    command: /bin/sh\n    scripts: ['{scripts}/*.sh']\n"
    p = parse(_entry(env, body), "p.yaml")
    spec = p.entries[1].confinement.landlock
    assert spec is not None
    assert set(policy.DEFAULT_READ_EXEC) <= set(spec.read_exec)
    assert str(env.scripts) in spec.read_exec and os.path.realpath("/bin/sh") in spec.read_exec
    assert "/dev/null" in spec.write and "/tmp" not in spec.write
    assert spec.connect_tcp == () and spec.bind_tcp == ()
    assert spec.scope_signals and spec.scope_abstract_unix
    assert p.entries[0].confinement.uid is None and p.entries[0].confinement.capabilities == ()


def test_confinement_keys_reach_the_plan(env: Env) -> None:
    """The entry's paths, ports, user and capabilities end up in its plan, as given."""
    body = (
        "  - name: net\n    command: /bin/true\n    aliases: [nt]\n"
        "    landlock:\n      read: [/srv]\n      write: [/var/cache/x/]\n"
        "      connect_tcp: any\n      bind_tcp: [8080, 80, 80]\n"
        "      scope_signals: false\n      defaults: false\n"
        "    user: nobody\n    capabilities: [net_bind_service]\n"
    )
    p = parse(_entry(env, body), "p.yaml")
    d = decide(p, JobRequest("nt", "", identity="c"))
    assert d.plan is not None and d.plan.confinement is not None
    c = d.plan.confinement
    assert c.landlock is not None
    assert c.landlock.read == ("/srv",) and c.landlock.write == ("/var/cache/x",)
    assert "/usr" not in c.landlock.read_exec and "/usr/bin/true" in c.landlock.read_exec
    assert c.landlock.connect_tcp is None and c.landlock.bind_tcp == (80, 8080)
    assert not c.landlock.scope_signals and c.landlock.scope_abstract_unix
    assert c.user == "nobody" and c.uid == 65534 and c.capabilities == (10,)
    d.plan.close()


def test_root_entry_with_explicit_allow_has_no_capabilities_by_default(env: Env) -> None:
    """user: root needs allow_root, and then keeps no capability it does not list."""
    body = "  - name: r\n    command: /bin/true\n    user: root\n    allow_root: true\n"
    c = parse(_entry(env, body), "p.yaml").entries[1].confinement
    assert c.uid == 0 and c.allow_root and c.capabilities == () and c.no_new_privs


def _canonical_uuid(value: str) -> bool:
    """The definition job_id's regex stands for: uuid.UUID gives the string back unchanged."""
    import uuid

    try:
        return str(uuid.UUID(value)) == value
    except (ValueError, TypeError):
        return False


_HEX = "0123456789abcdefABCDEF"


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.uuids().map(str),
        st.uuids().map(lambda u: str(u).upper()),
        st.uuids().map(lambda u: u.hex),
        st.uuids().map(lambda u: "{" + str(u) + "}"),
        st.uuids().map(lambda u: "urn:uuid:" + str(u)),
        st.uuids().map(lambda u: str(u) + "\n"),
        st.text(alphabet=_HEX + "-{}:\n x", min_size=30, max_size=40),
        st.text(max_size=40),
    )
)
def test_job_id_accepts_exactly_the_canonical_uuids(value: str) -> None:
    """validation.job_id (a regex) accepts what uuid.UUID round-trips, and nothing else."""
    try:
        ok = validation.job_id(value) == value
    except InvalidArgument:
        ok = False
    assert ok == _canonical_uuid(value)


class _CountingFS(RealFileSystem):
    def __init__(self) -> None:
        self.realpaths = 0

    def realpath(self, path: str) -> str:
        self.realpaths += 1
        return super().realpath(path)


def test_a_plain_program_skips_the_realpath_walk_and_a_linked_one_does_not(env: Env) -> None:
    """A program whose path passes every check as named (each component lstat'd: folders,
    then a regular file; no link anywhere) is its own canonical path: no realpath walk. A
    link on the path (the program's or a folder's) takes the full sequence, denied
    "command-moved"."""
    p = env.policy()
    fs = _CountingFS()
    req = env.req(command="tool", path="a", args=(), env={})
    d = decide(p, req, fs=fs)
    assert d.allowed and fs.realpaths == 0, d
    _command_dir_moved(env)
    fs = _CountingFS()
    d = decide(p, req, fs=fs)
    assert not d.allowed and fs.realpaths == 1
    assert [x.rule for x in d.denials] == ["command-moved"]
