"""The spawn plan's one schema (agent.keeper.spawnplan): every plan a SpawnSpec can
make passes it, on the sender's side as on the spawner's; a key or a descriptor role it
does not know, and every malformed field, is refused; the sender refuses to send a plan
the spawner would refuse."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.keeper import seccomp
from agent.keeper.landlock import LandlockSpec
from agent.keeper.seccomp import SeccompSpec
from agent.keeper.spawnplan import (
    CGROUP_REQUEST_KEYS,
    DESCRIPTOR_ROLES,
    PLAN_KEYS,
    SpawnSpec,
    check_plan,
    plan_of,
)

PATHS = st.lists(st.sampled_from(["/usr", "/etc/ssl", "/tmp/x"]), max_size=3).map(tuple)
PORTS = st.none() | st.lists(st.integers(1, 65535), max_size=3).map(tuple)
TEXT = st.text(st.characters(blacklist_characters="\0=", codec="utf-8"), max_size=12)


@st.composite
def specs(draw: st.DrawFn) -> SpawnSpec:
    """Any SpawnSpec the keeper can build (every optional part present or not)."""
    landlock = draw(
        st.none()
        | st.builds(
            LandlockSpec,
            read_exec=PATHS,
            read=PATHS,
            write=PATHS,
            connect_tcp=PORTS,
            bind_tcp=PORTS,
            scope_signals=st.booleans(),
            scope_abstract_unix=st.booleans(),
            deny=PATHS,
        )
    )
    groups = st.lists(st.sampled_from(sorted(seccomp.GROUPS)), max_size=3, unique=True)
    return SpawnSpec(
        argv=draw(st.lists(TEXT, min_size=1, max_size=4)),
        executable=draw(st.sampled_from(["/bin/true", "/usr/bin/python3"])),
        env=draw(st.dictionaries(TEXT.filter(bool), TEXT, max_size=4)),
        cwd=draw(st.sampled_from(["/", "/tmp"])),
        stdout_fd=1,
        uid=draw(st.none() | st.integers(0, 1 << 31)),
        gid=draw(st.none() | st.integers(0, 1 << 31)),
        umask=draw(st.integers(0, 0o777)),
        limits=draw(
            st.dictionaries(st.sampled_from(["cpu_seconds", "open_files"]), st.integers(0, 99))
        ),
        exec_fd=draw(st.none() | st.just(5)),
        script_fd=draw(st.none() | st.just(6)),
        cgroup=draw(
            st.none()
            | st.fixed_dictionaries(
                {"id": st.just("job")},
                optional={k: st.integers(1, 1 << 20) for k in CGROUP_REQUEST_KEYS},
            )
        ),
        landlock=landlock,
        landlock_abi=draw(st.integers(0, 7)),
        scratch=draw(st.none() | st.just("/var/lib/scratch/job")),
        capabilities=draw(st.lists(st.integers(0, 40), max_size=3)),
        no_new_privs=draw(st.booleans()),
        seccomp=draw(
            st.none()
            | st.builds(
                SeccompSpec,
                udp=st.booleans(),
                allow=groups.map(tuple),
                listen=st.sampled_from(seccomp.LISTEN_MODES),
            )
        ),
    )


@settings(max_examples=300, deadline=None)
@given(specs())
def test_every_plan_a_spec_makes_passes_the_schema(spec: SpawnSpec) -> None:
    """The sender's wire form and the spawner's check are one schema: nothing the keeper
    builds is refused, and every key it writes is one the schema knows."""
    plan, roles, fds = plan_of(spec)
    assert check_plan(plan, dict(zip(roles, fds, strict=True))) == ""
    assert set(plan) <= PLAN_KEYS and set(roles) <= DESCRIPTOR_ROLES
    assert len(roles) == len(set(roles)) == len(fds)


def _plan() -> tuple[dict[str, Any], dict[str, int]]:
    spec = SpawnSpec(
        argv=["true"],
        executable="/bin/true",
        env={"A": "1"},
        cwd="/",
        stdout_fd=1,
        uid=None,
        gid=None,
        umask=0o077,
        limits={},
        cgroup={"id": "j", "pids": 10},
        landlock=LandlockSpec(read_exec=("/usr",)),
        landlock_abi=4,
        seccomp=SeccompSpec(),
    )
    plan, roles, fds = plan_of(spec)
    return plan, dict(zip(roles, fds, strict=True))


BAD: list[tuple[str, Any, str]] = [
    ("hostile", 1, "unknown key 'hostile'"),
    ("argv", [], "argv"),
    ("argv", ["a", 1], "argv"),
    ("env", {"A=B": "1"}, "NUL byte or '='"),
    ("env", {"A": "\0"}, "NUL byte or '='"),
    ("path", "bin/true", "not an absolute path"),
    ("cwd", "tmp", "cwd"),
    ("umask", 0o1000, "umask"),
    ("umask", "077", "umask"),
    ("uid", -1, "uid"),
    ("gid", "0", "gid"),
    ("limits", [], "limits"),
    ("cgroup", {"id": "j", "memory_bytes": 0}, "cgroup memory_bytes"),
    ("cgroup", {"id": "j", "swap": 1}, "cgroup swap"),
    ("cgroup", {"pids": 1}, "cgroup"),
    ("scratch", "relative", "scratch"),
    ("capabilities", [True], "capabilities"),
    ("capabilities", [64], "capabilities"),
    ("no_new_privs", 0, "no_new_privs"),
    ("landlock", {"read": []}, "landlock"),
    ("seccomp", {"udp": False, "allow": ["everything"], "listen": "none"}, "seccomp"),
    ("seccomp", {"udp": False, "allow": [], "listen": "all"}, "seccomp"),
]


@pytest.mark.parametrize("key,value,why", BAD, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD)])
def test_a_malformed_field_is_refused(key: str, value: Any, why: str) -> None:
    plan, fds = _plan()
    assert check_plan(plan, fds) == ""
    bad = copy.deepcopy(plan)
    bad[key] = value
    assert why in check_plan(bad, fds)


def test_descriptor_roles_are_checked() -> None:
    """An unknown role is refused; no output descriptor, or a cgroup descriptor beside a
    cgroup request, too."""
    plan, fds = _plan()
    assert "unknown descriptor role" in check_plan(plan, {**fds, "keeper": 9})
    assert "no output descriptor" in check_plan(plan, {})
    assert "a cgroup descriptor and a cgroup request" in check_plan(plan, {**fds, "cgroup": 7})


def test_the_sender_refuses_a_plan_the_spawner_would_refuse() -> None:
    """plan_of checks its own plan: a spec that makes a malformed one is an error at the
    sender, never a plan sent."""
    plan, _ = _plan()
    assert plan["cwd"] == "/"
    bad = SpawnSpec(
        argv=["true"],
        executable="/bin/true",
        env={},
        cwd="relative",
        stdout_fd=1,
        uid=None,
        gid=None,
        umask=0o077,
        limits={},
    )
    with pytest.raises(ValueError, match="cwd"):
        plan_of(bad)
