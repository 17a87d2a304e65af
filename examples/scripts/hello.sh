#!/bin/bash
# A sample job: greets, shows who and where it runs, and exits 0.
echo "hello from job ${AGENT_JOB_ID:-?} as $(id -un) in $(pwd)"
echo "arguments: $*"
