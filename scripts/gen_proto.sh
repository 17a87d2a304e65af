#!/bin/sh
# Regenerates the Python stubs in agent/_proto/ from proto/jobscheduler.proto.
#
# The stubs are committed so that `pip install .` from a clean checkout needs
# no code generator; tests/test_proto.py fails when they are stale. Run this
# after every change to the .proto, with the pinned grpcio-tools
# (requirements-dev.txt), and commit the result.
#
# The include mapping "agent/_proto=proto" makes protoc see the file as
# agent/_proto/jobscheduler.proto, so the generated *_pb2_grpc.py imports its
# messages as `from agent._proto import jobscheduler_pb2` (a package import)
# without any post-processing. Only the descriptor's file name changes; the
# wire format (package jobscheduler, service and message names) does not.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here}
cd "$here"
python -m grpc_tools.protoc \
    -Iagent/_proto=proto \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    agent/_proto/jobscheduler.proto
