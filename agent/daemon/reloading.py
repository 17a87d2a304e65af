"""SIGHUP: certificates, CRL, policy, ``[auth]`` and the audit log file; jobs keep running.

Whatever is rejected keeps its previous version and is named in the status line and in
the reload record ``agent reload`` waits for (agent/daemon/reloadstatus.py). A rejected
config file also keeps the policy: the reload applies the files together or not at all.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

from agent.configfile import ConfigError
from agent.daemon import reloadstatus
from agent.daemon.assembly import Listener, access_rules
from agent.daemon.audit import AuditLog
from agent.daemon.keeperclient import KeeperClient
from agent.daemon.startup import Prepared, expiry_warnings
from agent.keeper import config as config_mod
from agent.keeper.config import Config

log = logging.getLogger(__name__)

# What a SIGHUP applies; every other changed key is logged and needs a restart.
RELOADABLE_SECTIONS = frozenset({"auth"})


def config_changes(old: Any, new: Any, section: str = "") -> list[tuple[str, str, Any, Any]]:
    """(section, key, old, new) for every key that differs between two configs."""
    out: list[tuple[str, str, Any, Any]] = []
    for f in dataclasses.fields(old):
        if f.name == "path":
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if dataclasses.is_dataclass(a) and not isinstance(a, type):
            out.extend(config_changes(a, b, f"{section}.{f.name}" if section else f.name))
        elif a != b:
            out.append((section, f.name, a, b))
    return out


class Reloader:
    """Applies a SIGHUP to the parts of a running agent."""

    def __init__(
        self,
        config: Config,
        prepared: Prepared,
        audit: AuditLog,
        keeper: KeeperClient,
        listener: Listener,
    ) -> None:
        self.config = config
        self.prepared = prepared
        self.audit = audit
        self.keeper = keeper
        self.listener = listener
        self.reloads = 0
        # What the last reload rejected ("policy", "config", ...); shown in STATUS=.
        self.rejected: tuple[str, ...] = ()

    async def reload(self) -> None:
        """Reload everything (see the module's docstring) and record the outcome."""
        started = time.monotonic()
        log.info("reloading (SIGHUP)")
        rejected: list[tuple[str, str]] = []
        certs = self.listener.reloader
        if certs is not None:
            certs.check()
            if certs.error:
                rejected.append(("certificates", certs.error))
        if self.prepared.revocation is not None:
            self.prepared.revocation.check(force=True)
            rejected += [("CRL", e) for e in self.prepared.revocation.errors]
        for w in expiry_warnings(self.config):
            log.warning("%s", w)
        config_error = self._reload_config()
        if config_error is not None:
            rejected.append(("config", config_error))
        else:
            policy_error = await self._reload_policy()
            if policy_error is not None:
                rejected.append(("policy", policy_error))
        try:
            self.audit.reopen()
        except OSError as e:
            log.error("cannot reopen the audit log: %s", e)
            rejected.append(("audit log", str(e)))
        self.rejected = tuple(dict.fromkeys(what for what, _ in rejected))
        if self.rejected:
            log.error(
                "reload rejected (%s): the agent carries on with the previous version",
                ", ".join(self.rejected),
            )
        self.reloads += 1
        outcome = reloadstatus.Outcome(os.getpid(), self.reloads, started, tuple(rejected))
        try:
            reloadstatus.write(self.config.jobs.state_dir, outcome)
        except OSError as e:
            log.error("cannot record the reload's outcome for `agent reload`: %s", e)

    async def _reload_policy(self) -> str | None:
        """Make the job keeper read the policy again from its own config file (the agent
        decides no start and hands the keeper no policy); why it was rejected, or None."""
        try:
            answer = await self.keeper.reload()
            error = str(answer.get("error", ""))
            entries = int(answer.get("entries", 0))
            warnings = [str(w) for w in answer.get("warnings", [])]
        except (OSError, ValueError, TypeError) as e:
            error = f"the job keeper could not reload the policy: {e}"
            entries, warnings = 0, []
        if error:
            log.error("policy reload rejected, keeping the current policy: %s", error)
            self.audit.record("policy_reload", decision="error", reason=error)
            return error
        for w in warnings:
            log.warning("%s", w)
        log.info("policy reloaded: %d entr%s", entries, "y" if entries == 1 else "ies")
        self.audit.record("policy_reload", decision="ok", reason=f"{entries} entries")
        return None

    def _reload_config(self) -> str | None:
        """Apply ``[auth]`` from the config file; log every other change as ignored.

        Returns why the file was rejected, or None.
        """
        old = self.config
        try:
            new = config_mod.load(old.path)
        except ConfigError as e:
            log.error(
                "configuration reload rejected, keeping the current settings and policy: %s", e
            )
            self.audit.record("config_reload", decision="error", reason=str(e))
            return str(e)
        for section, key, was, now in config_changes(old, new):
            if section in RELOADABLE_SECTIONS:
                continue
            log.warning(
                "%s: [%s] %s changed to %r: takes effect only after a restart; keeping %r",
                old.path,
                section,
                key,
                _shown(now),
                _shown(was),
            )
        if new.auth == old.auth:
            return None
        self.config = dataclasses.replace(old, auth=new.auth)
        # Every call from now on, on every connection, is decided with the new lists:
        # removing an identity revokes it without a restart.
        self.listener.service.set_access(access_rules(self.config))
        a = new.auth
        log.info("[auth] reloaded: %d client(s), %d admin(s)", len(a.clients), len(a.admins))
        self.audit.record(
            "config_reload",
            decision="ok",
            reason=f"[auth] clients={sorted(a.clients)} admins={sorted(a.admins)}",
        )
        return None


def _shown(value: Any) -> Any:
    return str(value) if isinstance(value, os.PathLike) else value
