"""Start-up checks: everything fallible between a parsed config and a server.

:func:`prepare` turns a :class:`~agent.keeper.config.Config` into a
:class:`Prepared` bundle (policy, TLS material, job user, directories) or
raises :class:`~agent.keeper.config.ConfigError` naming the file, section and key,
which the CLI prints as one line before exiting 2. ``agent check-config``
runs exactly this and stops.

No gRPC here: it must be importable before the cipher policy is set.
"""

from __future__ import annotations

import logging
import os
import resource
import stat
from dataclasses import dataclass
from pathlib import Path

from agent import tls, x509
from agent.access import AccessRules, identity_sans
from agent.configfile import ConfigError, is_loopback_host, split_host_port
from agent.crl import CRLError, RevocationChecker
from agent.keeper import admission, cgroups
from agent.keeper import policy as policy_mod
from agent.keeper.config import Config
from agent.keeper.decision import (
    LoadError,
    confine_policy,
    deny_paths,
    job_reader,
    load_in_child,
    load_policy,
    resolve_job_user,
)
from agent.keeper.errors import AgentError
from agent.keeper.jobsettings import JobUser
from agent.keeper.preparation import (
    check_private_dir,
    check_scratch_dir,
    setup_cgroups,
    under_systemd,
)
from agent.vocabulary import CGROUP_LIMITS, LIMIT_NAMES

__all__ = [
    "Prepared",
    "confine_policy",
    "deny_paths",
    "job_reader",
    "load_policy",
    "prepare",
    "resolve_job_user",
]

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
    # The job cgroup subtree (None: jobs run without cgroups) and whether the
    # agent made it (then it removes it at shutdown; a delegated one stays).
    cgroups: cgroups.Subtree | None = None
    cgroups_owned: bool = False
    # Every loaded certificate and when it expires (warnings, a metric).
    certificates: tuple[tls.CertExpiry, ...] = ()
    # [auth] crl_files, loaded and verified (None: no CRL configured).
    revocation: RevocationChecker | None = None
    # Paths no job may ever reach, whatever the policy says (see deny_paths).
    deny: tuple[str, ...] = ()


def _err(cfg: Config, section: str, key: str, msg: str) -> ConfigError:
    return ConfigError(cfg.path, section, key, msg)


def check_cgroup_limits(cfg: Config, subtree: cgroups.Subtree | None) -> list[str]:
    """Refuse configured limits whose controller job cgroups lack; say what is missing."""
    have = subtree.controllers if subtree is not None else frozenset()

    def why(controller: str) -> str:
        if subtree is None:
            return f"needs the {controller} controller of a job cgroup, and jobs run without one"
        return (
            f"needs the {controller} controller, which job cgroups in {subtree.jobs} do not "
            "have (the limit could not be enforced)"
        )

    for name, (_, controller) in CGROUP_LIMITS.items():
        if getattr(cfg.limits.default, name) and controller not in have:
            raise _err(cfg, "limits.default", name, why(controller))
    if cfg.cgroups.cpu_millicores and "cpu" not in have:
        raise _err(cfg, "cgroups", "cpu_millicores", why("cpu"))
    if subtree is None:
        return []
    missing = [c for c in cgroups.JOB_CONTROLLERS if c not in have]
    if not missing:
        return []
    return [
        f"job cgroups in {subtree.jobs} lack the {', '.join(missing)} controller"
        f"{'s' if len(missing) > 1 else ''}: requests and policy entries needing "
        "them are refused (FAILED_PRECONDITION)"
    ]


def check_default_limits(cfg: Config) -> None:
    """Every `[limits.default]` value the agent could give a job: a default above the
    agent's own hard limit would make every start that uses it fail, blaming the caller
    (INVALID_ARGUMENT) for the agent's limit. Raises ConfigError naming the key."""
    defaults = {n: getattr(cfg.limits.default, n) for n in LIMIT_NAMES}
    for name, value in defaults.items():
        if not value:
            continue
        try:
            admission.check_kernel_limits({name: value}, admission.kernel_hard_limits([name]))
        except AgentError as e:
            raise _err(cfg, "limits.default", name, e.message) from None


def prepare(cfg: Config, *, create_dirs: bool = True) -> Prepared:
    """Validate everything the server needs; raise ConfigError naming the key.

    By phase: the TLS material, the job user and the policy, the files and directories,
    the job cgroups (``create_dirs``: `agent run`; check-config creates nothing)."""
    warnings: list[str] = []
    creds = _credentials(cfg, warnings)
    job_user, w = resolve_job_user(cfg)
    warnings.extend(w)
    deny = deny_paths(cfg)
    pol = _policy(cfg, warnings)
    _link_warnings(cfg, warnings)
    _files(cfg, deny, warnings, create_dirs=create_dirs)
    subtree, owned = _job_cgroups(cfg, warnings, create_dirs=create_dirs)
    return Prepared(
        config=cfg,
        policy=pol,
        server_pair=creds.server_pair,
        ca_pem=creds.ca_pem,
        scheduler_pair=creds.scheduler_pair,
        scheduler_ca=creds.scheduler_ca,
        job_user=job_user,
        warnings=tuple(warnings),
        cgroups=subtree,
        cgroups_owned=owned,
        certificates=tuple(creds.certificates),
        revocation=creds.revocation,
        deny=deny,
    )


@dataclass(frozen=True)
class _Credentials:
    server_pair: tls.KeyPair | None
    ca_pem: bytes | None
    scheduler_pair: tls.KeyPair | None
    scheduler_ca: bytes | None
    certificates: list[tls.CertExpiry]
    revocation: RevocationChecker | None


def _credentials(cfg: Config, warnings: list[str]) -> _Credentials:
    """The listener's and the registration's certificates, CAs and CRLs."""
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
    if sch.register and not sch.use_tls:
        warnings.append(
            f"PLAINTEXT registration with scheduler {sch.addr}: no encryption and no "
            "scheduler identity (allow_plaintext_loopback = true); never use this "
            "outside development"
        )
        assert is_loopback_host(split_host_port(sch.addr)[0])
    elif sch.register:
        assert sch.crt_file and sch.key_file and sch.ca_file
        scheduler_pair = _pair(cfg, "scheduler", sch.crt_file, sch.key_file)
        try:
            scheduler_ca = tls.load_ca(sch.ca_file)
        except tls.TLSConfigError as e:
            raise _err(cfg, "scheduler", "ca_file", str(e)) from None
    certificates = loaded_certificates(cfg, server_pair, ca_pem, scheduler_pair, scheduler_ca)
    warnings.extend(tls.expiry_warnings(certificates, gs.cert_expiry_warning_days))
    revocation = None
    if cfg.crl_paths:
        assert gs.ca_file is not None
        try:
            revocation = RevocationChecker(cfg.crl_paths, gs.ca_file)
        except CRLError as e:
            raise _err(cfg, "auth", "crl_files", str(e)) from None
    return _Credentials(server_pair, ca_pem, scheduler_pair, scheduler_ca, certificates, revocation)


def _link_warnings(cfg: Config, warnings: list[str]) -> None:
    """A calls_as that [auth] does not allow: every call over the link will be refused.

    A warning, not an error: removing an identity from [auth] by a reload must keep
    working (it revokes it), calls_as or not."""
    sch, auth = cfg.scheduler, cfg.auth
    rules = AccessRules(clients=frozenset(auth.clients), admins=frozenset(auth.admins))
    if (
        sch.register
        and sch.calls_as
        and not rules.allows(sch.calls_as, identity_sans(sch.calls_as))
    ):
        warnings.append(
            f"[scheduler] calls_as {sch.calls_as!r} is not in [auth] clients or admins: "
            "every call the scheduler sends over the link will be refused"
        )


def _policy(cfg: Config, warnings: list[str]) -> policy_mod.Policy:
    """The policy, loaded and confined as the job keeper will."""
    assert cfg.jobs.policy_file is not None
    # agent.keeper.decision.load_in_child: a loader process, so yaml stays out of the
    # agent, which decides nothing.
    try:
        loaded = load_in_child(str(cfg.path), None)
    except LoadError as e:
        raise _err(cfg, "jobs", "policy_file", str(e)) from None
    pol = loaded.policy
    warnings.extend(loaded.policy_warnings)
    if not pol.entries:
        warnings.append(
            f"the policy {cfg.jobs.policy_file} allows nothing: every StartJob will be denied"
        )
    check_default_limits(cfg)
    return pol


def _files(cfg: Config, deny: tuple[str, ...], warnings: list[str], *, create_dirs: bool) -> None:
    """Descriptors, the private directories, the audit log's and the log's places."""
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
    # A keeper service makes and checks the scratch root (it may be root's, for jobs
    # of other users): the agent only names it in the policy's Landlock rules.
    if cfg.keeper.mode == "child":
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


def _job_cgroups(
    cfg: Config, warnings: list[str], *, create_dirs: bool
) -> tuple[cgroups.Subtree | None, bool]:
    """The job cgroup subtree of a child keeper (and whether the agent made it)."""
    subtree: cgroups.Subtree | None = None
    owned = False
    if under_systemd() and cfg.keeper.mode == "child":
        warnings.append(
            '[keeper] mode = "child" under systemd: the job keeper lives in the agent\'s unit, '
            "so stopping, restarting or upgrading the agent stops every job; run the keeper "
            'as its own unit (worker-agent-keeper.service) with mode = "service"'
        )
    # `agent run` in child mode; check-config creates no cgroup, and a keeper service makes
    # its own (the agent learns where from its hello).
    if create_dirs and cfg.keeper.mode == "child":
        subtree, owned, w = setup_cgroups(cfg)
        warnings.extend(w)
        warnings.extend(check_cgroup_limits(cfg, subtree))
    return subtree, owned


def loaded_certificates(
    cfg: Config,
    server_pair: tls.KeyPair | None,
    ca_pem: bytes | None,
    scheduler_pair: tls.KeyPair | None,
    scheduler_ca: bytes | None,
) -> list[tls.CertExpiry]:
    """Expiry of every certificate the agent loaded: server leaf, CA, scheduler client/CA."""
    gs, sch = cfg.grpc_server, cfg.scheduler
    out: list[tls.CertExpiry] = []
    if server_pair is not None:
        out += tls.certificate_expiry("server", str(gs.crt_file), server_pair.cert_pem)[:1]
    if ca_pem is not None:
        out += tls.certificate_expiry("ca", str(gs.ca_file), ca_pem)
    if scheduler_pair is not None:
        out += tls.certificate_expiry(
            "scheduler-client", str(sch.crt_file), scheduler_pair.cert_pem
        )[:1]
    if scheduler_ca is not None:
        out += tls.certificate_expiry("scheduler-ca", str(sch.ca_file), scheduler_ca)
    return out


def expiry_warnings(cfg: Config) -> list[str]:
    """Re-read the configured certificate files and warn about near expiry (for SIGHUP)."""
    gs, sch = cfg.grpc_server, cfg.scheduler
    items: list[tls.CertExpiry] = []
    for role, path, leaf_only in (
        ("server", gs.crt_file, True),
        ("ca", gs.ca_file, False),
        ("scheduler-client", sch.crt_file if sch.register else None, True),
        ("scheduler-ca", sch.ca_file if sch.register else None, False),
    ):
        if path is None:
            continue
        try:
            got = tls.certificate_expiry(role, path, path.read_bytes())
        except (OSError, x509.DERError):
            continue
        items += got[:1] if leaf_only else got
    return tls.expiry_warnings(items, gs.cert_expiry_warning_days)


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
