"""Reading the whitelist policy file: YAML in, frozen :class:`~agent.keeper.policy.Policy`
data out, every invalid entry refused with a :class:`~agent.keeper.policy.PolicyError`
that names it; and the load-time check that the job user can reach what an entry runs.

The other half, deciding a request against the policy, is :mod:`agent.keeper.policy`:
it never parses, and this module never decides.
"""

from __future__ import annotations

import glob as glob_mod
import grp
import os
import pwd
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.keeper import capabilities
from agent.keeper.errors import Kind
from agent.keeper.filetrust import RealFileSystem, check_file
from agent.keeper.landlock import LandlockSpec
from agent.keeper.policy import (
    DEFAULT_MAX_ARG_LENGTH,
    DEFAULT_MAX_ARGS,
    DEFAULT_READ,
    DEFAULT_READ_EXEC,
    DEFAULT_WRITE,
    ArgRules,
    Confinement,
    Denial,
    Entry,
    Policy,
    PolicyError,
    ScriptRule,
    lexical_path_problem,
)
from agent.keeper.seccomp import GROUPS as SYSCALL_GROUPS
from agent.keeper.seccomp import SeccompSpec
from agent.keeper.validation import ENV_NAME, MAX_ARG_BYTES, MAX_ARGS, MAX_PATH_BYTES, text_problem

# Environment variables that change how a loader, shell or interpreter
# behaves before the job's own code runs. Letting a caller set them would
# let the caller choose the code that runs, so a policy may not allow them.
_DANGEROUS_ENV = re.compile(
    r"^(LD_\w*|BASH_ENV|ENV|BASH_FUNC_\w*|SHELLOPTS|BASHOPTS|PS4|IFS|CDPATH|GLOBIGNORE|"
    r"PROMPT_COMMAND|PYTHON\w*|PERL5?\w*|RUBY\w*|NODE_\w*|GCONV_PATH|LOCPATH|NLSPATH|"
    r"HOSTALIASES|RES_OPTIONS|MALLOC_\w*|GLIBC_TUNABLES|TMPDIR|PATH|HOME|SHELL|USER|LOGNAME|"
    r"AGENT_JOB_ID)$"
)
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
    # itself (its loader process does, see agent.keeper.decision), so yaml stays out
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
    problem = text_problem(command, "command", MAX_PATH_BYTES) or lexical_path_problem(command)
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
        problem = lexical_path_problem(p.rstrip("/") or "/") or text_problem(p, key, MAX_PATH_BYTES)
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
