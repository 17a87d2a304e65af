"""The job keeper's decision: configuration and policy in, a spawn (or a refusal) out.

The keeper (:mod:`agent.keeper.keeper`) loads the agent's configuration and the
policy itself (:func:`load_decider`, from its own ``--config``; :meth:`Decider.reload`
on the agent's SIGHUP) and decides every start the agent hands it: the agent sends
only who asks (the caller's identity, as the agent saw it) and what (the request).
Everything that depends on the policy or the configuration happens here, in this
order: malformed requests, limits against their maxima and the kernel's hard limits,
the timeout, the policy's decision (file trust, pins), the cgroup controllers the
limits need; then :func:`build_spawn` turns the admitted plan into the spawner's
:class:`~agent.keeper.spawnplan.SpawnSpec` and the lifecycle's :class:`RunSpec`. So
code execution in the agent can start only what the policy allows some identity to
start, as the users and with the capabilities the policy gives.

The agent keeps what only it knows (who may call StartJob, whether it accepts jobs,
``max_running``, the history) and calls :func:`load_policy` at start-up only to refuse
a bad policy before anything starts (``agent check-config``, exit status 2).

No grpc and no asyncio: the keeper imports this (tests/test_imports.py).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pwd
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from agent.configfile import ConfigError
    from agent.keeper import policyfile
    from agent.keeper.config import Config

# policyfile (reading the policy, checking its scripts' places) is imported where the
# loader process needs it: the keeper, which only decides, carries none of it.
from agent.keeper import admission, capabilities, cgroups, landlock, seccomp
from agent.keeper import policy as policy_mod
from agent.keeper.errors import FailedPrecondition
from agent.keeper.jobsettings import INSTANCE_ENV, JOB_ID_ENV, JobUser, Settings, instance_id
from agent.keeper.launch import PACKAGE_ROOT, interpreter, python_main
from agent.keeper.spawnplan import SpawnSpec
from agent.vocabulary import CGROUP_FIELDS, CGROUP_LIMITS, LIMIT_NAMES


@dataclass(frozen=True)
class RunSpec:
    """How the keeper runs a job besides its plan: its lifecycle's parameters."""

    timeout: int
    cpu_seconds: int
    memory_max: int
    note: str
    cap: int
    kill_on_cap: bool
    grace: float

    def to_wire(self) -> dict[str, Any]:
        return {
            "timeout": self.timeout,
            "cpu_seconds": self.cpu_seconds,
            "memory_max": self.memory_max,
            "note": self.note,
            "cap": self.cap,
            "kill_on_cap": self.kill_on_cap,
            "grace": float(self.grace),
        }


NO_CGROUP_NOTE = "ran without a job cgroup: its stop was not escape-proof"


def cgroup_limits(
    limits: Mapping[str, int], cpu_millicores: int, subtree: cgroups.Subtree | None
) -> dict[str, int]:
    """The cgroup limits of a job (``cgroups.Limits`` fields), or FailedPrecondition.

    A limit whose controller is not enabled for job cgroups (or that needs a
    cgroup where jobs run without one) is refused, never silently unenforced.
    """
    out: dict[str, int] = {}
    wanted: list[tuple[str, str, str]] = [
        (name, CGROUP_FIELDS[name], controller)
        for name, (_, controller) in CGROUP_LIMITS.items()
        if limits.get(name)
    ]
    if cpu_millicores:
        wanted.append(("[cgroups] cpu_millicores", "cpu_millicores", "cpu"))
    for name, field_name, controller in wanted:
        if subtree is None:
            raise FailedPrecondition(
                f"{name} needs the {controller} controller of a job cgroup, and jobs run "
                "without a cgroup on this agent",
                rule="missing-cgroup-controller",
            )
        if controller not in subtree.controllers:
            raise FailedPrecondition(
                f"{name} needs the {controller} controller, which is not available for "
                f"job cgroups here ({subtree.jobs}), so the limit cannot be enforced",
                rule="missing-cgroup-controller",
            )
        out[field_name] = cpu_millicores if field_name == "cpu_millicores" else limits[name]
    return out


def base_env(s: Settings) -> dict[str, str]:
    """The environment every job starts from (its entry's variables and its id added)."""
    return {
        "PATH": s.path_env,
        "HOME": s.user.home,
        "USER": s.user.name,
        "LOGNAME": s.user.name,
        "LANG": "C.UTF-8",
        INSTANCE_ENV: s.instance,
    }


def build_spawn(
    job_id: str,
    admitted: admission.Admitted,
    s: Settings,
    cg_limits: Mapping[str, int],
    env: Mapping[str, str] | None = None,
) -> tuple[SpawnSpec, RunSpec]:
    """The spawner's spec and the lifecycle's parameters of an admitted job (pure).

    ``env``: the base environment (:func:`base_env` of ``s`` unless given).
    """
    plan, limits = admitted.plan, admitted.limits
    job_env = dict(base_env(s) if env is None else env)
    job_env.update(plan.env)
    job_env[JOB_ID_ENV] = job_id
    # --- confinement: the entry's user, Landlock and scratch directory ---
    conf = plan.confinement
    uid, gid = s.user.uid, s.user.gid
    dynamic = False
    if conf is not None and conf.uid is not None:
        uid, gid = conf.uid, conf.gid
        job_env["USER"] = job_env["LOGNAME"] = conf.user or str(conf.uid)
    elif s.dynamic_users is not None:
        # A uid of its own, from the range: the keeper takes it at the spawn.
        uid = gid = None
        dynamic = True
    scratch = str(s.scratch_dir / job_id) if s.scratch_dir is not None else None
    if scratch is not None:
        job_env["HOME"] = job_env["TMPDIR"] = scratch
    spec = SpawnSpec(
        argv=plan.argv,
        executable=plan.executable,
        env=job_env,
        cwd=plan.cwd or scratch or "/",
        stdout_fd=-1,  # the keeper makes the job's output pipe
        uid=uid,
        gid=gid,
        umask=s.umask,
        limits={k: v for k, v in limits.items() if k != "output_bytes" and k not in CGROUP_LIMITS},
        exec_fd=plan.exec_fd,
        script_fd=plan.script_fd,
        cgroup={"id": job_id, **cg_limits} if s.cgroups is not None else None,
        landlock=conf.landlock if conf is not None else None,
        landlock_abi=conf.abi if conf is not None else 0,
        scratch=scratch,
        capabilities=conf.capabilities if conf is not None else (),
        dynamic_user=dynamic,
        no_new_privs=conf.no_new_privs if conf is not None else True,
        seccomp=conf.seccomp if conf is not None else None,
    )
    run = RunSpec(
        timeout=admitted.timeout,
        cpu_seconds=limits.get("cpu_seconds", 0),
        memory_max=cg_limits.get("memory_bytes", 0),
        note="" if s.cgroups is not None else NO_CGROUP_NOTE,
        cap=limits.get("output_bytes", 0),
        kill_on_cap=s.on_output_cap == "kill",
        grace=s.stop_grace,
    )
    return spec, run


@dataclass(frozen=True)
class Decided:
    """An admitted start: what to spawn and how to run it. The owner closes the plan's
    descriptors (``spec.exec_fd``, ``spec.script_fd``: the plan's sealed copies)."""

    spec: SpawnSpec
    run: RunSpec
    entry: str  # the policy entry that allowed it
    executable: str  # canonical, for the record
    timeout: int
    limits: dict[str, int]  # the resolved limits that are set (for the record)


class Decider:
    """The keeper's policy, settings and decisions (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        policy: policy_mod.Policy,
        *,
        config_path: str | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.config_path = config_path  # where reload() reads the policy again
        self._env = base_env(settings)
        # Entry -> the capabilities it gives that this keeper does not hold (check_held).
        self.unheld: dict[str, list[int]] = {}

    def decide(self, job_id: str, req: admission.StartRequest) -> Decided:
        """Admit ``req`` as job ``job_id``, or raise the AgentError that refuses it."""
        from agent.keeper import validation

        s = self.settings
        # Every size bound first, as the agent's service checks them (a compromised
        # agent may skip that).
        validation.start_bounds(req.command, req.path, req.args, req.env, req.secret_args)
        admitted = admission.admit(req, s.rules, self.policy, busy=0, accepting=True)
        try:
            missing = self.unheld.get(admitted.plan.entry)
            if missing:
                raise FailedPrecondition(
                    f"entry {admitted.plan.entry!r} gives {capabilities.names_of(missing)}, "
                    "which the job keeper does not hold (it keeps only the capabilities of "
                    "the policy it started with): the keeper needs a restart",
                    rule="capabilities-not-held",
                )
            cg = cgroup_limits(admitted.limits, s.cpu_millicores, s.cgroups)
            spec, run = build_spawn(job_id, admitted, s, cg, self._env)
            return Decided(
                spec=spec,
                run=run,
                entry=admitted.plan.entry,
                executable=admitted.plan.executable,
                timeout=admitted.timeout,
                limits={k: v for k, v in admitted.limits.items() if v},
            )
        except BaseException:
            admitted.plan.close()
            raise

    def reload(self) -> tuple[int, list[str], list[str]]:
        """Read the policy again from the configured file (in a loader process, see
        :func:`load_in_child`); (entries, warnings, :meth:`check_held`'s warnings).

        Raises LoadError (the current policy stays).
        """
        if self.config_path is None:
            raise LoadError("the job keeper was started without --config: no policy file")
        loaded = load_in_child(self.config_path, self.settings.cgroups)
        self.policy = loaded.policy
        return len(loaded.policy.entries), loaded.policy_warnings, self.check_held()

    def check_held(self) -> list[str]:
        """Note the entries whose capabilities this keeper does not hold, one warning
        each; their starts are refused (FAILED_PRECONDITION) rather than failing at the
        job's capset. A keeper that gives capabilities keeps, from its start on, only
        those its first policy's entries give
        (:func:`agent.keeper.capabilities.keep_only_for_jobs`): an entry that a reload
        (or an upgrade in place) brings with another needs a restart of the keeper. A
        keeper that gives none has no entry with capabilities (refused at the load)."""
        self.unheld = {}
        if os.geteuid() != 0 and not capabilities.gives_capabilities():
            return []
        for e in self.policy.entries:
            missing = capabilities.not_held(e.confinement.capabilities)
            if missing:
                self.unheld[e.name] = missing
        return [
            f"{self.policy.source}: entry {name!r}: capabilities "
            f"{capabilities.names_of(missing)} are not held by the job keeper (it keeps only "
            "those of the policy it started with, of what its unit gives it): its jobs are "
            "refused until the keeper is restarted (systemctl restart worker-agent-keeper, "
            "which stops its running jobs)"
            for name, missing in self.unheld.items()
        ]


def settings_of(cfg: Config, user: JobUser, subtree: cgroups.Subtree | None) -> Settings:
    """The job settings of a configuration (the agent's and the keeper's alike)."""
    d, m = cfg.limits.default, cfg.limits.max
    return Settings(
        output_dir=cfg.output_dir,
        instance=instance_id(cfg.jobs.state_dir),
        user=user,
        umask=int(cfg.jobs.umask, 8),
        stop_grace=cfg.jobs.stop_grace_seconds,
        on_output_cap=cfg.jobs.on_output_cap,
        path_env=cfg.jobs.path_env,
        scratch_dir=cfg.scratch_dir,
        rules=admission.Rules(
            max_running=cfg.jobs.max_running,
            default_timeout=cfg.jobs.default_timeout_seconds,
            max_timeout=cfg.jobs.max_timeout_seconds,
            default_limits={n: getattr(d, n) for n in LIMIT_NAMES},
            max_limits={n: getattr(m, n) for n in LIMIT_NAMES},
        ),
        cgroups=subtree,
        cpu_millicores=cfg.cgroups.cpu_millicores,
    )


class Loaded(NamedTuple):
    """A configuration's job settings and policy, loaded and confined."""

    settings: Settings
    policy: policy_mod.Policy
    user_warnings: list[str]  # about the job user ([jobs] run_as_user)
    policy_warnings: list[str]  # about the policy's entries and confinement


def load_decider(cfg: Config, subtree: cgroups.Subtree | None) -> Loaded:
    """The job settings and the policy of a configuration, loaded and confined as the
    agent's start-up checks them.

    Raises ConfigError (a job user that cannot be) or PolicyError.
    """
    from agent.keeper import policyfile

    user, warnings = resolve_job_user(cfg)
    dynamic, more = dynamic_range(cfg)
    warnings += more
    deny = deny_paths(cfg)
    reader = job_reader(user)
    if dynamic is not None:
        # A job of no fixed user is some uid of the range, in no group: "others".
        reader = policyfile.Reader(dynamic[0], dynamic[0], "a dynamic user")
    pol, w = load_policy(cfg, deny, reader=reader)
    settings = dataclasses.replace(settings_of(cfg, user, subtree), dynamic_users=dynamic)
    return Loaded(settings, pol, warnings, w)


def dynamic_range(cfg: Config) -> tuple[tuple[int, int] | None, list[str]]:
    """The uid range of ``[jobs] dynamic_users`` when the job keeper can switch users (root,
    CAP_SETUID and CAP_SETGID, or a keeper service: the standard unit gives it both);
    otherwise None, and a warning when the configuration asked for it."""
    j = cfg.jobs
    if not j.dynamic_users:
        return None, []
    if runner_is_root(cfg) or cfg.keeper.mode == "service" or capabilities.held()[1]:
        return (j.dynamic_uid_min, j.dynamic_uid_max), []
    me = pwd.getpwuid(os.geteuid()).pw_name
    return None, [
        f"[jobs] dynamic_users = true is ignored: the job keeper is neither root nor holds "
        f"CAP_SETUID and CAP_SETGID, so every job runs as its own user {me!r} (jobs can "
        f"see each other's processes)"
    ]


class LoadError(Exception):
    """The keeper's configuration or policy could not be loaded; ``str()`` says why."""


LOADER_MAIN = python_main("agent.keeper.decision", "loader_main")
LOADER_OUTPUT_MAX = 64 << 20


def load_in_child(config_path: str, subtree: cgroups.Subtree | None) -> Loaded:
    """Load the configuration and the policy in a loader process (this code, a fresh
    interpreter, the keeper's own config path: nothing the agent says reaches it) and
    take the result. Raises LoadError.

    Why a process: parsing TOML and YAML needs tomllib, yaml and the config module,
    about 2 MB that would stay in the keeper's memory for its whole life (the agent and
    the keeper together have a memory budget); the decisions need none of them. The
    agent's start-up checks the policy the same way (it decides nothing, so yaml stays
    out of its memory too). The result comes back pickled over a pipe only the loader
    holds: data from this package's own code, never from the agent.
    """
    # The C unpickler alone: pickle.py would bring 200 kB more of modules.
    loads: Any = importlib.import_module("_pickle").loads

    argv = [sys.executable, "-I", "-c", LOADER_MAIN, PACKAGE_ROOT, config_path]
    if subtree is not None:
        argv += [str(subtree.jobs), ",".join(sorted(subtree.controllers))]
    exe = interpreter()
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.posix_spawn(
            exe,
            argv,
            {k: v for k, v in os.environ.items() if k == "WORKER_AGENT_SPAWN"},
            file_actions=[(os.POSIX_SPAWN_DUP2, w, 1)],
        )
    except OSError as e:
        os.close(r)
        os.close(w)
        raise LoadError(f"cannot start the policy loader: {e}") from None
    os.close(w)
    data = bytearray()
    try:
        while chunk := os.read(r, 1 << 20):
            data += chunk
            if len(data) > LOADER_OUTPUT_MAX:
                break
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or len(data) > LOADER_OUTPUT_MAX:
        raise LoadError(f"the policy loader failed (status {status:#x}; see the log)")
    result = loads(bytes(data))  # this package's own loader, see above
    if result[0] != "ok":
        raise LoadError(str(result[1]))
    loaded = result[1]
    if not isinstance(loaded, Loaded) or not isinstance(loaded.policy, policy_mod.Policy):
        raise LoadError("the policy loader answered something else")
    return loaded


def loader_main(argv: list[str]) -> int:
    """The loader process: ``CONFIG [CGROUP_JOBS CONTROLLERS]``; writes the pickled
    result to its standard output (see :func:`load_in_child`)."""
    import pickle

    from agent.configfile import ConfigError
    from agent.keeper import config as config_mod

    subtree = None
    if len(argv) == 3:
        subtree = cgroups.Subtree(Path(argv[1]), frozenset(c for c in argv[2].split(",") if c))
    try:
        result: tuple[Any, ...] = ("ok", load_decider(config_mod.load(argv[0]), subtree))
    except (ConfigError, policy_mod.PolicyError, OSError) as e:
        result = ("error", str(e))
    sys.stdout.buffer.write(pickle.dumps(result))
    sys.stdout.buffer.flush()
    return 0


def _err(cfg: Config, section: str, key: str, msg: str) -> ConfigError:
    from agent.configfile import ConfigError  # not at the top: it brings tomllib

    return ConfigError(cfg.path, section, key, msg)


def runner_is_root(cfg: Config) -> bool:
    """Whether the job keeper, which starts the jobs, runs as root: this process's word
    (the keeper's own loader, or the agent whose child the keeper is), except for an
    agent whose keeper is a service serving another user (``[keeper] agent_user``: a
    root keeper; the agent checks the keeper's hello against this before any start)."""
    if os.geteuid() == 0:
        return True
    return cfg.keeper.mode == "service" and bool(cfg.keeper.agent_user)


def resolve_job_user(cfg: Config) -> tuple[JobUser, list[str]]:
    """Who jobs run as; refuses root unless allowed."""
    warnings: list[str] = []
    name = cfg.jobs.run_as_user
    if not runner_is_root(cfg):
        me = pwd.getpwuid(os.geteuid())
        if name and name != me.pw_name:
            warnings.append(
                f"[jobs] run_as_user = {name!r} is ignored: the job keeper is not root, "
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


def job_reader(job_user: JobUser) -> policyfile.Reader | None:
    """The job user as the policy's reachability check sees it (None: root, no check)."""
    from agent.keeper import policyfile

    if job_user.uid is None:
        if os.geteuid() == 0:
            return None
        return policyfile.Reader(
            os.geteuid(), os.getegid(), job_user.name, frozenset(os.getgroups())
        )
    assert job_user.gid is not None
    return policyfile.Reader(job_user.uid, job_user.gid, job_user.name)


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
    root = runner_is_root(cfg)
    warnings: list[str] = []
    entries = []
    # Asked once per load: libseccomp and the kernel's filters (and user notification,
    # which listen() checks of an entry with bind_tcp ports need).
    guards = {e.confinement.seccomp.listen == "bound" for e in pol.entries if e.confinement.seccomp}
    no_seccomp = {guard: seccomp.unavailable(listen_check=guard) for guard in guards}
    if not cfg.confinement.seccomp:
        warnings.append(
            f"{pol.source}: [confinement] seccomp = false: no job gets a seccomp filter "
            "(MPTCP, UDP, listen(), namespaces, io_uring... are not refused)"
        )
    for e in pol.entries:
        where = f"{pol.source}: entry {e.name!r}"
        c = e.confinement
        if c.seccomp is not None and not cfg.confinement.seccomp:
            c = dataclasses.replace(c, seccomp=None)
        if c.seccomp is not None and (why := no_seccomp[c.seccomp.listen == "bound"]):
            if not best_effort:
                raise policy_mod.PolicyError(
                    f"{where}: needs seccomp filters but {why}; install libseccomp2 or set "
                    '[confinement] landlock = "best_effort"'
                )
            warnings.append(f"{where}: best effort, not enforced: seccomp ({why})")
            c = dataclasses.replace(c, seccomp=None)
        if not c.no_new_privs and (c.seccomp is not None or (c.landlock and abi >= 1)):
            raise policy_mod.PolicyError(
                f"{where}: no_new_privs: false cannot be honoured: Landlock and seccomp "
                "need no_new_privs, and one of them is enforced here"
            )
        if c.uid is not None and not root and c.uid != os.geteuid():
            raise policy_mod.PolicyError(
                f"{where}: user: the job keeper does not run as root, so its jobs cannot run as "
                f"{c.user!r} (see docs/deployment.md)"
            )
        if c.capabilities and not root:
            raise policy_mod.PolicyError(
                f"{where}: capabilities: the job keeper does not run as root and has none to give"
            )
        spec = c.landlock
        if spec is None:  # already confined (a reload of a checked policy cannot happen)
            entries.append(dataclasses.replace(e, confinement=c))
            continue
        confined = _confine_landlock(e, spec, cfg, deny, abi, where, warnings)
        entries.append(
            dataclasses.replace(
                e, confinement=dataclasses.replace(c, landlock=confined, abi=abi if confined else 0)
            )
        )
    return dataclasses.replace(pol, entries=tuple(entries)), warnings


def _confine_landlock(
    e: policy_mod.Entry,
    spec: landlock.LandlockSpec,
    cfg: Config,
    deny: tuple[str, ...],
    abi: int,
    where: str,
    warnings: list[str],
) -> landlock.LandlockSpec | None:
    """An entry's Landlock spec completed for this kernel and agent (None: no Landlock
    here), or PolicyError: a grant inside the agent's own files or the scratch root, a
    feature the kernel lacks (unless best effort, then said in ``warnings``)."""
    from agent.keeper import policyfile

    best_effort = cfg.confinement.landlock == "best_effort"
    # No rule of any entry covers the scratch root (spawner.Spawner.ruleset denies it):
    # each job gets its own directory there, by descriptor.
    scratch_root = os.path.realpath(cfg.scratch_dir)
    own = {e.command, *policyfile.script_dirs(e.scripts)}
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
            if _within(os.path.realpath(p), scratch_root):
                raise policy_mod.PolicyError(
                    f"{where}: landlock: {key}: {p} is inside [confinement] scratch_dir "
                    f"{cfg.scratch_dir}: each job reaches only its own directory there"
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
            # As the spawner plans it: the scratch root hole-punched out of every grant.
            landlock.plan_rules(dataclasses.replace(confined, deny=(*confined.deny, scratch_root)))
        except landlock.LandlockError as err:
            raise policy_mod.PolicyError(f"{where}: landlock: {err}") from None
    return confined


def load_policy(
    cfg: Config,
    deny: tuple[str, ...] | None = None,
    *,
    reader: policyfile.Reader | None = None,
) -> tuple[policy_mod.Policy, list[str]]:
    """Load and confine the configured policy (start-up and SIGHUP); raises PolicyError.

    ``reader``: the job user whose access to every script location is checked.
    """
    from agent.keeper import policyfile

    assert cfg.jobs.policy_file is not None
    pol = policyfile.load(cfg.jobs.policy_file, reader=reader)
    return confine_policy(pol, cfg, deny_paths(cfg) if deny is None else deny)


# ---------------------------------------------------------------- the start request on the wire

REQUEST_KEYS = frozenset(
    {"identity", "command", "path", "args", "env", "secret_args", "limits", "timeout"}
)
IDENTITY_MAX = 4096  # characters; a certificate's CN or SAN is far shorter
WIRE_INT = 1 << 64  # every integer of a request is below this in magnitude (uint64 fields)


def request_to_wire(req: admission.StartRequest) -> dict[str, Any]:
    """A start request as the agent sends it to the keeper (JSON)."""
    return {
        "identity": req.identity,
        "command": req.command,
        "path": req.path,
        "args": list(req.args),
        "env": dict(req.env),
        "secret_args": list(req.secret_args),
        "limits": dict(req.limits),
        "timeout": req.timeout_seconds,
    }


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -WIRE_INT < v < WIRE_INT


def request_from_wire(d: Any) -> admission.StartRequest | str:
    """The request a (possibly hostile) agent sent, or why it is malformed.

    Types only (and the identity's length): the sizes a caller could have sent are
    refused by :meth:`Decider.decide` with the agent's own words
    (:func:`agent.keeper.validation.start_bounds`), the rest by the policy.
    """
    if not isinstance(d, dict) or set(d) != REQUEST_KEYS:
        return "malformed start: request"
    identity, env, limits, timeout = d["identity"], d["env"], d["limits"], d["timeout"]
    if not isinstance(identity, str) or len(identity) > IDENTITY_MAX:
        return "malformed start: request identity"
    for key in ("command", "path"):
        if not isinstance(d[key], str):
            return f"malformed start: request {key}"
    if not isinstance(d["args"], list) or not all(isinstance(a, str) for a in d["args"]):
        return "malformed start: request args"
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        return "malformed start: request env"
    secret = d["secret_args"]
    if not isinstance(secret, list) or not all(_int(i) for i in secret):
        return "malformed start: request secret_args"
    if not isinstance(limits, dict) or not all(
        k in LIMIT_NAMES and (v is None or _int(v)) for k, v in limits.items()
    ):
        return "malformed start: request limits"
    if timeout is not None and not (_int(timeout) and timeout >= 0):
        return "malformed start: request timeout"
    return admission.StartRequest(
        identity=identity,
        command=d["command"],
        path=d["path"],
        args=tuple(d["args"]),
        env=dict(env),
        timeout_seconds=timeout,
        limits=dict(limits),
        secret_args=tuple(secret),
    )
