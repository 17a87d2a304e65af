"""The whitelist policy: what may run, for whom, with which arguments.

The policy's data (frozen :class:`Policy`, its :class:`Entry` rules) and the decision:
:func:`decide` takes the policy, a :class:`JobRequest` (plain data) and a file-system
view, and returns a :class:`Decision`: either a :class:`Plan` (exactly what to execute)
or every reason it was denied. It fails closed: anything it does not positively allow
is denied, and any unexpected condition is a denial, not an exception. Reading the YAML
file into that data is the other half, :mod:`agent.keeper.policyfile`.

The file checks follow OpenSSH's StrictModes: the program, the script and
every directory above them must be owned by root or the agent's own user and
must not be writable by group or others. That rule is what makes checking
a path and then executing it safe: the only users who could swap the file in
between are ones who could replace the agent itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.keeper.errors import (
    AgentError,
    FailedPrecondition,
    InvalidArgument,
    Kind,
    NotFound,
    PermissionDenied,
    agent_condition,
)
from agent.keeper.filetrust import (
    BINPRM_BUF_SIZE,
    ELF_MAGIC,
    SCRIPT_FD_PATH,
    DigestMismatch,
    FileSystem,
    RealFileSystem,
    check_file,
    read_head,
    resolve_trusted,
    sealed_copy,
)
from agent.keeper.landlock import LandlockSpec
from agent.keeper.seccomp import SeccompSpec
from agent.keeper.validation import (
    MAX_PATH_BYTES,
    text_problem,
    validate_request,
)

DEFAULT_MAX_ARGS = 32
DEFAULT_MAX_ARG_LENGTH = 4096

# What every job may read and execute unless its entry says otherwise: the OS tree.
# The agent's own files are carved out of these by the spawner (hole punching), so an
# agent installed under /etc or /usr stays out of reach too.
DEFAULT_READ_EXEC = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# Read only: process information (another process's /proc files stay behind ptrace
# checks, which Landlock tightens to the job's own domain) and the entropy devices.
DEFAULT_READ = ("/proc", "/dev/random", "/dev/urandom")
# Written by every job besides its scratch directory: the harmless standard devices.
DEFAULT_WRITE = ("/dev/null", "/dev/zero", "/dev/full", "/dev/tty")


class PolicyError(Exception):
    """The policy file is invalid; ``str(err)`` names the file and the entry."""


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class ArgRules:
    """Limits on a request's arguments for one entry."""

    max_count: int = DEFAULT_MAX_ARGS
    max_length: int = DEFAULT_MAX_ARG_LENGTH
    patterns: tuple[re.Pattern[str], ...] = ()


@dataclass(frozen=True)
class ScriptRule:
    """Where an interpreter's scripts may come from."""

    written: str  # as in the policy file, for messages
    regexes: tuple[re.Pattern[str], ...]  # the written and the canonical form
    sha256: str | None = None

    def matches(self, path: str) -> bool:
        """True when ``path`` is covered by this rule."""
        return any(r.fullmatch(path) for r in self.regexes)


@dataclass(frozen=True)
class Confinement:
    """How an entry's jobs are boxed: Landlock, identity, capabilities (see docs/security.md).

    ``landlock`` is the entry's spec; the start-up checks
    (:func:`agent.keeper.decision.confine_policy`) add the agent's deny list, check it
    against the kernel and set ``abi``. ``uid`` None keeps the configured job user.
    """

    landlock: LandlockSpec | None = field(
        default_factory=lambda: LandlockSpec(
            read_exec=DEFAULT_READ_EXEC, read=DEFAULT_READ, write=DEFAULT_WRITE
        )
    )
    # The Landlock ABI the spec was checked against at load (0: not checked, or no
    # Landlock in best-effort mode): the spawner prepares rulesets for this ABI.
    abi: int = 0
    user: str | None = None
    uid: int | None = None
    gid: int | None = None
    allow_root: bool = False
    capabilities: tuple[int, ...] = ()
    no_new_privs: bool = True
    # The entry's seccomp filter: UDP, allowed syscall groups, listen().
    # None: not enforced (no libseccomp or no kernel support, in best-effort mode).
    seccomp: SeccompSpec | None = field(default_factory=SeccompSpec)


@dataclass(frozen=True)
class Entry:
    """One allowed command (an executable, or an interpreter with scripts)."""

    name: str
    command: str  # canonical absolute path
    spellings: frozenset[str]  # command strings a caller may send
    scripts: tuple[ScriptRule, ...] | None  # None: an executable entry
    sha256: str | None
    identities: frozenset[str] | None  # None: any authorized identity
    args: ArgRules
    env: frozenset[str]
    cwd: str | None
    confinement: Confinement = field(default_factory=Confinement)

    @property
    def is_interpreter(self) -> bool:
        """Whether ``path`` names a script for this command."""
        return self.scripts is not None


@dataclass(frozen=True)
class Policy:
    """A validated policy: entries in file order; anything else is denied."""

    entries: tuple[Entry, ...]
    source: str = "<memory>"

    def candidates(self, command: str) -> list[Entry]:
        """Entries a request's ``command`` string refers to (no PATH lookup)."""
        return [e for e in self.entries if command in e.spellings]


@dataclass(frozen=True)
class JobRequest:
    """A start request as plain data (what the caller sent, plus who it is)."""

    command: str
    path: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    identity: str = ""


@dataclass(frozen=True)
class Plan:
    """Exactly what to execute, produced only by an allow decision."""

    entry: str
    executable: str  # canonical path of the program
    argv: tuple[str, ...]
    env: Mapping[str, str]  # caller-set variables the policy allowed
    cwd: str | None
    script: str | None  # canonical script path for interpreters
    # A sealed copy (memfd) of the program when its digest is pinned: the
    # spawner executes this descriptor, so what runs is exactly the bytes
    # that were hashed, whatever happens to the file on disk afterwards.
    exec_fd: int | None = None
    # A sealed copy of the script when the script is pinned: the spawner
    # makes it descriptor 3, and argv names SCRIPT_FD_PATH instead of the
    # script. The owner of the plan closes both descriptors.
    script_fd: int | None = None
    # The entry's confinement (Landlock spec, user, capabilities), None: the defaults.
    confinement: Confinement | None = None

    def close(self) -> None:
        """Close the plan's descriptors (after the spawn, or when it is abandoned)."""
        for fd in (self.exec_fd, self.script_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


@dataclass(frozen=True)
class Denial:
    """One reason a request was refused."""

    entry: str  # "" when no entry was involved
    rule: str  # stable rule name, also written to the audit log
    message: str
    kind: Kind = Kind.PERMISSION_DENIED

    def __str__(self) -> str:
        where = f"entry {self.entry!r}: " if self.entry else ""
        return f"{where}{self.message} [{self.rule}]"


@dataclass(frozen=True)
class Decision:
    """Either a plan (allowed) or the full list of denials."""

    plan: Plan | None
    denials: tuple[Denial, ...] = ()

    @property
    def allowed(self) -> bool:
        """True when the request may run."""
        return self.plan is not None

    def error(self) -> AgentError:
        """The error to answer a denied request with.

        The kind is the most specific one shared by the reasons: a request
        that is only wrong because its script is missing is NOT_FOUND, only
        because of its arguments' count or size INVALID_ARGUMENT, and so on;
        any mix, or any policy refusal, is PERMISSION_DENIED.
        """
        assert self.denials, "error() on an allowed decision"
        kinds = {d.kind for d in self.denials}
        kind = kinds.pop() if len(kinds) == 1 else Kind.PERMISSION_DENIED
        cls: type[AgentError] = {
            Kind.INVALID_ARGUMENT: InvalidArgument,
            Kind.NOT_FOUND: NotFound,
            Kind.FAILED_PRECONDITION: FailedPrecondition,
        }.get(kind, PermissionDenied)
        text = "; ".join(str(d) for d in self.denials)
        return cls(f"not started: {text}", rule=",".join(sorted({d.rule for d in self.denials})))


# ---------------------------------------------------------------- request validation


def lexical_path_problem(path: str) -> str | None:
    """Why ``path`` is not an absolute, already-normal path, or None."""
    if not path.startswith("/"):
        return f"{path!r} is not an absolute path"
    parts = path.split("/")[1:]
    if any(p in ("", ".", "..") for p in parts) and path != "/":
        return f"{path!r} is not in canonical form (no '//', '.' or '..' allowed)"
    return None


# ---------------------------------------------------------------- decision


def decide(
    policy: Policy,
    req: JobRequest,
    *,
    fs: FileSystem | None = None,
    owners: Iterable[int] | None = None,
) -> Decision:
    """Decide whether ``req`` may run, and how.

    ``owners`` are the uids that may own programs, scripts, ``#!``
    interpreters and the directories above them (default: root and the
    agent's effective uid). Never raises for any request: every problem
    becomes a :class:`Denial`. The caller must close the plan's
    descriptors (:meth:`Plan.close`) if the plan is not executed.
    """
    fs = fs or RealFileSystem()
    allowed_owners = frozenset(owners) if owners is not None else frozenset({0, os.geteuid()})
    malformed = [
        Denial("", rule, msg, Kind.INVALID_ARGUMENT) for rule, msg in validate_request(req)
    ]
    if malformed:
        return Decision(None, tuple(malformed))
    # Only the entries this identity may use take part: an entry restricted
    # to someone else must neither change the status code of the answer nor
    # show up (name, identities, rules) in its message. A caller who may
    # use none of them gets exactly the answer for an unknown command.
    candidates = [
        e
        for e in policy.candidates(req.command)
        if e.identities is None or req.identity in e.identities
    ]
    if not candidates:
        return Decision(
            None,
            (Denial("", "command-not-allowed", f"command {req.command!r} is not in the policy"),),
        )
    denials: list[Denial] = []
    for entry in candidates:
        try:
            result = _decide_entry(entry, req, fs, allowed_owners)
        except AgentError as e:
            if e.rule == "agent-resources":
                raise  # the agent's own condition, not this entry's: the caller retries
            result = [Denial(entry.name, e.rule or "internal-check-error", e.message, e.kind)]
        except Exception as e:  # fail closed on anything unexpected
            result = [
                Denial(
                    entry.name,
                    "internal-check-error",
                    f"check failed: {type(e).__name__}",
                    Kind.FAILED_PRECONDITION,
                )
            ]
        if isinstance(result, Plan):
            return Decision(result)
        denials.extend(result)
    return Decision(None, tuple(denials))


def _decide_entry(
    entry: Entry, req: JobRequest, fs: FileSystem, owners: frozenset[int]
) -> Plan | list[Denial]:
    out: list[Denial] = []

    def deny(rule: str, msg: str, kind: Kind = Kind.PERMISSION_DENIED) -> None:
        out.append(Denial(entry.name, rule, msg, kind))

    checked_args = (
        list(req.args)
        if entry.is_interpreter
        else (([req.path] if req.path else []) + list(req.args))
    )
    rules = entry.args
    if len(checked_args) > rules.max_count:
        deny(
            "too-many-args",
            f"{len(checked_args)} arguments, at most {rules.max_count}",
            Kind.INVALID_ARGUMENT,
        )
    for i, a in enumerate(checked_args):
        if len(a) > rules.max_length:
            deny(
                "arg-too-long",
                f"argument {i} is longer than {rules.max_length} characters",
                Kind.INVALID_ARGUMENT,
            )
        elif rules.patterns and not any(p.fullmatch(a) for p in rules.patterns):
            deny("arg-pattern", f"argument {i} does not match any allowed pattern")
    for k in req.env:
        if k not in entry.env:
            deny("env-not-allowed", f"environment variable {k} may not be set")

    script: str | None = None
    script_fd: int | None = None
    if entry.is_interpreter:
        script, script_fd = _check_script(entry, req.path, fs, owners, deny)
    if out:
        if script_fd is not None:
            os.close(script_fd)
        return out
    try:
        result = _program_plan(entry, req, fs, owners, deny, out, script, script_fd)
    except BaseException:
        if script_fd is not None:
            os.close(script_fd)
        raise
    if not isinstance(result, Plan) and script_fd is not None:
        os.close(script_fd)
    return result


def _plain_program(path: str, fs: FileSystem, owners: frozenset[int]) -> os.stat_result | None:
    """The program's stat when it passes every check as it is named, else None (then
    the full sequence runs, for its precise denial).

    check_file lstats every component and takes only directories and, last, a regular
    file: a lexically canonical path that passes names no link, so it is its own
    canonical path, and the realpath walk (the same lstats again, in Python: about 40 us
    of a start) is skipped."""
    if lexical_path_problem(path) is not None:
        return None
    failed: list[str] = []

    def note(rule: str, msg: str, kind: Kind = Kind.PERMISSION_DENIED) -> None:
        failed.append(rule)

    st = check_file(path, fs, owners, note, want_exec=True)
    return st if st is not None and not failed else None


def _program_plan(
    entry: Entry,
    req: JobRequest,
    fs: FileSystem,
    owners: frozenset[int],
    deny: Any,
    out: list[Denial],
    script: str | None,
    script_fd: int | None,
) -> Plan | list[Denial]:
    # The program itself, checked on every start: the policy was validated
    # at load time, but files change.
    prog = entry.command
    st = _plain_program(prog, fs, owners)
    if st is None:
        try:
            prog = fs.realpath(entry.command)
        except OSError:
            deny("command-missing", f"{entry.command} no longer exists", Kind.FAILED_PRECONDITION)
            return out
        if prog != entry.command:
            deny(
                "command-moved",
                f"{entry.command} now resolves to {prog}; reload the policy",
                Kind.FAILED_PRECONDITION,
            )
            return out
        st = check_file(prog, fs, owners, deny, want_exec=True)
    if st is None or out:
        return out
    fd = _open(prog, st, fs, deny)
    if fd is None:
        return out
    exec_fd: int | None = None
    try:
        if entry.sha256 is not None:
            exec_fd = _seal(prog, fd, {entry.sha256}, deny, executable=True)
            if exec_fd is None:
                return out
        # What the kernel will look at is the first bytes of what runs:
        # the sealed copy when pinned, else the verified open file.
        head = read_head(exec_fd if exec_fd is not None else fd)
    except OSError as e:
        if exec_fd is not None:
            os.close(exec_fd)
        deny("file-unreadable", f"{prog}: {e.strerror}", Kind.FAILED_PRECONDITION)
        return out
    finally:
        os.close(fd)
    try:
        ok = _check_exec_format(prog, head, fs, owners, deny)
    except BaseException:
        if exec_fd is not None:
            os.close(exec_fd)
        raise
    if not ok:
        if exec_fd is not None:
            os.close(exec_fd)
        return out
    argv: list[str] = [prog]
    if script is not None:
        # A pinned script is read by the interpreter from its sealed copy.
        argv.append(SCRIPT_FD_PATH if script_fd is not None else script)
    elif req.path:
        argv.append(req.path)
    argv.extend(req.args)
    return Plan(
        entry=entry.name,
        executable=prog,
        argv=tuple(argv),
        env={k: req.env[k] for k in req.env},
        cwd=entry.cwd,
        script=script,
        exec_fd=exec_fd,
        script_fd=script_fd,
        confinement=entry.confinement,
    )


def _check_exec_format(
    path: str, head: bytes, fs: FileSystem, owners: frozenset[int], deny: Any
) -> bool:
    """Whether the kernel would run ``path`` directly, by a trusted interpreter.

    An ELF binary runs as it is. A ``#!`` script runs its interpreter,
    which is code the request did not name, so it is held to the same
    trust rule as the program and must be an ELF binary itself (a nested
    ``#!`` would put yet another, unchecked file in the chain). Anything
    else the kernel refuses with ENOEXEC, and a fallback (execvp) would
    hand it to /bin/sh: refused here, before anything starts.
    """
    if head.startswith(ELF_MAGIC):
        return True
    if not head.startswith(b"#!"):
        deny(
            "not-executable-format",
            f"{path} is neither an ELF binary nor a #! script (the kernel would refuse it)",
            Kind.FAILED_PRECONDITION,
        )
        return False
    interp = _interpreter_line(path, head, deny)
    return interp is not None and _elf_interpreter(path, interp, fs, owners, deny)


def _interpreter_line(path: str, head: bytes, deny: Any) -> str | None:
    """The interpreter a ``#!`` line names, checked as a path (None: refused)."""
    nl = head.find(b"\n")
    if nl == -1 and len(head) >= BINPRM_BUF_SIZE:
        deny(
            "interpreter-line-too-long",
            f"{path}: the #! line is longer than {BINPRM_BUF_SIZE - 1} bytes",
            Kind.FAILED_PRECONDITION,
        )
        return None
    line = head[2 : nl if nl != -1 else len(head)].strip(b" \t")
    # The kernel splits the interpreter from its one optional argument at
    # the first space or tab.
    name = line.replace(b"\t", b" ").split(b" ", 1)[0]
    interp = os.fsdecode(name)
    if not interp:
        deny(
            "interpreter-missing",
            f"{path}: the #! line names no interpreter",
            Kind.FAILED_PRECONDITION,
        )
        return None
    problem = text_problem(interp, "interpreter", MAX_PATH_BYTES)
    if problem or not interp.startswith("/"):
        # A relative interpreter would be looked up in the job's cwd.
        deny(
            "interpreter-not-absolute",
            f"{path}: #! interpreter {interp!r} is not an absolute path"
            if not problem
            else f"{path}: #! {problem}",
        )
        return None
    return interp


def _elf_interpreter(
    path: str, interp: str, fs: FileSystem, owners: frozenset[int], deny: Any
) -> bool:
    """Whether a script's interpreter is a trusted ELF binary (the program's own rule)."""

    def ideny(rule: str, msg: str, kind: Kind = Kind.PERMISSION_DENIED) -> None:
        # A missing interpreter is the machine's state, not the caller's path.
        deny(
            f"interpreter-{rule}",
            f"#! interpreter of {path}: {msg}",
            Kind.FAILED_PRECONDITION if kind is Kind.NOT_FOUND else kind,
        )

    canonical = resolve_trusted(interp, fs, owners, ideny)
    if canonical is None:
        return False
    st = check_file(canonical, fs, owners, ideny, want_exec=True)
    if st is None:
        return False
    fd = _open(canonical, st, fs, ideny)
    if fd is None:
        return False
    try:
        ihead = read_head(fd)
    except OSError as e:
        ideny("file-unreadable", f"{canonical}: {e.strerror}", Kind.FAILED_PRECONDITION)
        return False
    finally:
        os.close(fd)
    if ihead.startswith(b"#!"):
        deny(
            "interpreter-nested-script",
            f"{path}: #! interpreter {interp} is itself a #! script; name the final "
            "interpreter (an ELF binary) on the #! line",
            Kind.FAILED_PRECONDITION,
        )
        return False
    if not ihead.startswith(ELF_MAGIC):
        deny(
            "interpreter-not-elf",
            f"{path}: #! interpreter {interp} is not an ELF binary",
            Kind.FAILED_PRECONDITION,
        )
        return False
    return True


def _check_script(
    entry: Entry, path: str, fs: FileSystem, owners: frozenset[int], deny: Any
) -> tuple[str | None, int | None]:
    """The canonical script and, when it is pinned, a sealed copy of it."""
    assert entry.scripts is not None
    if path == "":
        deny(
            "script-required", "path must name a script for this interpreter", Kind.INVALID_ARGUMENT
        )
        return None, None
    problem = lexical_path_problem(path)
    if problem:
        deny("script-path-not-canonical", problem)
        return None, None
    # Match the path as written before touching the file system, so a
    # caller cannot probe which files exist outside the allowed places.
    if not any(r.matches(path) for r in entry.scripts):
        deny("script-not-allowed", f"{path} is not under an allowed script location")
        return None, None
    try:
        canonical = fs.realpath(path)
    except FileNotFoundError:
        deny("script-missing", f"{path} does not exist", Kind.NOT_FOUND)
        return None, None
    except OSError as e:
        deny(
            "script-unreadable",
            f"{path}: {e.strerror or type(e).__name__}",
            Kind.FAILED_PRECONDITION,
        )
        return None, None
    rules = [r for r in entry.scripts if r.matches(canonical)]
    if not rules:
        deny(
            "script-symlink-escape",
            f"{path} resolves to {canonical}, outside the allowed script locations",
        )
        return None, None
    st = check_file(canonical, fs, owners, deny, want_exec=False)
    if st is None:
        return None, None
    pins = {r.sha256 for r in rules if r.sha256}
    if not pins:
        # The script is read by the interpreter as text: it is not parsed
        # here (its #! line is a comment to bash).
        return canonical, None
    fd = _open(canonical, st, fs, deny)
    if fd is None:
        return None, None
    try:
        sealed = _seal(canonical, fd, pins, deny, executable=False)
    finally:
        os.close(fd)
    if sealed is None:
        return None, None
    return canonical, sealed


def _open(path: str, st: os.stat_result, fs: FileSystem, deny: Any) -> int | None:
    """Open the checked file, making sure it is still the one that was checked."""
    try:
        return fs.open_verified(path, st)
    except OSError as e:
        if (cond := agent_condition(e)) is not None:
            raise cond from None  # the agent's descriptors, not a change of the file
        deny(
            "file-changed",
            f"{path} changed while being checked ({type(e).__name__})",
            Kind.FAILED_PRECONDITION,
        )
        return None


def _seal(path: str, fd: int, pins: set[str], deny: Any, *, executable: bool) -> int | None:
    """A sealed copy of the open file whose digest is one of ``pins``, or None."""
    try:
        return sealed_copy(
            fd, pins, name=os.path.basename(path)[:200] or "pinned", executable=executable
        )
    except DigestMismatch:
        deny("sha256-mismatch", f"{path} does not have the pinned sha256 digest")
    except OSError as e:
        if (cond := agent_condition(e)) is not None:
            raise cond from None
        deny(
            "file-unreadable", f"{path}: {e.strerror or type(e).__name__}", Kind.FAILED_PRECONDITION
        )
    return None


def redact_args(args: Sequence[str], secret: Iterable[int]) -> list[str]:
    """Arguments with the secret ones replaced by ``<secret>``."""
    hidden = set(secret)
    return ["<secret>" if i in hidden else a for i, a in enumerate(args)]
