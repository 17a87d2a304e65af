#!/bin/sh
# `agent pki` from a clone, for the CA machine: per-host certificates without
# installing the package there (which would also install and enable an agent).
#   scripts/pki.sh issue --ca-cert ca.crt --ca-key ca.key --host h01.example.com \
#       --trust-domain example.com --out out/h01.example.com
#   scripts/pki.sh sign ... | scripts/pki.sh csr ... | scripts/pki.sh --help
# Runs the checkout's .venv (made on first use by scripts/venv.sh, from PyPI);
# relative paths are the caller's. docs/deployment.md, "Issue each host's certificates".
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/venv.sh"
exec "$root/.venv/bin/agent" pki "$@"
