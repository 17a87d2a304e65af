#!/bin/sh
# Brings up a development agent on 127.0.0.1:50000 with mTLS:
#   - creates the virtual environment .venv (again when pyproject.toml changed)
#   - generates development certificates into certs/ if there are none
#   - runs `agent run --config config.toml` in the foreground (Ctrl-C stops it)
# Extra arguments go to `agent run` (for example --daemon).
set -eu
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
    echo "run-agent: creating .venv" >&2
    rm -rf .venv
    "$python" -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check --upgrade pip
    .venv/bin/pip install --quiet --disable-pip-version-check -e .
    touch "$stamp"
fi
if [ ! -e certs/server.crt ] || [ ! -e certs/ca.crt ]; then
    echo "run-agent: generating development certificates in certs/" >&2
    scripts/gen_certs.sh
fi
exec .venv/bin/agent run --config config.toml "$@"
