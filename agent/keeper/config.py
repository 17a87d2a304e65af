"""The daemon's configuration: config.toml -> a frozen :class:`Config`.

One file for both of the daemon's programs: the agent imports it from here, and the
keeper reads it itself (its policy loader, :func:`agent.keeper.decision.loader_main`),
so it lives on the keeper's side of their one-way import graph.

Two steps, as in uvicorn: :func:`parse` turns the TOML text into a
:class:`Config` (pure: types, ranges, cross-field rules; no file is opened
apart from the config itself), and the agent's start-up checks (``prepare`` of
its ``startup`` module) do the fallible work against the file system (keys,
directories, the policy). Every error is a :class:`~agent.configfile.ConfigError` whose
message names the file, the section and the key, fits on one line, and is
what the ``agent`` command prints before exiting with status 2.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from agent.access import identity_problem, pattern_problem
from agent.configfile import (
    ConfigError,
    describe_sections,
    is_loopback_host,
    option,
    parse_tables,
    read_text,
    split_host_port,
)
from agent.vocabulary import LIMIT_BY_NAME, MAX_LABELS, label_problem

# ---------------------------------------------------------------- sections
#
# Field types are restricted to: str, bool, int, float, Path, Path | None,
# list[str] and nested section dataclasses; the parser below checks them.
# Each field's metadata carries its help text (used in the README table and
# by `agent check-config --explain`) and optional bounds.


@dataclass(frozen=True)
class GrpcServer:
    """``[grpc_server]``: the listener (original keys first)."""

    addr: str = option("127.0.0.1:50000", "host:port to listen on ([v6]:port for IPv6)")
    use_tls: bool = option(
        True,
        "serve TLS; false is refused unless addr is loopback and allow_plaintext_loopback = true",
    )
    crt_file: Path | None = option(None, "server certificate (PEM), chain allowed")
    key_file: Path | None = option(None, "server private key (PEM), mode 0600 or stricter")
    ca_file: Path | None = option(
        None,
        "CA bundle for client certificates: when set, every "
        "client must present a certificate it signed (mTLS)",
    )
    allow_plaintext_loopback: bool = option(
        False,
        "permit use_tls = false on a loopback address (development only; warns at every start)",
    )
    tls13_only: bool = option(False, "refuse TLS 1.2 handshakes (see docs/security.md)")
    max_message_bytes: int = option(
        4 * 1024 * 1024, "largest request accepted, bytes", lo=1024, hi=64 * 1024 * 1024
    )
    cert_expiry_warning_days: int = option(
        30,
        "warn (log, check-config) when a loaded certificate expires within this many days "
        "(0: never)",
        lo=0,
        hi=3650,
    )
    max_connection_idle_seconds: int = option(
        1800,
        "close client connections with no call in flight for this many seconds (0: never; "
        "clients reconnect at their next call); an idle mTLS connection holds about 67 KB",
        lo=0,
        hi=86400,
    )
    max_connections: int = option(
        1024,
        "client connections accepted at once (0: no limit); more are refused at accept",
        lo=0,
        hi=1000000,
    )
    max_concurrent_streams: int = option(
        1024,
        "calls one connection may have in flight at once (HTTP/2 streams); more wait in "
        "the client (a client that opens more before it has read the limit gets them "
        "refused: keep it above what one client starts at once)",
        lo=1,
        hi=100000,
    )


@dataclass(frozen=True)
class Scheduler:
    """``[scheduler]``: registration with the scheduler (original key: addr)."""

    addr: str = option("", "scheduler host:port; empty disables registration")
    addrs: list[str] = option(
        [],
        "more schedulers sharing a store (host:port each): when the one in use fails, "
        "the agent registers with the next",
    )
    register: bool = option(
        False, "register with the scheduler at start and keep the registration alive"
    )
    advertise_addr: str = option("", "address sent in RegisterReq (default: grpc_server.addr)")
    use_tls: bool = option(
        True,
        "register over TLS; false is refused unless addr is loopback and "
        "allow_plaintext_loopback = true",
    )
    allow_plaintext_loopback: bool = option(
        False,
        "permit use_tls = false on a loopback scheduler address (an original scheduler; "
        "development only; warns at every start)",
    )
    crt_file: Path | None = option(None, "the agent's own client certificate for the scheduler")
    key_file: Path | None = option(None, "key of crt_file, mode 0600 or stricter")
    ca_file: Path | None = option(None, "CA that signed the scheduler's server certificate")
    server_name: str = option(
        "", "expected name in the scheduler's certificate (default: the host part of addr)"
    )
    heartbeat_seconds: float = option(
        10.0, "heartbeat interval when the scheduler does not name one", lo=0.1, hi=3600
    )
    retry_initial_seconds: float = option(
        0.5, "first retry delay while the scheduler is unreachable", lo=0.01, hi=600
    )
    retry_max_seconds: float = option(
        30.0, "longest retry delay (exponential backoff with jitter)", lo=0.01, hi=3600
    )
    call_timeout_seconds: float = option(
        5.0, "deadline of each call to the scheduler", lo=0.1, hi=600
    )
    labels: dict[str, str] = option(
        {},
        "labels advertised when registering, for choosing the targets of fan-out runs: "
        '{role = "web", zone = "a"} (keys: letters, digits, . _ / -; values up to 63 characters)',
    )
    link: bool = option(
        True,
        "after registering, open the scheduler's Link stream on the same connection and "
        "send the heartbeats on it (a scheduler without Link gets Heartbeat calls); false: "
        "Heartbeat calls only",
    )
    calls_as: str = option(
        "",
        "identity under which [auth] and the policy decide the Worker calls the scheduler "
        "sends over the link (needs use_tls = true; see docs/deployment.md); empty: the link "
        "carries no calls",
    )


@dataclass(frozen=True)
class Auth:
    """``[auth]``: who may call the API (deny by default)."""

    clients: list[str] = option(
        [],
        "certificate identities that may call the API: exact names, *.dns.wildcards "
        "or spiffe://trust-domain/prefix/ (patterns match SANs; see docs/deployment.md)",
    )
    admins: list[str] = option(
        [], "identities that may also see and stop every job (same patterns as clients)"
    )
    crl_files: list[str] = option(
        [],
        "CRL files (PEM or DER), one per CA of grpc_server.ca_file; a revoked client is "
        "UNAUTHENTICATED; re-read when changed and on SIGHUP",
    )
    allow_anonymous: bool = option(
        False,
        "without mTLS there is no identity: allow such "
        "callers as identity 'anonymous' (development only)",
    )


@dataclass(frozen=True)
class LimitValues:
    """Per-job resource limits; 0 means unlimited."""

    cpu_seconds: int = option(0, LIMIT_BY_NAME["cpu_seconds"].help, lo=0)
    memory_bytes: int = option(0, LIMIT_BY_NAME["memory_bytes"].help, lo=0)
    open_files: int = option(0, LIMIT_BY_NAME["open_files"].help, lo=0)
    processes: int = option(0, LIMIT_BY_NAME["processes"].help, lo=0)
    output_bytes: int = option(0, LIMIT_BY_NAME["output_bytes"].help, lo=0)


@dataclass(frozen=True)
class Limits:
    """``[limits.default]`` and ``[limits.max]``."""

    default: LimitValues = field(
        default_factory=LimitValues, metadata={"help": "limits applied when a request sets none"}
    )
    max: LimitValues = field(
        default_factory=LimitValues,
        metadata={"help": "largest limit a request may ask for (0: no maximum)"},
    )


@dataclass(frozen=True)
class Jobs:
    """``[jobs]``: what runs and how."""

    # Options of the util-linux trampolines, which exec'd through execvp() (an
    # ENOEXEC file would reach /bin/sh): the job spawner does both itself now.
    RETIRED: typing.ClassVar[dict[str, str]] = {
        "prlimit_path": "the job spawner sets resource limits itself",
        "setpriv_path": "the job spawner switches users itself",
    }

    policy_file: Path | None = option(None, "YAML whitelist policy (see policy.example.yaml)")
    state_dir: Path = option(Path("state"), "SQLite history and job output live here")
    output_dir: Path | None = option(None, "job output files (default: state_dir/output)")
    run_as_user: str = option("", "user jobs run as when the agent runs as root")
    allow_root: bool = option(
        False, "allow jobs to run as root (when run_as_user is empty or root)"
    )
    stop_grace_seconds: float = option(
        5.0, "SIGTERM to SIGKILL delay when stopping a job", lo=0, hi=3600
    )
    max_running: int = option(
        64, "running jobs at most; more is RESOURCE_EXHAUSTED", lo=1, hi=100000
    )
    max_streams: int = option(
        128,
        "StreamJobOutput calls served at once, all callers together (each holds up to about "
        "0.4 MB while its client does not read); more is RESOURCE_EXHAUSTED",
        lo=1,
        hi=100000,
    )
    max_streams_per_identity: int = option(
        16,
        "StreamJobOutput calls one client identity may have open at once; more is "
        "RESOURCE_EXHAUSTED",
        lo=1,
        hi=100000,
    )
    default_timeout_seconds: int = option(0, "timeout when a request sets none (0: none)", lo=0)
    max_timeout_seconds: int = option(
        0, "largest timeout a request may ask for (0: no maximum)", lo=0
    )
    on_output_cap: str = option(
        "kill",
        "what happens at the output cap: kill the job, or truncate (stop recording, let it run)",
        choices=("kill", "truncate"),
    )
    umask: str = option("0077", "umask of job processes (octal)")
    path_env: str = option("/usr/local/bin:/usr/bin:/bin", "PATH given to jobs")
    dynamic_users: bool = option(
        False,
        "each job whose policy entry names no user: runs as a uid of its own, taken from "
        "dynamic_uid_min..dynamic_uid_max while it runs (no /etc/passwd entry; needs a root "
        "keeper or one with CAP_SETUID and CAP_SETGID, otherwise jobs keep the keeper's user)",
    )
    dynamic_uid_min: int = option(
        60600,
        "first uid (and gid) of the dynamic users (the default range sits between systemd's "
        "60001-60577 and its DynamicUser range 61184-65519); reserve it for the agent",
        lo=1,
        hi=4294967294,
    )
    dynamic_uid_max: int = option(
        61099, "last uid (and gid) of the dynamic users", lo=1, hi=4294967294
    )


@dataclass(frozen=True)
class Cgroups:
    """``[cgroups]``: one cgroup v2 per job (escape-proof kill, per-job limits, accounting)."""

    mode: str = option(
        "auto",
        "required: no usable cgroup subtree, no start (exit 2); auto: without one, jobs run "
        "without a cgroup (stop is then not escape-proof; said at start-up and in each job's "
        "status); off: never (benchmarks and diagnosis)",
        choices=("required", "auto", "off"),
    )
    path: Path | None = option(
        None,
        "parent cgroup (absolute, inside a cgroup2 mount) of this agent's subtree "
        "<path>/<instance>; default: under systemd the unit's delegated cgroup "
        "(Delegate=yes), otherwise <cgroup2 mount>/worker-agent",
    )
    cpu_millicores: int = option(
        0,
        "cpu.max of every job in millicores (1000 = one CPU; 0: none); needs the cpu controller",
        lo=0,
        hi=1_000_000,
    )


@dataclass(frozen=True)
class Retention:
    """``[retention]``: how long finished jobs are kept."""

    max_age_seconds: int = option(
        7 * 86400, "finished jobs older than this are removed (0: keep forever)", lo=0
    )
    max_jobs: int = option(
        10000, "finished jobs kept at most, oldest removed first (0: no limit)", lo=0
    )
    sweep_seconds: float = option(60.0, "how often retention runs", lo=0.05, hi=86400)


@dataclass(frozen=True)
class Audit:
    """``[audit]``: the security audit log (JSON lines)."""

    file: Path | None = option(
        None, "audit log path (default: state_dir/audit.log); opened append-only"
    )
    log_reads: bool = option(
        False,
        "also log allowed read-only calls (QueryJob, WaitJob, "
        "ListJobs, StreamJobOutput); denials are always logged",
    )


@dataclass(frozen=True)
class Logging:
    """``[logging]``: the operational log."""

    level: str = option(
        "info", "debug, info, warning or error", choices=("debug", "info", "warning", "error")
    )
    file: Path | None = option(
        None, "log file (default: stderr; in daemon mode state_dir/agent.log)"
    )
    syslog: bool = option(False, "log to syslog instead of a file")
    syslog_socket: Path = option(Path("/dev/log"), "the syslog daemon's socket")
    format: str = option(
        "text",
        "text, or json: one JSON object per line (time, level, logger, message, pid)",
        choices=("text", "json"),
    )


@dataclass(frozen=True)
class Metrics:
    """``[metrics]``: Prometheus metrics on a listener of their own (GET /metrics)."""

    enabled: bool = option(False, "serve Prometheus metrics on addr")
    addr: str = option(
        "127.0.0.1:9464", "host:port of the metrics listener; off loopback it needs TLS"
    )
    crt_file: Path | None = option(None, "serve the metrics over TLS with this certificate (PEM)")
    key_file: Path | None = option(None, "the metrics certificate's private key (PEM)")
    ca_file: Path | None = option(
        None, "with TLS: require scrapers' client certificates signed by this CA"
    )


@dataclass(frozen=True)
class Daemon:
    """``[daemon]``: ``agent run --daemon`` and shutdown behaviour."""

    pid_file: Path | None = option(None, "pid file for --daemon (default: state_dir/agent.pid)")
    on_shutdown: str = option(
        "stop",
        "at SIGTERM/SIGINT: stop running jobs, wait for them, or keep them running in the "
        "job keeper for the next agent",
        choices=("stop", "wait", "keep"),
    )
    shutdown_deadline_seconds: float = option(
        30.0, "longest wait for jobs at shutdown before they are stopped", lo=0, hi=86400
    )


@dataclass(frozen=True)
class Keeper:
    """``[keeper]``: the job keeper, the process that holds the jobs (docs/deployment.md,
    "Stopping, restarting, upgrading")."""

    mode: str = option(
        "child",
        "child: the agent starts its job keeper when none answers (one command; Ctrl-C stops "
        "both); service: the keeper is a service of its own (`agent keeper`, the unit "
        "worker-agent-keeper.service): the agent only attaches to it, never touches the job "
        "cgroups, and stopping or restarting the agent leaves every job running",
        choices=("child", "service"),
    )
    agent_user: str = option(
        "",
        "`agent keeper` only: the user (name or uid) whose agent may attach to the keeper's "
        "socket (default: the keeper's own user)",
    )
    wait_seconds: float = option(
        30.0,
        'mode = "service": how long the agent waits at start-up for the keeper to answer',
        lo=0,
        hi=3600,
    )


@dataclass(frozen=True)
class Confinement:
    """``[confinement]``: the per-job box (Landlock, scratch directory; see docs/security.md)."""

    landlock: str = option(
        "required",
        "required: an entry the kernel's Landlock cannot fully enforce, or any entry where "
        "libseccomp or the kernel's seccomp filters are missing, is refused at policy load; "
        "best_effort: it runs with what the kernel has, and the log says what is not enforced",
        choices=("required", "best_effort"),
    )
    max_abi: int = option(
        -1,
        "use at most this Landlock ABI (-1: the kernel's; 0: as if the kernel had no "
        "Landlock), for tests of older kernels",
        lo=-1,
        hi=1000,
    )
    seccomp: bool = option(
        True,
        "install each entry's seccomp filter on its jobs (docs/security.md); false only to "
        "measure what the filter costs (python -m bench): the log then warns at every policy "
        "load",
    )
    scratch_dir: Path | None = option(
        None,
        "each job's scratch directory (its cwd, HOME and TMPDIR, the only place it may "
        "write) is created below this, 0700, and removed when the job ends; must lie outside "
        "the config, state and audit log directories (default: /tmp/agent-scratch-UID)",
    )


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    path: Path
    grpc_server: GrpcServer = field(default_factory=GrpcServer)
    scheduler: Scheduler = field(default_factory=Scheduler)
    auth: Auth = field(default_factory=Auth)
    jobs: Jobs = field(default_factory=Jobs)
    limits: Limits = field(default_factory=Limits)
    cgroups: Cgroups = field(default_factory=Cgroups)
    retention: Retention = field(default_factory=Retention)
    audit: Audit = field(default_factory=Audit)
    logging: Logging = field(default_factory=Logging)
    daemon: Daemon = field(default_factory=Daemon)
    keeper: Keeper = field(default_factory=Keeper)
    metrics: Metrics = field(default_factory=Metrics)
    confinement: Confinement = field(default_factory=Confinement)

    @property
    def output_dir(self) -> Path:
        """Where job output files are written."""
        return self.jobs.output_dir or self.jobs.state_dir / "output"

    @property
    def db_path(self) -> Path:
        """The SQLite history database."""
        return self.jobs.state_dir / "jobs.sqlite3"

    @property
    def audit_file(self) -> Path:
        """The audit log."""
        return self.audit.file or self.jobs.state_dir / "audit.log"

    @property
    def pid_file(self) -> Path:
        """The daemon pid file."""
        return self.daemon.pid_file or self.jobs.state_dir / "agent.pid"

    @property
    def crl_paths(self) -> tuple[Path, ...]:
        """[auth] crl_files, relative ones resolved against the config file's folder."""
        base = self.path.parent
        return tuple(
            p if p.is_absolute() else base / p
            for p in (Path(v).expanduser() for v in self.auth.crl_files)
        )

    @property
    def scratch_dir(self) -> Path:
        """Where each job's scratch directory is created."""
        return self.confinement.scratch_dir or Path(f"/tmp/agent-scratch-{os.geteuid()}")

    @property
    def mtls(self) -> bool:
        """Whether client certificates are required and verified."""
        return self.grpc_server.use_tls and self.grpc_server.ca_file is not None


SECTIONS: dict[str, type] = {
    f.name: f.type if isinstance(f.type, type) else typing.get_type_hints(Config)[f.name]
    for f in dataclasses.fields(Config)
    if f.name != "path"
}


# ---------------------------------------------------------------- parsing


def load(path: str | Path) -> Config:
    """Read and validate a config file.

    Raises :class:`ConfigError` (one line naming file, section and key) for an
    unreadable file, a TOML syntax error, an unknown key, a wrong type, a
    value out of range or an unsafe combination of settings.
    """
    p = Path(path)
    return parse(read_text(p), p)


def parse(text: str, path: Path) -> Config:
    """Validate TOML text as if read from ``path`` (relative paths resolve there)."""
    cfg = Config(path=path.resolve(), **parse_tables(text, path, SECTIONS))
    _cross_checks(cfg)
    return cfg


def _cross_checks(cfg: Config) -> None:
    """What no single key says: the keys that must agree, section by section."""
    _keeper_checks(cfg)
    _listener_checks(cfg)
    _auth_checks(cfg)
    _scheduler_checks(cfg)
    _metrics_checks(cfg)
    _jobs_checks(cfg)


def _keeper_checks(cfg: Config) -> None:
    f = cfg.path
    if cfg.keeper.mode == "service" and cfg.daemon.on_shutdown != "keep":
        # The jobs belong to the keeper's service: an agent that stopped them whenever it
        # stops would turn every restart or upgrade of the agent into a loss of jobs.
        raise ConfigError(
            f,
            "daemon",
            "on_shutdown",
            f'{cfg.daemon.on_shutdown!r} with [keeper] mode = "service": the jobs belong to '
            'the keeper service and stopping the agent keeps them; set on_shutdown = "keep" '
            "(stop the keeper's service to stop the jobs)",
        )


def _listener_checks(cfg: Config) -> None:
    f = cfg.path
    gs = cfg.grpc_server
    try:
        host, _ = split_host_port(gs.addr)
    except ValueError as e:
        raise ConfigError(f, "grpc_server", "addr", f"{e}, got {gs.addr!r}") from None
    if gs.use_tls:
        if gs.crt_file is None:
            raise ConfigError(f, "grpc_server", "crt_file", "required when use_tls = true")
        if gs.key_file is None:
            raise ConfigError(f, "grpc_server", "key_file", "required when use_tls = true")
    else:
        # Plaintext is never acceptable off the machine: a job runner that
        # anybody on the network can drive is remote code execution.
        _plaintext_checks(f, "grpc_server", host, gs.allow_plaintext_loopback)
        if gs.tls13_only:
            raise ConfigError(f, "grpc_server", "tls13_only", "needs use_tls = true")
    if not cfg.mtls and not cfg.auth.allow_anonymous:
        key = "ca_file" if gs.use_tls else "use_tls"
        raise ConfigError(
            f,
            "grpc_server",
            key,
            "without a CA file no client can be identified, so every call "
            "would be denied: set ca_file (mTLS) or [auth] allow_anonymous "
            "= true",
        )


def _auth_checks(cfg: Config) -> None:
    f = cfg.path
    if cfg.mtls and cfg.auth.allow_anonymous:
        raise ConfigError(
            f,
            "auth",
            "allow_anonymous",
            "has no effect with mTLS (every client has an identity); remove it",
        )
    if cfg.mtls and not (cfg.auth.clients or cfg.auth.admins):
        raise ConfigError(
            f,
            "auth",
            "clients",
            "no identity may call the API: list at least one in clients or admins",
        )
    for key in ("clients", "admins"):
        for entry in getattr(cfg.auth, key):
            problem = pattern_problem(entry)
            if problem:
                raise ConfigError(f, "auth", key, problem)
    if cfg.auth.crl_files and not cfg.mtls:
        raise ConfigError(
            f, "auth", "crl_files", "needs mTLS (grpc_server.ca_file): there is no client to check"
        )
    overlap = set(cfg.auth.clients) & set(cfg.auth.admins)
    if overlap:
        raise ConfigError(
            f,
            "auth",
            "admins",
            f"{', '.join(sorted(overlap))} also listed in clients; list each identity once",
        )


def _scheduler_checks(cfg: Config) -> None:
    f = cfg.path
    sch = cfg.scheduler
    if sch.register:
        if not sch.addr:
            raise ConfigError(f, "scheduler", "addr", "required when register = true")
        try:
            sch_host, _ = split_host_port(sch.addr)
        except ValueError as e:
            raise ConfigError(f, "scheduler", "addr", f"{e}, got {sch.addr!r}") from None
        for a in sch.addrs:
            try:
                split_host_port(a)
            except ValueError as e:
                raise ConfigError(f, "scheduler", "addrs", f"{e}, got {a!r}") from None
        if sch.use_tls:
            for key in ("crt_file", "key_file", "ca_file"):
                if getattr(sch, key) is None:
                    raise ConfigError(
                        f,
                        "scheduler",
                        key,
                        "required when register = true (registration uses mTLS)",
                    )
        else:
            # The same rule as the listener's: registration without TLS tells an
            # unauthenticated peer where to send jobs, so it never leaves the machine.
            _plaintext_checks(f, "scheduler", sch_host, sch.allow_plaintext_loopback)
        if sch.advertise_addr:
            try:
                split_host_port(sch.advertise_addr)
            except ValueError as e:
                raise ConfigError(f, "scheduler", "advertise_addr", str(e)) from None
    if sch.calls_as:
        problem = identity_problem(sch.calls_as)
        if problem:
            raise ConfigError(f, "scheduler", "calls_as", problem)
        if not sch.use_tls:
            # Calls over the link run jobs: only a scheduler TLS verified may send them.
            raise ConfigError(
                f,
                "scheduler",
                "calls_as",
                "needs use_tls = true: without TLS the scheduler is not verified, and "
                "anything that answers on its address could run jobs here",
            )
    if len(sch.labels) > MAX_LABELS:
        raise ConfigError(f, "scheduler", "labels", f"at most {MAX_LABELS} labels")
    for k, v in sch.labels.items():
        label_error = label_problem(k, v)
        if label_error:
            raise ConfigError(f, "scheduler", "labels", label_error)
    if sch.retry_initial_seconds > sch.retry_max_seconds:
        raise ConfigError(
            f, "scheduler", "retry_initial_seconds", "must not exceed retry_max_seconds"
        )


def _jobs_checks(cfg: Config) -> None:
    f = cfg.path
    if cfg.jobs.policy_file is None:
        raise ConfigError(f, "jobs", "policy_file", "required: without a policy nothing may run")
    try:
        umask = int(cfg.jobs.umask, 8)
    except ValueError:
        raise ConfigError(
            f, "jobs", "umask", f'expected octal like "0077", got {cfg.jobs.umask!r}'
        ) from None
    if not 0 <= umask <= 0o777:
        raise ConfigError(f, "jobs", "umask", "must be between 0000 and 0777")
    mj = cfg.jobs
    if mj.dynamic_uid_min > mj.dynamic_uid_max:
        raise ConfigError(f, "jobs", "dynamic_uid_max", "must not be below dynamic_uid_min")
    if mj.dynamic_uid_min <= 65534 <= mj.dynamic_uid_max:
        # nobody's files are everybody's who maps to it (NFS, user namespaces).
        raise ConfigError(f, "jobs", "dynamic_uid_min", "the range must not hold 65534 (nobody)")
    if mj.dynamic_uid_min <= 65535 <= mj.dynamic_uid_max:
        raise ConfigError(f, "jobs", "dynamic_uid_min", "the range must not hold 65535 (16-bit -1)")
    if mj.max_timeout_seconds and mj.default_timeout_seconds > mj.max_timeout_seconds:
        raise ConfigError(
            f, "jobs", "default_timeout_seconds", "must not exceed max_timeout_seconds"
        )
    for fld in dataclasses.fields(LimitValues):
        d = getattr(cfg.limits.default, fld.name)
        m = getattr(cfg.limits.max, fld.name)
        if m and (d == 0 or d > m):
            raise ConfigError(
                f,
                "limits.default",
                fld.name,
                f"must be between 1 and [limits.max] {fld.name} = {m} (0 would mean unlimited)",
            )


def _plaintext_checks(f: Path, section: str, host: str, allowed: bool) -> None:
    """use_tls = false: only on loopback, and only with allow_plaintext_loopback."""
    if not is_loopback_host(host):
        raise ConfigError(
            f,
            section,
            "use_tls",
            f"false is refused on non-loopback address {host!r}; "
            "plaintext is only possible on loopback",
        )
    if not allowed:
        raise ConfigError(
            f,
            section,
            "use_tls",
            "false needs allow_plaintext_loopback = true (development only)",
        )


def _metrics_checks(cfg: Config) -> None:
    f, m = cfg.path, cfg.metrics
    try:
        mhost, _ = split_host_port(m.addr)
    except ValueError as e:
        raise ConfigError(f, "metrics", "addr", f"{e}, got {m.addr!r}") from None
    if (m.crt_file is None) != (m.key_file is None):
        raise ConfigError(f, "metrics", "key_file", "crt_file and key_file go together")
    if m.ca_file is not None and m.crt_file is None:
        raise ConfigError(f, "metrics", "ca_file", "needs crt_file and key_file (TLS)")
    # Metrics reveal what runs here (entry names, rates, certificate dates):
    # plain HTTP only where nothing but this host can connect.
    if m.enabled and m.crt_file is None and not is_loopback_host(mhost):
        raise ConfigError(
            f, "metrics", "addr", f"{m.addr} is not loopback: set crt_file and key_file (TLS)"
        )


def describe() -> list[tuple[str, str, str, str]]:
    """Rows (section, key, default, help) of the agent's config, for documentation."""
    return describe_sections(SECTIONS)
