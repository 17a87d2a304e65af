"""The whitelist policy: what may run, for whom, with which arguments.

Two halves:

* :func:`load` / :func:`parse` read the YAML policy file (``yaml.safe_load``)
  into frozen :class:`Policy` data, refusing any invalid entry with a
  :class:`PolicyError` that names it.
* :func:`decide` takes the policy, a :class:`JobRequest` (plain data) and a
  file-system view, and returns a :class:`Decision`: either a :class:`Plan`
  (exactly what to execute) or every reason it was denied. It fails closed:
  anything it does not positively allow is denied, and any unexpected
  condition is a denial, not an exception.

The file checks follow OpenSSH's StrictModes: the program, the script and
every directory above them must be owned by root or the agent's own user and
must not be writable by group or others. That rule is what makes checking
a path and then executing it safe: the only users who could swap the file in
between are ones who could replace the agent itself.
"""

from __future__ import annotations

import glob as glob_mod
import grp
import os
import pwd
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.daemon import capabilities
from agent.daemon.errors import (
    AgentError,
    FailedPrecondition,
    InvalidArgument,
    Kind,
    NotFound,
    PermissionDenied,
    agent_condition,
)
from agent.daemon.filetrust import (
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
from agent.daemon.landlock import LandlockSpec
from agent.daemon.seccomp import GROUPS as SYSCALL_GROUPS
from agent.daemon.seccomp import SeccompSpec
from agent.daemon.validation import (
    ENV_NAME,
    MAX_ARG_BYTES,
    MAX_ARGS,
    MAX_PATH_BYTES,
    text_problem,
    validate_request,
)

DEFAULT_MAX_ARGS = 32
DEFAULT_MAX_ARG_LENGTH = 4096

# Environment variables that change how a loader, shell or interpreter
# behaves before the job's own code runs. Letting a caller set them would
# let the caller choose the code that runs, so a policy may not allow them.
_DANGEROUS_ENV = re.compile(
    r"^(LD_\w*|BASH_ENV|ENV|BASH_FUNC_\w*|SHELLOPTS|BASHOPTS|PS4|IFS|CDPATH|GLOBIGNORE|"
    r"PROMPT_COMMAND|PYTHON\w*|PERL5?\w*|RUBY\w*|NODE_\w*|GCONV_PATH|LOCPATH|NLSPATH|"
    r"HOSTALIASES|RES_OPTIONS|MALLOC_\w*|GLIBC_TUNABLES|TMPDIR|PATH|HOME|SHELL|USER|LOGNAME|"
    r"AGENT_JOB_ID)$"
)
# What every job may read and execute unless its entry says otherwise: the OS tree.
# The agent's own files are carved out of these by the spawner (hole punching), so an
# agent installed under /etc or /usr stays out of reach too.
DEFAULT_READ_EXEC = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# Read only: process information (another process's /proc files stay behind ptrace
# checks, which Landlock tightens to the job's own domain) and the entropy devices.
DEFAULT_READ = ("/proc", "/dev/random", "/dev/urandom")
# Written by every job besides its scratch directory: the harmless standard devices.
DEFAULT_WRITE = ("/dev/null", "/dev/zero", "/dev/full", "/dev/tty")
_LANDLOCK_KEYS = {
    "read_exec",
    "read",
    "write",
    "connect_tcp",
    "bind_tcp",
    "scope_signals",
    "scope_abstract_unix",
    "defaults",
}
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_ENTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


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
    (:func:`agent.daemon.startup.confine_policy`) add the agent's deny list, check it
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


def _lexical_path_problem(path: str) -> str | None:
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
    problem = _lexical_path_problem(path)
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


# ---------------------------------------------------------------- loading


def load(
    path: str | Path, *, owners: Iterable[int] | None = None, reader: Reader | None = None
) -> Policy:
    """Read and validate a policy file; raise :class:`PolicyError` naming the entry.

    With ``reader`` (the job user), also refuse an entry whose program or
    script locations that user cannot reach (see :func:`check_reachable`).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(f"{p}: cannot read: {e}") from None
    pol = parse(text, str(p), owners=owners, base=p.resolve().parent)
    if reader is not None:
        check_reachable(pol, reader)
    return pol


# ---------------------------------------------------------------- reachability


@dataclass(frozen=True)
class Reader:
    """The user jobs run as, for the load-time reachability check.

    ``groups``: its supplementary groups (empty when the spawner switches
    users: it calls ``setgroups([])``).
    """

    uid: int
    gid: int
    name: str
    groups: frozenset[int] = frozenset()


# Files of one glob location checked for readability at load (the rest are
# checked by the kernel when they run); keeps a huge directory cheap.
_REACH_FILES_MAX = 256


def _may(st: os.stat_result, who: Reader, bits: int) -> bool:
    # The kernel's classic permission check (owner, else group, else other
    # class), without capabilities: root is never a Reader. POSIX ACLs are
    # not consulted; a location readable only through an ACL is refused
    # here, which is the safe side of a false answer.
    if st.st_uid == who.uid:
        m = st.st_mode >> 6
    elif st.st_gid == who.gid or st.st_gid in who.groups:
        m = st.st_mode >> 3
    else:
        m = st.st_mode
    return (m & bits) == bits


def _static_prefix(written: str) -> str:
    parts: list[str] = []
    for part in written.rstrip("/").split("/")[1:]:
        if _has_glob(part):
            break
        parts.append(part)
    return "/" + "/".join(parts)


def _reach_problem(path: str, who: Reader, *, leaf: int) -> str | None:
    """Why ``who`` cannot reach ``path`` (search every directory, ``leaf`` bits on
    the last one); None if it can or if the path does not exist yet."""
    try:
        canonical = os.path.realpath(path, strict=True)
    except OSError:
        return None  # missing: the start-time checks report it (NOT_FOUND)
    cur = "/"
    comps = [c for c in canonical.split("/") if c]
    for i in range(len(comps) + 1):
        if i:
            cur = os.path.join(cur, comps[i - 1])
        try:
            st = os.stat(cur)
        except OSError:
            return None
        last = i == len(comps)
        bits = leaf if last else 1
        if not _may(st, who, bits):
            isdir = os.path.isdir(cur)
            need = "search" if isdir else "execute" if bits == 1 else "read"
            return (
                f"the job user {who.name!r} cannot {need} {'directory' if isdir else 'file'} {cur} "
                f"(mode {st.st_mode & 0o7777:04o}, owner uid {st.st_uid}, gid {st.st_gid})"
            )
    return None


def check_reachable(policy: Policy, who: Reader) -> None:
    """Raise PolicyError naming the first entry whose program or script
    locations the job user cannot reach: otherwise every job of it would
    fail later with exit status 126 ("Permission denied") and no hint."""
    default = who
    for i, entry in enumerate(policy.entries, 1):
        label = f"{policy.source}: entry #{i} ({entry.name!r})"
        conf = entry.confinement
        if conf is not None and conf.uid is not None:
            # The entry names its own user: that is who must reach its files
            # (root reaches everything).
            if conf.uid == 0:
                continue
            gid = conf.gid if conf.gid is not None else conf.uid
            who = Reader(conf.uid, gid, conf.user or str(conf.uid))
        else:
            who = default
        problem = _reach_problem(entry.command, who, leaf=1)
        if problem:
            raise PolicyError(f"{label}: command: {problem}")
        for rule in entry.scripts or ():
            written = rule.written
            if written.endswith("/") or _has_glob(written):
                problem = _reach_problem(_static_prefix(written), who, leaf=1)
                if problem is None and not written.endswith("/") and "**" not in written:
                    for n, f in enumerate(sorted(glob_mod.glob(written))):
                        if n >= _REACH_FILES_MAX:
                            break
                        if os.path.isfile(f):
                            problem = _reach_problem(f, who, leaf=4)
                            if problem:
                                break
            else:
                problem = _reach_problem(written, who, leaf=4)
            if problem:
                raise PolicyError(f"{label}: scripts: {written}: {problem}")


_ENTRY_KEYS = {
    "name",
    "command",
    "aliases",
    "scripts",
    "sha256",
    "identities",
    "args",
    "env",
    "cwd",
    "landlock",
    "user",
    "group",
    "allow_root",
    "capabilities",
    "no_new_privs",
    "udp",
    "syscalls",
}
_SYSCALLS_KEYS = {"allow"}
_ARGS_KEYS = {"max_count", "max_length", "patterns"}


def parse(
    text: str,
    source: str = "<policy>",
    *,
    owners: Iterable[int] | None = None,
    base: Path | None = None,
) -> Policy:
    """Validate policy YAML text; ``source`` names it in errors.

    Relative script locations resolve against ``base`` (the policy file's
    folder); without a base they are refused.
    """
    # Imported here: the job keeper decides with this module but parses no policy
    # itself (its loader process does, see agent.daemon.decision), so yaml stays out
    # of its memory.
    import yaml

    allowed_owners = frozenset(owners) if owners is not None else frozenset({0, os.geteuid()})
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PolicyError(f"{source}: not valid YAML: {_yaml_reason(e)}") from None
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: expected a mapping with 'version' and 'entries'")
    unknown = set(data) - {"version", "entries"}
    if unknown:
        keys = ", ".join(sorted(map(str, unknown)))
        raise PolicyError(f"{source}: unknown top-level key(s): {keys}")
    if data.get("version") != 1:
        raise PolicyError(f"{source}: version: must be 1")
    raw_entries = data.get("entries")
    if raw_entries is None:
        raw_entries = []
    if not isinstance(raw_entries, list):
        raise PolicyError(f"{source}: entries: must be a list")
    entries: list[Entry] = []
    names: set[str] = set()
    for i, raw in enumerate(raw_entries, 1):
        label = f"entry #{i}"
        if isinstance(raw, dict) and isinstance(raw.get("name"), str):
            label = f"entry #{i} ({raw['name']!r})"
        try:
            entry = _parse_entry(raw, allowed_owners, base)
        except _EntryError as e:
            raise PolicyError(f"{source}: {label}: {e}") from None
        if entry.name in names:
            raise PolicyError(f"{source}: {label}: name: duplicate entry name")
        names.add(entry.name)
        entries.append(entry)
    return Policy(entries=tuple(entries), source=source)


class _EntryError(Exception):
    pass


def _parse_entry(raw: Any, owners: frozenset[int], base: Path | None) -> Entry:
    if not isinstance(raw, dict):
        raise _EntryError("must be a mapping")
    unknown = set(raw) - _ENTRY_KEYS
    if unknown:
        raise _EntryError(f"unknown key(s): {', '.join(sorted(map(str, unknown)))}")
    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        raise _EntryError(
            f"name: must be a string, got {type(name).__name__} {name!r} (quote it in YAML)"
        )
    if not isinstance(name, str) or not _ENTRY_NAME.match(name):
        raise _EntryError("name: required; letters, digits, '.', '_' or '-', at most 64")
    command = raw.get("command")
    if not isinstance(command, str) or not command.startswith("/"):
        raise _EntryError("command: required; an absolute path (nothing is looked up in PATH)")
    problem = text_problem(command, "command", MAX_PATH_BYTES) or _lexical_path_problem(command)
    if problem:
        raise _EntryError(f"command: {problem}")
    try:
        canonical = os.path.realpath(command, strict=True)
    except OSError as e:
        raise _EntryError(f"command: {command}: {e.strerror or 'cannot resolve'}") from None
    problems: list[Denial] = []

    def collect(rule: str, msg: str, kind: Kind = Kind.PERMISSION_DENIED) -> None:
        problems.append(Denial("", rule, msg, kind))

    check_file(canonical, RealFileSystem(), owners, collect, want_exec=True)
    if problems:
        raise _EntryError(f"command: {'; '.join(d.message for d in problems)}")
    aliases = _str_list(raw.get("aliases", []), "aliases")
    for a in aliases:
        if "/" in a or not a or text_problem(a, "alias", 255):
            raise _EntryError(f"aliases: {a!r} must be a plain name without '/'")
    sha256 = _digest(raw.get("sha256"), "sha256")
    scripts: tuple[ScriptRule, ...] | None = None
    if "scripts" in raw:
        scripts = tuple(_parse_script_rule(s, base) for s in _list(raw["scripts"], "scripts"))
        if not scripts:
            raise _EntryError("scripts: must list at least one location")
    identities: frozenset[str] | None = None
    if "identities" in raw:
        identities = frozenset(_str_list(raw["identities"], "identities"))
        if not identities:
            raise _EntryError(
                "identities: an empty list would allow nobody; omit it to "
                "allow every authorized identity"
            )
    args = _parse_args(raw.get("args", {}))
    env = frozenset(_str_list(raw.get("env", []), "env"))
    for k in env:
        if not ENV_NAME.match(k):
            raise _EntryError(f"env: {k!r} is not a valid variable name")
        if _DANGEROUS_ENV.match(k):
            raise _EntryError(
                f"env: {k} may not be set by callers: it changes what code runs "
                "or how the job is isolated"
            )
    cwd = raw.get("cwd")
    if cwd is not None:
        if not isinstance(cwd, str) or not cwd.startswith("/"):
            raise _EntryError("cwd: must be an absolute path")
        if not os.path.isdir(cwd):
            raise _EntryError(f"cwd: {cwd} is not an existing directory")
    spellings = {command, canonical, *aliases}
    confinement = _parse_confinement(raw, canonical, scripts)
    return Entry(
        name=name,
        command=canonical,
        spellings=frozenset(spellings),
        scripts=scripts,
        sha256=sha256,
        identities=identities,
        args=args,
        env=env,
        cwd=cwd,
        confinement=confinement,
    )


def _ports(raw: Any, key: str) -> tuple[int, ...] | None:
    if raw == "any":
        return None
    items = _list(raw, f"landlock: {key}")
    if not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= 65535 for p in items):
        raise _EntryError(f'landlock: {key}: must be a list of TCP ports (0-65535) or "any"')
    return tuple(sorted(set(items)))


def _landlock_paths(raw: Any, key: str) -> tuple[str, ...]:
    out = []
    for p in _str_list(raw, f"landlock: {key}"):
        problem = _lexical_path_problem(p.rstrip("/") or "/") or text_problem(
            p, key, MAX_PATH_BYTES
        )
        if problem:
            raise _EntryError(f"landlock: {key}: {problem}")
        out.append(p.rstrip("/") or "/")
    return tuple(out)


def script_dirs(scripts: tuple[ScriptRule, ...] | None) -> tuple[str, ...]:
    """The directories a job must read its scripts from: each location's literal prefix."""
    dirs = []
    for rule in scripts or ():
        for form in {rule.written, _canonical_pattern(rule.written) or rule.written}:
            if rule.sha256 is not None:
                continue  # a pinned script is read from its sealed copy (fd 3)
            literal = []
            for part in form.split("/")[1:]:
                if _has_glob(part):
                    break
                literal.append(part)
            if not form.endswith("/") and len(literal) == len(form.split("/")) - 1:
                literal = literal[:-1]  # one file: its folder (it may be replaced in place)
            dirs.append("/" + "/".join(x for x in literal if x))
    return tuple(sorted(set(dirs)))


def _parse_confinement(
    raw: dict[str, Any], command: str, scripts: tuple[ScriptRule, ...] | None
) -> Confinement:
    spec = _parse_landlock(raw, command, scripts)
    user, uid, gid = _parse_user(raw)
    allow_root = raw.get("allow_root", False)
    if not isinstance(allow_root, bool):
        raise _EntryError("allow_root: must be true or false")
    if uid == 0 and not allow_root:
        raise _EntryError(f"user: {user!r} is root; set allow_root: true if that is intended")
    if allow_root and uid != 0:
        raise _EntryError("allow_root: only meaningful with a root user (user: root)")
    caps, problems = capabilities.parse_names(
        _str_list(raw.get("capabilities", []), "capabilities")
    )
    if problems:
        raise _EntryError(f"capabilities: {problems[0]}")
    if caps and user is None:
        raise _EntryError("capabilities: needs user (capabilities go to a named job user)")
    nnp = raw.get("no_new_privs", True)
    if not isinstance(nnp, bool):
        raise _EntryError("no_new_privs: must be true or false")
    if not nnp and uid != 0:
        raise _EntryError(
            "no_new_privs: false is only possible for a root job (user: root, allow_root: true)"
        )
    return Confinement(
        landlock=spec,
        user=user,
        uid=uid,
        gid=gid,
        allow_root=allow_root,
        capabilities=tuple(caps),
        no_new_privs=nnp,
        seccomp=_parse_seccomp(raw, spec.bind_tcp),
    )


def _parse_landlock(
    raw: dict[str, Any], command: str, scripts: tuple[ScriptRule, ...] | None
) -> LandlockSpec:
    ll = raw.get("landlock", {})
    if not isinstance(ll, dict):
        raise _EntryError("landlock: must be a mapping")
    unknown = set(ll) - _LANDLOCK_KEYS
    if unknown:
        raise _EntryError(f"landlock: unknown key(s): {', '.join(sorted(map(str, unknown)))}")
    for key in ("scope_signals", "scope_abstract_unix", "defaults"):
        if not isinstance(ll.get(key, True), bool):
            raise _EntryError(f"landlock: {key}: must be true or false")
    defaults = ll.get("defaults", True)
    read_exec = _landlock_paths(ll.get("read_exec", []), "read_exec")
    read = _landlock_paths(ll.get("read", []), "read")
    write = _landlock_paths(ll.get("write", []), "write")
    if "/" in write:
        raise _EntryError("landlock: write: '/' would let the job write everywhere")
    spec = LandlockSpec(
        # The program and its scripts are always readable: the job could not start else.
        read_exec=tuple(
            dict.fromkeys(
                (DEFAULT_READ_EXEC if defaults else ())
                + (command,)
                + script_dirs(scripts)
                + read_exec
            )
        ),
        read=tuple(dict.fromkeys((DEFAULT_READ if defaults else ()) + read)),
        write=tuple(dict.fromkeys((DEFAULT_WRITE if defaults else ()) + write)),
        connect_tcp=_ports(ll.get("connect_tcp", []), "connect_tcp"),
        bind_tcp=_ports(ll.get("bind_tcp", []), "bind_tcp"),
        scope_signals=ll.get("scope_signals", True),
        scope_abstract_unix=ll.get("scope_abstract_unix", True),
    )
    return spec


def _parse_user(raw: dict[str, Any]) -> tuple[str | None, int | None, int | None]:
    """The entry's fixed ``user:`` and ``group:`` as (name, uid, gid)."""
    user, group = raw.get("user"), raw.get("group")
    uid = gid = None
    if user is not None:
        if not isinstance(user, str) or not user:
            raise _EntryError("user: must be a user name")
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise _EntryError(f"user: no such user {user!r}") from None
        uid, gid = pw.pw_uid, pw.pw_gid
    if group is not None:
        if user is None:
            raise _EntryError("group: needs user (the group of the configured job user stays)")
        if not isinstance(group, str) or not group:
            raise _EntryError("group: must be a group name")
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise _EntryError(f"group: no such group {group!r}") from None
    return user, uid, gid


def _parse_seccomp(raw: dict[str, Any], bind_tcp: tuple[int, ...] | None) -> SeccompSpec:
    """The entry's `udp` and `syscalls` keys; listen() follows `landlock: bind_tcp`."""
    udp = raw.get("udp", False)
    if not isinstance(udp, bool):
        raise _EntryError("udp: must be true or false")
    sc = raw.get("syscalls", {})
    if not isinstance(sc, dict):
        raise _EntryError("syscalls: must be a mapping with `allow`")
    unknown = set(sc) - _SYSCALLS_KEYS
    if unknown:
        raise _EntryError(f"syscalls: unknown key(s): {', '.join(sorted(map(str, unknown)))}")
    allow = _str_list(sc.get("allow", []), "syscalls: allow")
    bad = [g for g in allow if g not in SYSCALL_GROUPS]
    if bad:
        raise _EntryError(
            f"syscalls: allow: unknown group(s) {', '.join(map(repr, bad))}; "
            f"known: {', '.join(SYSCALL_GROUPS)}"
        )
    # listen() only where the entry may bind (Landlock then picks the ports), and with
    # a list of ports never on an unbound socket (the spawner checks each listen()).
    listen = "any" if bind_tcp is None else "bound" if bind_tcp else "none"
    return SeccompSpec(udp=udp, allow=tuple(sorted(set(allow))), listen=listen)


def _parse_script_rule(raw: Any, base: Path | None) -> ScriptRule:
    sha: str | None = None
    if isinstance(raw, dict):
        unknown = set(raw) - {"path", "sha256"}
        if unknown:
            raise _EntryError(f"scripts: unknown key(s): {', '.join(sorted(map(str, unknown)))}")
        sha = _digest(raw.get("sha256"), "scripts: sha256")
        raw = raw.get("path")
    if (
        isinstance(raw, str)
        and raw
        and not raw.startswith("/")
        and base is not None
        and "\x00" not in raw
    ):
        trailing = raw.endswith("/")
        raw = str(base / raw).rstrip("/") + ("/" if trailing else "")
    if not isinstance(raw, str) or not raw.startswith("/"):
        raise _EntryError(
            f"scripts: {raw!r} must be a path (absolute, or relative to the "
            "policy file), a directory/ or a glob"
        )
    if "\x00" in raw or any(p in (".", "..") for p in raw.split("/")):
        raise _EntryError(f"scripts: {raw!r} must not contain '.' or '..' components")
    if raw == "/" or raw.startswith("/**"):
        raise _EntryError(f"scripts: {raw!r} would allow every file on the machine")
    if sha is not None and (raw.endswith("/") or _has_glob(raw)):
        raise _EntryError(f"scripts: {raw!r}: a sha256 pin needs the path of one file")
    forms = {raw}
    canonical = _canonical_pattern(raw)
    if canonical:
        forms.add(canonical)
    return ScriptRule(written=raw, regexes=tuple(_glob_regex(f) for f in sorted(forms)), sha256=sha)


def _digest(value: Any, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        # YAML reads an unquoted all-digit (or 12e34-like) digest as a number.
        raise _EntryError(
            f"{key}: must be a quoted string of 64 lowercase hex digits "
            f"(YAML read a {type(value).__name__})"
        )
    if not _HEX64.match(value):
        raise _EntryError(f"{key}: must be 64 lowercase hex digits")
    return value


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _canonical_pattern(pattern: str) -> str | None:
    """The pattern with its literal directory prefix resolved through symlinks."""
    parts = pattern.split("/")
    literal: list[str] = []
    for p in parts[1:]:
        if _has_glob(p):
            break
        literal.append(p)
    rest = parts[1 + len(literal) :]
    prefix = "/" + "/".join(x for x in literal if x)
    try:
        real = os.path.realpath(prefix, strict=True)
    except OSError:
        return None
    tail = "/".join(rest)
    out = real.rstrip("/") + ("/" + tail if tail else "")
    if pattern.endswith("/") and not out.endswith("/"):
        out += "/"
    return out


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a script location to a regex over canonical paths.

    ``dir/`` matches every file below dir; ``*`` and ``?`` stay inside one
    path component; ``**`` crosses components; ``[...]`` is a class.
    """
    if pattern.endswith("/"):
        return re.compile(re.escape(pattern) + r"[^\x00]+")
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**", i):
                out.append(r"[^\x00]*")
                i += 2
                continue
            out.append(r"[^/\x00]*")
        elif c == "?":
            out.append(r"[^/\x00]")
        elif c == "[":
            j = pattern.find("]", i + 2)
            if j == -1:
                raise _EntryError(f"scripts: {pattern!r}: unclosed '['")
            body = pattern[i + 1 : j]
            neg = body.startswith("!")
            if neg:
                body = body[1:]
            out.append("[" + ("^/" if neg else "") + body.replace("\\", "\\\\") + "]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def _parse_args(raw: Any) -> ArgRules:
    if not isinstance(raw, dict):
        raise _EntryError("args: must be a mapping")
    unknown = set(raw) - _ARGS_KEYS
    if unknown:
        raise _EntryError(f"args: unknown key(s): {', '.join(sorted(map(str, unknown)))}")
    max_count = raw.get("max_count", DEFAULT_MAX_ARGS)
    max_length = raw.get("max_length", DEFAULT_MAX_ARG_LENGTH)
    bounds = (("max_count", max_count, MAX_ARGS), ("max_length", max_length, MAX_ARG_BYTES))
    for key, v, hi in bounds:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
            raise _EntryError(f"args: {key}: must be an integer from 0 to {hi}")
    patterns = []
    for p in _str_list(raw.get("patterns", []), "args: patterns"):
        try:
            patterns.append(re.compile(p))
        except re.error as e:
            raise _EntryError(
                f"args: patterns: {p!r} is not a valid regular expression: {e}"
            ) from None
    return ArgRules(max_count=max_count, max_length=max_length, patterns=tuple(patterns))


def _list(raw: Any, key: str) -> list[Any]:
    if not isinstance(raw, list):
        raise _EntryError(f"{key}: must be a list")
    return raw


def _str_list(raw: Any, key: str) -> list[str]:
    items = _list(raw, key)
    if not all(isinstance(x, str) and x for x in items):
        raise _EntryError(f"{key}: must be a list of non-empty strings")
    return list(items)


def _yaml_reason(e: Exception) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    if mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(problem)


def redact_args(args: Sequence[str], secret: Iterable[int]) -> list[str]:
    """Arguments with the secret ones replaced by ``<secret>``."""
    hidden = set(secret)
    return ["<secret>" if i in hidden else a for i, a in enumerate(args)]
