"""What the keeper writes, checked (and made) before it starts: its directories (state,
output, scratch) and the job cgroup subtree.

``agent keeper`` (the keeper as a service, :mod:`agent.keeper.keeperservice`) runs these
before it becomes the keeper; the agent's start-up checks run the same for a keeper it
starts itself. Every failure is a :class:`~agent.configfile.ConfigError` naming the key.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from agent.keeper import cgroups
from agent.keeper.config import Config
from agent.keeper.decision import _err, _within
from agent.keeper.jobsettings import instance_id


def check_private_dir(
    cfg: Config, section: str, key: str, path: Path, *, create: bool, owner: int | None = None
) -> None:
    """Ensure ``path`` is a directory only the agent's user can write. ``owner``: that
    user's uid, when it is not this process's (a root keeper serving another user's
    agent: a directory it creates is handed to that user)."""
    me = os.geteuid() if owner is None else owner
    if create:
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            if me != os.geteuid() and os.lstat(path).st_uid == os.geteuid():
                os.chown(path, me, -1)
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
    if st.st_uid != me:
        raise _err(
            cfg,
            section,
            key,
            f"{path}: owned by uid {st.st_uid}, not by the agent's user (uid {me})",
        )
    if st.st_mode & 0o022:
        raise _err(
            cfg,
            section,
            key,
            f"{path}: writable by group or others (mode "
            f"{st.st_mode & 0o777:04o}); run: chmod go-w {path}",
        )
    if me == os.geteuid() and not os.access(path, os.W_OK | os.X_OK):
        raise _err(cfg, section, key, f"{path}: not writable by the agent")


DEFAULT_CGROUP_PARENT = "worker-agent"


def under_systemd() -> bool:
    """Whether the agent runs as a systemd service (systemd sets INVOCATION_ID)."""
    return bool(os.environ.get("INVOCATION_ID"))


def setup_cgroups(cfg: Config) -> tuple[cgroups.Subtree | None, bool, list[str]]:
    """The job cgroup subtree per ``[cgroups]``: (subtree, made by us, warnings).

    ``required``: a subtree that cannot be had is a ConfigError (exit 2).
    ``auto``: it is one warning, and jobs run without cgroups.
    """
    c = cfg.cgroups
    if c.mode == "off":
        return None, False, [_no_cgroup_warning('[cgroups] mode = "off"')]
    systemd = under_systemd()
    configured: Path | None = None
    if c.path is not None:
        configured = c.path / instance_id(cfg.jobs.state_dir)
    elif not systemd:
        # Outside systemd: <cgroup2 mount>/worker-agent/<instance>, one
        # subtree per installation (its state directory), so agents side by
        # side never see each other's jobs as leftovers.
        try:
            mount = cgroups.choose_cgroup2_mount(
                cgroups.parse_cgroup2_mounts(Path("/proc/self/mountinfo").read_text())
            )
        except OSError:
            mount = None
        if mount is not None:
            configured = mount / DEFAULT_CGROUP_PARENT / instance_id(cfg.jobs.state_dir)
    try:
        if configured is None and not systemd:
            raise cgroups.CgroupError("no cgroup2 file system is mounted")
        subtree = cgroups.setup("required", configured, under_systemd=systemd)
    except cgroups.CgroupError as e:
        if c.mode == "required":
            raise _err(cfg, "cgroups", "mode", f'"required", but no job cgroups: {e}') from None
        return None, False, [_no_cgroup_warning(str(e))]
    assert subtree is not None
    return subtree, configured is not None, []


def _no_cgroup_warning(why: str) -> str:
    return (
        f"jobs run without cgroups ({why}): StopJob, timeouts and shutdown signal only a "
        "job's process group, which a job can leave; memory and process limits are refused"
    )


def check_scratch_dir(cfg: Config, deny: tuple[str, ...], *, create: bool) -> None:
    """The scratch root: the agent's own, 0711, outside everything jobs are denied, and
    containing none of it. Jobs reach only their own directory below it: no entry's
    Landlock rules cover the root (the spawner denies it; a job's own directory is
    granted by descriptor), so a job of the agent's own uid, which 0711 would not stop,
    cannot list it or enter another job's directory either."""
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
