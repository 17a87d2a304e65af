"""The wire contract: original protocol unchanged, committed stubs current."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from helpers import ROOT, AgentProcess

# The original protocol, field for field as shared/DESIGN.md lists it. A
# client generated from nothing but this text must keep working.
ORIGINAL_PROTO = """
syntax = "proto3";
package jobscheduler;
service Worker {
  rpc StartJob(StartJobReq) returns (StartJobRes);
  rpc StopJob(StopJobReq) returns (StopJobRes);
  rpc QueryJob(QueryJobReq) returns (QueryJobRes);
}
service Scheduler {
  rpc RegisterWorker(RegisterReq) returns (RegisterRes);
  rpc DeregisterWorker(DeregisterReq) returns (DeregisterRes);
}
message StartJobReq { string command = 1; string path = 2; }
message StartJobRes { string jobID = 1; }
message StopJobReq { string jobID = 1; }
message StopJobRes { }
message QueryJobReq { string jobID = 1; }
message QueryJobRes { bool done = 1; bool error = 2; string errorText = 3; }
message RegisterReq { string address = 1; }
message RegisterRes { bool success = 1; string workerID = 2; }
message DeregisterReq { string workerID = 1; }
message DeregisterRes { bool success = 1; }
"""


def _descriptor(proto_dir: Path, name: str, out: Path) -> descriptor_pb2.FileDescriptorSet:
    from grpc_tools import protoc

    rc = protoc.main(
        [
            "protoc",
            f"-I{proto_dir}",
            f"-I{_protobuf_include()}",
            f"--descriptor_set_out={out}",
            name,
        ]
    )
    assert rc == 0
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(out.read_bytes())
    return fds


def _protobuf_include() -> str:
    import grpc_tools

    return str(Path(grpc_tools.__file__).parent / "_proto")


def test_original_contract_is_unchanged(tmp_path: Path) -> None:
    """Every original service, RPC, message and field keeps its name, number and type."""
    (tmp_path / "orig").mkdir()
    (tmp_path / "orig" / "jobscheduler.proto").write_text(ORIGINAL_PROTO)
    orig = _descriptor(tmp_path / "orig", "jobscheduler.proto", tmp_path / "o.pb").file[0]
    ours_set = _descriptor(ROOT / "proto", "jobscheduler.proto", tmp_path / "n.pb")
    ours = next(f for f in ours_set.file if f.name == "jobscheduler.proto")
    assert ours.package == orig.package == "jobscheduler"
    our_msgs = {m.name: m for m in ours.message_type}
    for m in orig.message_type:
        assert m.name in our_msgs, m.name
        our_fields = {f.number: f for f in our_msgs[m.name].field}
        for f in m.field:
            g = our_fields.get(f.number)
            assert g is not None, f"{m.name}.{f.name} removed"
            assert (g.name, g.type, g.label) == (f.name, f.type, f.label), f"{m.name}.{f.name}"
            assert not g.proto3_optional
    our_svcs = {s.name: {m.name: m for m in s.method} for s in ours.service}
    for svc in orig.service:
        for meth in svc.method:
            gm = our_svcs[svc.name][meth.name]
            assert (gm.input_type, gm.output_type) == (meth.input_type, meth.output_type)
            assert not gm.server_streaming and not gm.client_streaming


def test_committed_stubs_are_current(tmp_path: Path) -> None:
    """agent/_proto matches what scripts/gen_proto.sh makes from proto/ now."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    subprocess.run([str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True, env=env)
    for name in ("jobscheduler_pb2.py", "jobscheduler_pb2.pyi", "jobscheduler_pb2_grpc.py"):
        fresh = (tmp_path / "agent" / "_proto" / name).read_text()
        committed = (ROOT / "agent" / "_proto" / name).read_text()
        assert fresh == committed, f"agent/_proto/{name} is stale: run scripts/gen_proto.sh"


ORIGINAL_CLIENT = textwrap.dedent("""
    import sys, time, grpc
    sys.path.insert(0, sys.argv[1])
    import jobscheduler_pb2 as pb, jobscheduler_pb2_grpc as pbg
    addr, ca, crt, key, script = sys.argv[2:7]
    rd = lambda p: open(p, "rb").read()
    creds = grpc.ssl_channel_credentials(rd(ca), rd(key), rd(crt))
    stub = pbg.WorkerStub(grpc.secure_channel(addr, creds))
    # a job that succeeds
    jid = stub.StartJob(pb.StartJobReq(command="bash", path=script), timeout=10).jobID
    for _ in range(500):
        r = stub.QueryJob(pb.QueryJobReq(jobID=jid), timeout=10)
        if r.done:
            break
        time.sleep(0.01)
    assert r.done and not r.error, r
    # a job that is stopped
    jid = stub.StartJob(pb.StartJobReq(command="sleep", path="30"), timeout=10).jobID
    r = stub.QueryJob(pb.QueryJobReq(jobID=jid), timeout=10)
    assert not r.done
    stub.StopJob(pb.StopJobReq(jobID=jid), timeout=10)
    for _ in range(500):
        r = stub.QueryJob(pb.QueryJobReq(jobID=jid), timeout=10)
        if r.done:
            break
        time.sleep(0.01)
    assert r.done and r.error and r.errorText, r
    # stopping it again is fine
    stub.StopJob(pb.StopJobReq(jobID=jid), timeout=10)
    print("ORIGINAL CLIENT OK", r.errorText)
""")


def test_client_built_from_original_proto_works(
    agent: AgentProcess, script_dir: Path, tmp_path: Path
) -> None:
    """A client generated only from the original .proto starts, queries and stops jobs."""
    from grpc_tools import protoc

    (tmp_path / "jobscheduler.proto").write_text(ORIGINAL_PROTO)
    assert (
        protoc.main(
            [
                "protoc",
                f"-I{tmp_path}",
                f"--python_out={tmp_path}",
                f"--grpc_python_out={tmp_path}",
                "jobscheduler.proto",
            ]
        )
        == 0
    )
    (tmp_path / "client.py").write_text(ORIGINAL_CLIENT)
    c = agent.certs
    r = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "client.py"),
            str(tmp_path),
            agent.addr,
            str(c.ca),
            str(c.crt("client")),
            str(c.key("client")),
            str(script_dir / "hello.sh"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "ORIGINAL CLIENT OK" in r.stdout


@pytest.mark.parametrize("field", ["state", "exitCode", "signal", "pid", "startTime", "endTime"])
def test_query_res_has_new_fields(field: str) -> None:
    """The new status fields exist on QueryJobRes (additions only)."""
    from agent._proto import jobscheduler_pb2 as pb

    assert field in pb.QueryJobRes.DESCRIPTOR.fields_by_name
    assert pb.StartJobReq.DESCRIPTOR.fields_by_name["args"].is_repeated
