"""Start-up checks: everything fallible between a parsed config and a server.

:func:`prepare` turns a :class:`~agent.daemon.config.Config` into a
:class:`Prepared` bundle (policy, TLS material, job user, directories) or
raises :class:`~agent.daemon.config.ConfigError` naming the file, section and key,
which the CLI prints as one line before exiting 2. ``agent check-config``
runs exactly this and stops.

No gRPC here: it must be importable before the cipher policy is set.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pwd
import resource
import stat
from dataclasses import dataclass
from pathlib import Path

from agent import tls
from agent.configfile import ConfigError, is_loopback_host, split_host_port
from agent.daemon import landlock
from agent.daemon import policy as policy_mod
from agent.daemon.config import Config
from agent.daemon.supervisor import JobUser

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """The validated, loaded inputs of a server."""

    config: Config
    policy: policy_mod.Policy
    server_pair: tls.KeyPair | None
    ca_pem: bytes | None
    scheduler_pair: tls.KeyPair | None
    scheduler_ca: bytes | None
    job_user: JobUser
    warnings: tuple[str, ...]
    # Paths no job may ever reach, whatever the policy says (see deny_paths).
    deny: tuple[str, ...] = ()


def _err(cfg: Config, section: str, key: str, msg: str) -> ConfigError:
    return ConfigError(cfg.path, section, key, msg)


def check_private_dir(cfg: Config, section: str, key: str, path: Path, *, create: bool) -> None:
    """Ensure ``path`` is a directory only the agent's user can write."""
    if create:
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise _err(cfg, section, key, f"{path}: cannot create: {e.strerror}") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not os.access(parent, os.W_OK | os.X_OK):
            raise _err(
                cfg,
                section,
                key,
                f"{path}: does not exist and {parent} is not writable by the agent",
            ) from None
        return  # created at start
    if not stat.S_ISDIR(st.st_mode):
        raise _err(cfg, section, key, f"{path}: not a directory")
    if st.st_uid != os.geteuid():
        raise _err(
            cfg,
            section,
            key,
            f"{path}: owned by uid {st.st_uid}, not by the agent's user (uid {os.geteuid()})",
        )
    if st.st_mode & 0o022:
        raise _err(
            cfg,
            section,
            key,
            f"{path}: writable by group or others (mode "
            f"{st.st_mode & 0o777:04o}); run: chmod go-w {path}",
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise _err(cfg, section, key, f"{path}: not writable by the agent")


def resolve_job_user(cfg: Config) -> tuple[JobUser, list[str]]:
    """Who jobs run as; refuses root unless allowed."""
    warnings: list[str] = []
    name = cfg.jobs.run_as_user
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        if name and name != me.pw_name:
            warnings.append(
                f"[jobs] run_as_user = {name!r} is ignored: the agent is not root, "
                f"so jobs run as its own user {me.pw_name!r}"
            )
        return JobUser(None, None, me.pw_name, me.pw_dir or "/"), warnings
    if not name:
        if not cfg.jobs.allow_root:
            raise _err(
                cfg,
                "jobs",
                "run_as_user",
                "the agent runs as root: name an unprivileged user for jobs (for "
                'example "nobody"), or set allow_root = true to run them as root',
            )
        warnings.append("jobs run as root (allow_root = true)")
        return JobUser(None, None, "root", "/root"), warnings
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise _err(cfg, "jobs", "run_as_user", f"no such user {name!r}") from None
    if pw.pw_uid == 0:
        if not cfg.jobs.allow_root:
            raise _err(
                cfg,
                "jobs",
                "run_as_user",
                f"{name!r} is root; set allow_root = true if that is really intended",
            )
        warnings.append("jobs run as root (allow_root = true)")
        return JobUser(None, None, "root", pw.pw_dir), warnings
    home = pw.pw_dir if os.path.isdir(pw.pw_dir) else "/"
    return JobUser(pw.pw_uid, pw.pw_gid, pw.pw_name, home), warnings


def deny_paths(cfg: Config) -> tuple[str, ...]:
    """What Landlock keeps away from every job: the agent's keys, its configuration
    directory (config, policy, certificates), its state (history, every job's output,
    pid file), its audit log and its log file."""
    paths: list[Path] = [cfg.path.parent, cfg.jobs.state_dir, cfg.output_dir, cfg.audit_file]
    paths += [cfg.pid_file]
    for key in (cfg.grpc_server.key_file, cfg.scheduler.key_file, cfg.jobs.policy_file):
        if key is not None:
            paths.append(key)
    if cfg.logging.file is not None:
        paths.append(cfg.logging.file)
    out: list[str] = []
    for p in paths:
        for form in (os.path.normpath(p), os.path.realpath(p)):
            if form not in out:
                out.append(form)
    return tuple(out)


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _config_dirs(cfg: Config) -> set[str]:
    return {os.path.normpath(cfg.path.parent), os.path.realpath(cfg.path.parent)}


def _pierce_config_dir(
    deny: tuple[str, ...], config_dirs: set[str], own: set[str]
) -> tuple[str, ...]:
    """The deny list of an entry whose program or scripts live inside the agent's
    configuration directory (a development checkout: config.toml next to examples/).

    The job must read its own program and scripts, so for that entry the directory is
    denied except the branches leading to them; every other denied path (the config
    and policy files, the keys, the state) stays denied as a whole.
    """
    keep = [os.path.realpath(p) for p in own]
    soft = [d for d in deny if d in config_dirs and any(_within(k, d) for k in keep)]
    if not soft:
        return deny
    carved: list[str] = []

    def carve(d: str) -> None:
        if any(k == d for k in keep):
            return  # the folder the job needs: open (its denied files stay denied)
        if not any(_within(k, d) for k in keep):
            carved.append(d)
            return
        try:
            children = os.scandir(d)
        except OSError:
            carved.append(d)
            return
        with children:
            for child in children:
                carve(child.path)

    for d in soft:
        carve(d)
    return tuple(dict.fromkeys([*(d for d in deny if d not in soft), *carved]))


def confine_policy(
    pol: policy_mod.Policy, cfg: Config, deny: tuple[str, ...]
) -> tuple[policy_mod.Policy, list[str]]:
    """Check every entry's confinement against the kernel and this agent; one line each.

    Returns the policy with each entry's Landlock spec completed (the deny list added,
    degraded in best-effort mode, ``abi`` set) and the warnings to log. Raises
    PolicyError naming the entry and the missing feature or the offending key.
    """
    abi = landlock.effective_abi(None if cfg.confinement.max_abi < 0 else cfg.confinement.max_abi)
    best_effort = cfg.confinement.landlock == "best_effort"
    root = os.geteuid() == 0
    warnings: list[str] = []
    entries = []
    for e in pol.entries:
        where = f"{pol.source}: entry {e.name!r}"
        c = e.confinement
        if c.uid is not None and not root and c.uid != os.geteuid():
            raise policy_mod.PolicyError(
                f"{where}: user: the agent does not run as root, so its jobs cannot run as "
                f"{c.user!r} (see docs/deployment.md)"
            )
        if c.capabilities and not root:
            raise policy_mod.PolicyError(
                f"{where}: capabilities: the agent does not run as root and has none to give"
            )
        spec = c.landlock
        if spec is None:  # already confined (a reload of a checked policy cannot happen)
            entries.append(e)
            continue
        own = {e.command, *policy_mod.script_dirs(e.scripts)}
        entry_deny = _pierce_config_dir(deny, _config_dirs(cfg), own)
        for key in ("read_exec", "read", "write"):
            for p in getattr(spec, key):
                against = entry_deny if p in own else deny
                hit = [d for d in against if _within(os.path.realpath(p), d) or _within(p, d)]
                if hit:
                    raise policy_mod.PolicyError(
                        f"{where}: landlock: {key}: {p} is inside {hit[0]}, one of the agent's "
                        "own files that no job may reach"
                    )
        spec = dataclasses.replace(spec, deny=entry_deny)
        need, features = landlock.required_abi(spec)
        missing = [f for f in features if landlock.FEATURES[f][0] > abi]
        if missing and not best_effort:
            what = "Landlock" if abi == 0 else f"Landlock ABI {need}"
            raise policy_mod.PolicyError(
                f"{where}: needs {what} for {', '.join(missing)} but the kernel has ABI {abi}; "
                'relax the entry or set [confinement] landlock = "best_effort"'
            )
        if missing:
            spec, lost = landlock.degrade(spec, abi)
            warnings.append(f"{where}: best effort, not enforced: {'; '.join(lost)}")
        confined: landlock.LandlockSpec | None = spec if abi >= 1 else None
        if confined is not None:
            try:
                landlock.plan_rules(confined)
            except landlock.LandlockError as err:
                raise policy_mod.PolicyError(f"{where}: landlock: {err}") from None
        entries.append(
            dataclasses.replace(
                e, confinement=dataclasses.replace(c, landlock=confined, abi=abi if confined else 0)
            )
        )
    return dataclasses.replace(pol, entries=tuple(entries)), warnings


def load_policy(
    cfg: Config, deny: tuple[str, ...] | None = None
) -> tuple[policy_mod.Policy, list[str]]:
    """Load and confine the configured policy (start-up and SIGHUP); raises PolicyError."""
    assert cfg.jobs.policy_file is not None
    pol = policy_mod.load(cfg.jobs.policy_file)
    return confine_policy(pol, cfg, deny_paths(cfg) if deny is None else deny)


def check_scratch_dir(cfg: Config, deny: tuple[str, ...], *, create: bool) -> None:
    """The scratch root: the agent's own, 0711 (jobs reach only their own directory
    below it), outside everything jobs are denied, and containing none of it."""
    root = cfg.scratch_dir
    real = os.path.realpath(root)
    for d in deny:
        if _within(real, d) or _within(d, real) or _within(str(root), d):
            raise _err(
                cfg,
                "confinement",
                "scratch_dir",
                f"{root}: overlaps {d}, which jobs must never reach",
            )
    if create:
        try:
            root.mkdir(mode=0o711, parents=True, exist_ok=True)
            if os.lstat(root).st_uid == os.geteuid():
                # Traverse only: each job reaches its own 0700 directory, lists nothing.
                os.chmod(root, 0o711)  # noqa: S103
        except OSError as e:
            raise _err(
                cfg, "confinement", "scratch_dir", f"{root}: cannot create: {e.strerror}"
            ) from None
    check_private_dir(cfg, "confinement", "scratch_dir", root, create=False)


def prepare(cfg: Config, *, create_dirs: bool = True) -> Prepared:
    """Validate everything the server needs; raise ConfigError naming the key."""
    warnings: list[str] = []
    gs = cfg.grpc_server
    host, _ = split_host_port(gs.addr)
    if not gs.use_tls:
        warnings.append(
            f"PLAINTEXT listener on {gs.addr}: no encryption and no client "
            "identities (allow_plaintext_loopback = true); never use this "
            "outside development"
        )
        assert is_loopback_host(host)
    server_pair = None
    ca_pem = None
    if gs.use_tls:
        assert gs.crt_file is not None and gs.key_file is not None
        server_pair = _pair(cfg, "grpc_server", gs.crt_file, gs.key_file)
        if gs.ca_file is not None:
            try:
                ca_pem = tls.load_ca(gs.ca_file)
            except tls.TLSConfigError as e:
                raise _err(cfg, "grpc_server", "ca_file", str(e)) from None
    sch = cfg.scheduler
    scheduler_pair = None
    scheduler_ca = None
    if sch.register:
        assert sch.crt_file and sch.key_file and sch.ca_file
        scheduler_pair = _pair(cfg, "scheduler", sch.crt_file, sch.key_file)
        try:
            scheduler_ca = tls.load_ca(sch.ca_file)
        except tls.TLSConfigError as e:
            raise _err(cfg, "scheduler", "ca_file", str(e)) from None
    assert cfg.jobs.policy_file is not None
    deny = deny_paths(cfg)
    try:
        pol, w = load_policy(cfg, deny)
    except policy_mod.PolicyError as e:
        raise _err(cfg, "jobs", "policy_file", str(e)) from None
    warnings.extend(w)
    if not pol.entries:
        warnings.append(
            f"the policy {cfg.jobs.policy_file} allows nothing: every StartJob will be denied"
        )
    job_user, w = resolve_job_user(cfg)
    warnings.extend(w)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    need = cfg.jobs.max_running * 3 + 256
    if hard != resource.RLIM_INFINITY and hard < need:
        warnings.append(
            f"[jobs] max_running = {cfg.jobs.max_running} needs about {need} open "
            f"files but the hard limit is {hard}: starts beyond about "
            f"{max(0, (hard - 256) // 3)} running jobs will fail (raise LimitNOFILE)"
        )
    check_private_dir(cfg, "jobs", "state_dir", cfg.jobs.state_dir, create=create_dirs)
    check_private_dir(cfg, "jobs", "output_dir", cfg.output_dir, create=create_dirs)
    check_scratch_dir(cfg, deny, create=create_dirs)
    audit_dir = cfg.audit_file.parent
    if not audit_dir.is_dir() and audit_dir not in (cfg.jobs.state_dir, cfg.output_dir):
        raise _err(cfg, "audit", "file", f"{audit_dir}: directory does not exist")
    if cfg.audit_file.exists():
        ast = os.lstat(cfg.audit_file)
        if not stat.S_ISREG(ast.st_mode) or ast.st_uid != os.geteuid():
            raise _err(
                cfg,
                "audit",
                "file",
                f"{cfg.audit_file}: not a regular file owned by the agent's user",
            )
    if cfg.logging.syslog and not stat.S_ISSOCK(_mode(cfg.logging.syslog_socket)):
        raise _err(
            cfg,
            "logging",
            "syslog_socket",
            f"{cfg.logging.syslog_socket}: no syslog socket there (is a syslog daemon "
            "or journald running?)",
        )
    if cfg.logging.file is not None and not cfg.logging.file.parent.is_dir():
        raise _err(cfg, "logging", "file", f"{cfg.logging.file.parent}: directory does not exist")
    return Prepared(
        config=cfg,
        policy=pol,
        server_pair=server_pair,
        ca_pem=ca_pem,
        scheduler_pair=scheduler_pair,
        scheduler_ca=scheduler_ca,
        job_user=job_user,
        warnings=tuple(warnings),
        deny=deny,
    )


def _mode(path: Path) -> int:
    try:
        return os.stat(path).st_mode
    except OSError:
        return 0


def _pair(cfg: Config, section: str, crt: Path, key: Path) -> tls.KeyPair:
    try:
        tls.check_key_file(key)
    except tls.TLSConfigError as e:
        raise _err(cfg, section, "key_file", str(e)) from None
    try:
        return tls.load_key_pair(crt, key, check_owner=False)
    except tls.TLSConfigError as e:
        msg = str(e)
        k = "key_file" if msg.startswith(str(key)) else "crt_file"
        raise _err(cfg, section, k, msg) from None
