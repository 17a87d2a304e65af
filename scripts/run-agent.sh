#!/bin/sh
# Brings up a development agent on 127.0.0.1:50000 with mTLS:
#   - creates the virtual environment .venv (again when pyproject.toml changed)
#   - generates development certificates into certs/ if there are none
#   - runs `agent run --config config.toml` in the foreground (Ctrl-C stops it)
# Extra arguments go to `agent run` (for example --daemon).
set -eu
cd "$(dirname "$0")/.."
scripts/venv.sh
if [ ! -e certs/server.crt ] || [ ! -e certs/ca.crt ]; then
    echo "run-agent: generating development certificates in certs/" >&2
    scripts/gen_certs.sh
fi
config=config.toml
# As root, config.toml runs jobs as "nobody". A checkout below a private
# directory (/root/x, a home directory of mode 0700) is out of nobody's
# reach, and the agent refuses such a policy at start. For this development
# agent only, run the jobs as the checkout's owner instead (root needs
# allow_root), in a generated .run-agent.toml next to config.toml.
if [ "$(id -u)" -eq 0 ] && grep -q '^run_as_user = "nobody"' config.toml &&
    ! runuser -u nobody -- test -r "$PWD/examples/scripts/count.sh" 2>/dev/null; then
    owner=$(stat -c %U .)
    if [ "$owner" = root ]; then
        users='run_as_user = "root"\nallow_root = true'
    else
        users="run_as_user = \"$owner\""
    fi
    sed "s/^run_as_user = \"nobody\".*/$users/" config.toml >.run-agent.toml
    config=.run-agent.toml
    echo "run-agent: user nobody cannot read $PWD/examples/scripts; jobs of this" \
        "development agent run as $owner ($config)" >&2
fi
exec .venv/bin/agent run --config "$config" "$@"
