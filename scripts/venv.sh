#!/bin/sh
# Makes the checkout's development virtual environment .venv (again when
# pyproject.toml changed): the agent installed editable with its dependencies
# from PyPI. Used by run-agent.sh and pki.sh; prints nothing when it is current.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
stamp=$root/.venv/.installed-$(sha256sum "$root/pyproject.toml" | cut -c1-16)
if [ ! -e "$stamp" ]; then
    echo "venv: creating $root/.venv" >&2
    rm -rf "$root/.venv"
    "$python" -m venv "$root/.venv"
    "$root/.venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip
    "$root/.venv/bin/pip" install --quiet --disable-pip-version-check -e "$root"
    touch "$stamp"
fi
