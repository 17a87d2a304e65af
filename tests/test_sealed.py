"""Sealed execution: one regression test per attack class, over real gRPC.

Every sentinel program here appends to a marker file if it ever runs; the
marker must stay empty. The classes: an untrusted or nested ``#!``
interpreter, a file that is neither ELF nor ``#!``, pinned files rewritten
while jobs start, oversize requests, argument errors next to entries
restricted to someone else, limits the kernel cannot give, and
certificates whose identity could be read two ways.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509 as cx
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import certfactory as cf
from helpers import (
    IS_ROOT,
    AgentFactory,
    AgentProcess,
    make_safe_dir,
    pb,
    pb_grpc,
    policy_for,
    write_script,
)

# Every test here runs on the C vfork spawn path and on the Python fork fallback.
pytestmark = pytest.mark.usefixtures("spawn_path")

TIMEOUT = 20
BASH = os.path.realpath("/bin/bash")
needs_root = pytest.mark.skipif(not IS_ROOT, reason="chown to another uid needs root")


@pytest.fixture
def safe() -> Iterator[Path]:
    """A StrictModes-safe folder with an empty marker file."""
    d = make_safe_dir()
    (d / "marker").write_text("")
    os.chmod(d / "marker", 0o666)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def marker(d: Path) -> str:
    return (d / "marker").read_text()


def sentinel(d: Path, name: str, first_line: str) -> Path:
    """A program that writes to the marker if it ever runs."""
    return write_script(d, name, f"{first_line}\necho ran >> {d}/marker\n")


def entry(name: str, command: Path, extra: str = "") -> str:
    return f"""  - name: {name}
    command: {command}
    aliases: [{name}]
{extra}"""


@contextlib.contextmanager
def stub_for(a: AgentProcess, who: str) -> Iterator[pb_grpc.WorkerStub]:
    """A raw stub for identity ``who`` (channel closed on exit)."""
    with grpc.secure_channel(a.addr, a.certs.creds(who)) as ch:
        yield pb_grpc.WorkerStub(ch)


def start(a: AgentProcess, req: pb.StartJobReq, who: str = "client") -> grpc.RpcError | str:
    """StartJob: the job id, or the RpcError."""
    with stub_for(a, who) as stub:
        try:
            return str(stub.StartJob(req, timeout=TIMEOUT).jobID)
        except grpc.RpcError as e:
            return e


def code_of(r: grpc.RpcError | str) -> grpc.StatusCode | None:
    return r.code() if isinstance(r, grpc.RpcError) else None


# ---------------------------------------------------------------- 1: the #! chain


def _interp_cases(safe: Path, tmp_path: Path) -> list[tuple[str, Path, str]]:
    ww = tmp_path / "ww"  # under /tmp: a world-writable ancestor
    ww.mkdir()
    os.chmod(ww, 0o777)
    shutil.copy(BASH, ww / "bash")
    gw = safe / "gw"
    gw.mkdir(mode=0o755)
    shutil.copy(BASH, gw / "bash")
    os.chmod(gw / "bash", 0o775)
    cases = [
        ("world-writable-dir", ww / "bash", "parent-writable-by-others"),
        ("group-writable", gw / "bash", "writable-by-others"),
    ]
    if IS_ROOT:
        other = safe / "other"
        other.mkdir(mode=0o755)
        shutil.copy(BASH, other / "bash")
        os.chown(other / "bash", 12345, 12345)
        cases.append(("other-owner", other / "bash", "bad-owner"))
    return cases


def test_untrusted_interpreter_is_refused(make_agent, safe: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A #! interpreter in a world-writable dir, group-writable or foreign-owned: refused."""
    cases = _interp_cases(safe, tmp_path)
    progs = {n: sentinel(safe, f"{n}.prog", f"#!{interp}") for n, interp, _ in cases}
    a = make_agent(policy_for(safe, "".join(entry(n, p) for n, p in progs.items())))
    for name, _, rule in cases:
        r = start(a, pb.StartJobReq(command=name))
        assert code_of(r) is grpc.StatusCode.PERMISSION_DENIED, (name, r)
        assert isinstance(r, grpc.RpcError) and f"interpreter-{rule}" in (r.details() or "")
    time.sleep(0.3)
    assert marker(safe) == ""


def test_nested_and_non_elf_interpreters_and_formats_are_refused(make_agent, safe: Path) -> None:  # type: ignore[no-untyped-def]
    """Nested #!, an interpreter that is not ELF, a fake ELF and no magic: refused at decision."""
    inner = sentinel(safe, "inner.sh", "#!/bin/bash")
    fake = safe / "fake-elf"
    fake.write_bytes(b"\x7fELX" + f"\necho ran >> {safe}/marker\n".encode())
    os.chmod(fake, 0o755)
    progs = {
        "nested": (sentinel(safe, "nested.prog", f"#!{inner}"), "interpreter-nested-script"),
        "notelf": (sentinel(safe, "notelf.prog", f"#!{fake}"), "interpreter-not-elf"),
        "fakeelf": (fake, "not-executable-format"),
        "nomagic": (sentinel(safe, "nomagic.prog", "# no #! line"), "not-executable-format"),
    }
    a = make_agent(policy_for(safe, "".join(entry(n, p) for n, (p, _) in progs.items())))
    for name, (_, rule) in progs.items():
        r = start(a, pb.StartJobReq(command=name))
        assert code_of(r) is grpc.StatusCode.FAILED_PRECONDITION, (name, r)
        assert isinstance(r, grpc.RpcError) and rule in (r.details() or "")
    time.sleep(0.3)
    assert marker(safe) == ""


# ---------------------------------------------------------------- 2: pins mean the bytes


GOOD = "#!/bin/bash\necho good\n"


def _bad(d: Path) -> str:
    return f"#!/bin/bash\necho ran >> {d}/marker\n"


@contextlib.contextmanager
def _rewriting(path: Path, good: str, bad: str, seconds: float) -> Iterator[threading.Event]:
    """A thread that rewrites ``path`` in place and renames over it, until told to stop."""
    stop = threading.Event()

    def run() -> None:
        i = 0
        deadline = time.monotonic() + seconds + 5
        while not stop.is_set() and time.monotonic() < deadline:
            i += 1
            if i % 2:
                with open(path, "r+") as f:  # same inode, new bytes
                    f.write(bad)
                    f.truncate()
                with open(path, "r+") as f:
                    f.write(good)
                    f.truncate()
            else:
                tmp = path.with_name(path.name + ".new")
                tmp.write_text(bad)
                os.chmod(tmp, 0o755)
                os.replace(tmp, path)  # a new inode renamed over
                tmp.write_text(good)
                os.chmod(tmp, 0o755)
                os.replace(tmp, path)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield stop
    finally:
        stop.set()
        t.join()


def _race(a: AgentProcess, req: pb.StartJobReq, seconds: float = 2.0) -> list[str]:
    """Run jobs for ``seconds``; the outputs of those that ran."""
    outputs: list[str] = []
    deadline = time.monotonic() + seconds
    with stub_for(a, "client") as stub:
        while time.monotonic() < deadline:
            try:
                res = stub.RunJob(req, timeout=TIMEOUT)
            except grpc.RpcError as e:
                assert e.code() in (
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.FAILED_PRECONDITION,
                ), e
                continue
            out = b"".join(
                c.data
                for c in stub.StreamJobOutput(
                    pb.StreamJobOutputReq(jobID=res.jobID), timeout=TIMEOUT
                )
            ).decode()
            if res.state == pb.FAILED and not out:
                continue  # refused at start: nothing ran
            outputs.append(out)
    return outputs


def test_pinned_program_rewritten_during_starts_runs_only_pinned_bytes(
    make_agent: AgentFactory,
    safe: Path,
) -> None:
    """A pinned program rewritten in place / renamed over in a loop: every run is the pinned one."""
    prog = write_script(safe, "pinned.prog", GOOD)
    pin = hashlib.sha256(GOOD.encode()).hexdigest()
    a = make_agent(policy_for(safe, entry("pinned", prog, f'    sha256: "{pin}"\n')))
    with _rewriting(prog, GOOD, _bad(safe), 2.0):
        outputs = _race(a, pb.StartJobReq(command="pinned"))
    time.sleep(0.3)
    assert marker(safe) == ""
    assert outputs and all(o == "good\n" for o in outputs), outputs[:5]


def test_pinned_script_rewritten_during_starts_runs_only_pinned_bytes(
    make_agent: AgentFactory,
    safe: Path,
) -> None:
    """A pinned script rewritten in place / renamed over in a loop: every run is the pinned one."""
    script = write_script(safe, "pinned.sh", GOOD)
    pin = hashlib.sha256(GOOD.encode()).hexdigest()
    extra = f"""  - name: pinned-script
    command: /bin/bash
    aliases: [pinned-bash]
    scripts: [{{path: "{script}", sha256: "{pin}"}}]
"""
    a = make_agent(policy_for(safe, extra))
    with _rewriting(script, GOOD, _bad(safe), 2.0):
        outputs = _race(a, pb.StartJobReq(command="pinned-bash", path=str(script)))
    time.sleep(0.3)
    assert marker(safe) == ""
    assert outputs and all(o == "good\n" for o in outputs), outputs[:5]


# ---------------------------------------------------------------- 3: bounds before work


def test_list_jobs_with_250k_states_is_invalid_argument(agent: AgentProcess) -> None:
    """ListJobs with 250,000 states: INVALID_ARGUMENT, no traceback in the log."""
    with stub_for(agent, "admin") as stub, pytest.raises(grpc.RpcError) as ei:
        stub.ListJobs(pb.ListJobsReq(states=[pb.RUNNING] * 250_000), timeout=TIMEOUT)
    assert ei.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "Traceback" not in agent.log()


@pytest.mark.parametrize(
    "req",
    [
        pb.StartJobReq(command="true", args=["a"] * 200_000),
        pb.StartJobReq(command="true", env={f"V{i}": "x" for i in range(50_000)}),
        pb.StartJobReq(command="true", path="p", secretArgs=list(range(300_000))),
        pb.StartJobReq(command="x" * 1_000_000),
        pb.StartJobReq(command="echo", path="p" * 1_000_000),
        pb.StartJobReq(command="echo", path="p", args=["y" * 100_000] * 20),
    ],
    ids=["args", "env", "secret-args", "command", "path", "total"],
)
def test_oversize_start_requests_are_invalid_argument(
    agent: AgentProcess, req: pb.StartJobReq
) -> None:
    """Every oversize repeated field or string of StartJob: INVALID_ARGUMENT, nothing else."""
    with stub_for(agent, "client") as stub, pytest.raises(grpc.RpcError) as ei:
        stub.StartJob(req, timeout=TIMEOUT)
    assert ei.value.code() is grpc.StatusCode.INVALID_ARGUMENT, ei.value.details()
    assert "Traceback" not in agent.log()


@pytest.mark.parametrize(
    "req",
    [
        pb.ListJobsReq(owner="o" * 500_000),
        pb.ListJobsReq(pageToken="t" * 500_000),
    ],
    ids=["owner", "page-token"],
)
def test_oversize_list_requests_are_invalid_argument(
    agent: AgentProcess, req: pb.ListJobsReq
) -> None:
    """An oversize owner or page token: INVALID_ARGUMENT."""
    with stub_for(agent, "admin") as stub, pytest.raises(grpc.RpcError) as ei:
        stub.ListJobs(req, timeout=TIMEOUT)
    assert ei.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_oversize_job_id_is_invalid_argument(agent: AgentProcess) -> None:
    """A megabyte jobID: INVALID_ARGUMENT on every RPC that takes one."""
    big = "0" * 1_000_000
    with stub_for(agent, "admin") as stub:
        calls: list[tuple[Any, Any]] = [
            (stub.QueryJob, pb.QueryJobReq(jobID=big)),
            (stub.StopJob, pb.StopJobReq(jobID=big)),
            (stub.WaitJob, pb.WaitJobReq(jobID=big)),
        ]
        for method, req in calls:
            with pytest.raises(grpc.RpcError) as ei:
                method(req, timeout=TIMEOUT)
            assert ei.value.code() is grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------- 4: codes, no leaks


def test_argument_errors_ignore_entries_restricted_to_others(make_agent, safe: Path) -> None:  # type: ignore[no-untyped-def]
    """Too many arguments next to a sibling for another identity: INVALID_ARGUMENT, no leak."""
    extra = """  - name: secret-sibling
    command: /bin/echo
    aliases: [shared]
    identities: [admin]
    args: {max_count: 50}
  - name: public
    command: /bin/echo
    aliases: [shared]
    args: {max_count: 1, max_length: 4}
  - name: admins-only
    command: /bin/echo
    aliases: [hidden]
    identities: [admin]
"""
    a = make_agent(policy_for(safe, extra))
    for args in (["a", "b", "c"], ["toolong"]):
        r = start(a, pb.StartJobReq(command="shared", path="x", args=args))
        assert code_of(r) is grpc.StatusCode.INVALID_ARGUMENT, r
        assert isinstance(r, grpc.RpcError)
        text = r.details() or ""
        assert "secret-sibling" not in text and "admin" not in text, text
    hidden = start(a, pb.StartJobReq(command="hidden"))
    unknown = start(a, pb.StartJobReq(command="nosuch"))
    assert isinstance(hidden, grpc.RpcError) and isinstance(unknown, grpc.RpcError)
    assert hidden.code() is unknown.code() is grpc.StatusCode.PERMISSION_DENIED
    assert (hidden.details() or "").replace("hidden", "X") == (unknown.details() or "").replace(
        "nosuch", "X"
    )


# ---------------------------------------------------------------- 5: limits vs the kernel


def test_limits_the_kernel_cannot_give_are_invalid_argument(agent: AgentProcess) -> None:
    """Above the agent's hard rlimit, or not fitting rlim_t: INVALID_ARGUMENT naming the limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    cases = [
        ("cpu_seconds", pb.Limits(cpuSeconds=2**64 - 1)),
        ("cpu_seconds", pb.Limits(cpuSeconds=2**64 - 3)),
        ("memory_bytes", pb.Limits(memoryBytes=2**64 - 1)),
    ]
    if hard != resource.RLIM_INFINITY:
        cases.append(("open_files", pb.Limits(openFiles=hard + 1)))
    for name, limits in cases:
        r = start(agent, pb.StartJobReq(command="true", limits=limits))
        assert code_of(r) is grpc.StatusCode.INVALID_ARGUMENT, (name, r)
        assert isinstance(r, grpc.RpcError) and name in (r.details() or "")
    assert "Traceback" not in agent.log()


# ---------------------------------------------------------------- 6: ambiguous identities


def _forged(
    a: AgentProcess, tmp_path: Path, name: str, attrs: list[cx.NameAttribute[str]], sans: list[str]
) -> grpc.ChannelCredentials:
    ca = cf.load_issuer(a.certs.ca, a.certs.key("ca"))
    key = cf.new_key()
    b = (
        cx.CertificateBuilder()
        .subject_name(cx.Name(attrs))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(cx.random_serial_number())
        .not_valid_before(cf.NOW - cf.DAY)
        .not_valid_after(cf.NOW + cf.DAY)
        .add_extension(cx.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if sans:
        b = b.add_extension(
            cx.SubjectAlternativeName([cx.DNSName(s) for s in sans]), critical=False
        )
    cert = b.sign(ca.key, hashes.SHA256())
    crt, keyp = cf.write_pair(tmp_path, name, cert, key)
    return grpc.ssl_channel_credentials(
        a.certs.ca.read_bytes(), keyp.read_bytes(), crt.read_bytes()
    )


@pytest.mark.parametrize(
    ("name", "attrs", "sans"),
    [
        (
            "two-cns",
            [
                cx.NameAttribute(NameOID.COMMON_NAME, "admin"),
                cx.NameAttribute(NameOID.COMMON_NAME, "mallory"),
            ],
            [],
        ),
        (
            "two-cns-reversed",
            [
                cx.NameAttribute(NameOID.COMMON_NAME, "mallory"),
                cx.NameAttribute(NameOID.COMMON_NAME, "admin"),
            ],
            [],
        ),
        ("comma-trick", [cx.NameAttribute(NameOID.COMMON_NAME, "admin,CN=mallory")], []),
        ("control-char", [cx.NameAttribute(NameOID.COMMON_NAME, "admin\n")], []),
        (
            "no-cn-two-sans",
            [cx.NameAttribute(NameOID.ORGANIZATION_NAME, "o")],
            ["admin", "mallory"],
        ),
    ],
)
def test_ambiguous_identity_is_unauthenticated_and_audited(
    agent: AgentProcess,
    tmp_path: Path,
    name: str,
    attrs: list[cx.NameAttribute[str]],
    sans: list[str],
) -> None:
    """A subject that could be read as two identities: UNAUTHENTICATED, audited, nothing runs."""
    creds = _forged(agent, tmp_path, name, attrs, sans)
    with grpc.secure_channel(agent.addr, creds) as ch:
        stub = pb_grpc.WorkerStub(ch)
        with pytest.raises(grpc.RpcError) as ei:
            stub.StartJob(pb.StartJobReq(command="true"), timeout=TIMEOUT)
    assert ei.value.code() is grpc.StatusCode.UNAUTHENTICATED, ei.value.details()
    audited = [x for x in agent.audit_lines() if x.get("rule") == "bad-client-cert"]
    assert audited and audited[-1]["decision"] == "deny"
    assert not agent.output_files()
