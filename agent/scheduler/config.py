"""The reference scheduler's configuration: its sections and their validation.

``load_config`` reads ``scheduler.toml`` into frozen dataclasses (the shared
:mod:`agent.configfile` machinery); every error is a ConfigError naming the
file, the section and the key. Nothing here opens a file other than the
config itself: the certificates are read when the scheduler starts.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from agent.access import pattern_problem
from agent.configfile import (
    ConfigError,
    is_loopback_host,
    option,
    parse_tables,
    read_text,
    split_host_port,
)

__all__ = [
    "AgentsSection",
    "AuthSection",
    "LegacySection",
    "RegistrySection",
    "RunsSection",
    "SchedulerConfig",
    "ServerSection",
    "StoreSection",
    "load_config",
]


@dataclass(frozen=True)
class ServerSection:
    """``[server]``: where the scheduler listens (always mTLS)."""

    addr: str = option("127.0.0.1:50001", "host:port to listen on")
    crt_file: Path | None = option(None, "the scheduler's server certificate")
    key_file: Path | None = option(None, "its private key (0600)")
    ca_file: Path | None = option(None, "CA that signed workers' and users' certificates")


@dataclass(frozen=True)
class AuthSection:
    """``[auth]``: who may do what."""

    workers: list[str] = option(
        [],
        "certificate identities allowed to register as workers: exact names, "
        "*.dns.wildcards or spiffe://trust-domain/prefix/ (matched on SANs)",
    )
    users: list[str] = option(
        [], "identities allowed to list workers and dispatch jobs (same patterns as workers)"
    )


@dataclass(frozen=True)
class RegistrySection:
    """``[registry]``: liveness of registrations."""

    heartbeat_seconds: int = option(10, "heartbeat interval told to workers", lo=1, hi=3600)
    expire_seconds: float = option(
        30.0, "forget a worker not heard from for this long", lo=0.5, hi=86400
    )


@dataclass(frozen=True)
class AgentsSection:
    """``[agents]``: how the scheduler calls agents."""

    crt_file: Path | None = option(None, "client certificate presented to agents")
    key_file: Path | None = option(None, "its private key")
    ca_file: Path | None = option(None, "CA that signed the agents' server certificates")
    call_timeout_seconds: float = option(5.0, "deadline of every call to an agent", lo=0.1, hi=600)


@dataclass(frozen=True)
class LegacySection:
    """``[legacy]``: original workers (plaintext, no heartbeats), loopback only."""

    addr: str = option(
        "",
        "loopback host:port of a plaintext listener for original workers "
        "(development only; warns at every start); empty: off",
    )


@dataclass(frozen=True)
class StoreSection:
    """``[store]``: where workers and runs are kept across restarts."""

    backend: str = option(
        "sqlite",
        "the store: sqlite (an embedded file, one scheduler) or etcd (shared by several)",
        choices=("sqlite", "etcd"),
    )
    sqlite_file: Path = option(
        Path("scheduler-state/scheduler.db"),
        "the SQLite file (WAL); its folder is created private to the scheduler's user",
    )
    etcd_endpoints: list[str] = option(
        [], "etcd members' client addresses, host:port (several: IP addresses)"
    )
    etcd_ca_file: Path | None = option(None, "CA that signed the etcd members' certificates")
    etcd_crt_file: Path | None = option(None, "the scheduler's client certificate for etcd")
    etcd_key_file: Path | None = option(None, "its private key")
    etcd_server_name: str = option(
        "", "expected name in the members' certificates (default: the endpoint's host)"
    )
    etcd_prefix: str = option("/agent-scheduler/", "key prefix of this fleet's state in etcd")
    session_seconds: int = option(
        10,
        "lease of a scheduler's runs: another takes them over this long after it dies",
        lo=2,
        hi=3600,
    )


@dataclass(frozen=True)
class RunsSection:
    """``[runs]``: how long finished runs are kept in the store (a running one always is)."""

    keep_days: float = option(
        30.0, "prune a finished run this many days after it ended; 0: keep all", lo=0, hi=36500
    )
    keep_count: int = option(
        0,
        "keep at most this many finished runs, the newest; 0: no limit",
        lo=0,
        hi=100_000_000,
    )


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler's whole configuration."""

    path: Path
    server: ServerSection = field(default_factory=ServerSection)
    auth: AuthSection = field(default_factory=AuthSection)
    registry: RegistrySection = field(default_factory=RegistrySection)
    agents: AgentsSection = field(default_factory=AgentsSection)
    legacy: LegacySection = field(default_factory=LegacySection)
    store: StoreSection = field(default_factory=StoreSection)
    runs: RunsSection = field(default_factory=RunsSection)


_SECTIONS = {
    "server": ServerSection,
    "auth": AuthSection,
    "registry": RegistrySection,
    "agents": AgentsSection,
    "legacy": LegacySection,
    "store": StoreSection,
    "runs": RunsSection,
}


def load_config(path: str | Path) -> SchedulerConfig:
    """Read and validate a scheduler config; ConfigError names file, section and key."""
    p = Path(path)
    cfg = SchedulerConfig(path=p.resolve(), **parse_tables(read_text(p), p, _SECTIONS))
    if not cfg.store.sqlite_file.is_absolute():
        # The default of a file without [store]: beside the config, like every path.
        store = replace(cfg.store, sqlite_file=p.resolve().parent / cfg.store.sqlite_file)
        cfg = replace(cfg, store=store)
    try:
        split_host_port(cfg.server.addr)
    except ValueError as e:
        raise ConfigError(p, "server", "addr", str(e)) from None
    for section, obj in (("server", cfg.server), ("agents", cfg.agents)):
        for key in ("crt_file", "key_file", "ca_file"):
            if getattr(obj, key) is None:
                raise ConfigError(p, section, key, "required (the scheduler only speaks mTLS)")
    if not cfg.auth.workers:
        raise ConfigError(p, "auth", "workers", "no worker identity allowed: list at least one")
    for key in ("workers", "users"):
        for entry in getattr(cfg.auth, key):
            problem = pattern_problem(entry)
            if problem:
                raise ConfigError(p, "auth", key, problem)
    if cfg.store.backend == "etcd":
        _etcd_checks(p, cfg.store)
    if not math.isfinite(cfg.runs.keep_days):
        raise ConfigError(p, "runs", "keep_days", "must be a number of days, 0 to keep all")
    if cfg.registry.expire_seconds <= cfg.registry.heartbeat_seconds:
        raise ConfigError(p, "registry", "expire_seconds", "must be longer than heartbeat_seconds")
    if cfg.legacy.addr:
        try:
            host, _ = split_host_port(cfg.legacy.addr)
        except ValueError as e:
            raise ConfigError(p, "legacy", "addr", str(e)) from None
        # Whoever reaches a plaintext listener can register a worker (and so
        # receive users' jobs): never off the machine.
        if not is_loopback_host(host):
            raise ConfigError(
                p, "legacy", "addr", f"{host!r} is not loopback: plaintext is only possible there"
            )
        if cfg.legacy.addr == cfg.server.addr:
            raise ConfigError(p, "legacy", "addr", "must differ from [server] addr")
    return cfg


def _etcd_checks(p: Path, st: StoreSection) -> None:
    if not st.etcd_endpoints:
        raise ConfigError(p, "store", "etcd_endpoints", "required when backend = etcd")
    for e in st.etcd_endpoints:
        try:
            host, _ = split_host_port(e)
        except ValueError as err:
            raise ConfigError(p, "store", "etcd_endpoints", f"{err}, got {e!r}") from None
        if len(st.etcd_endpoints) > 1 and not _is_ipv4(host):
            raise ConfigError(
                p, "store", "etcd_endpoints", f"{host!r}: several members must be IPv4 addresses"
            )
    for key in ("etcd_ca_file", "etcd_crt_file", "etcd_key_file"):
        if getattr(st, key) is None:
            raise ConfigError(p, "store", key, "required when backend = etcd (etcd over mTLS)")
    if not st.etcd_prefix.startswith("/") or not st.etcd_prefix.endswith("/"):
        raise ConfigError(p, "store", "etcd_prefix", "must start and end with /")


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True
