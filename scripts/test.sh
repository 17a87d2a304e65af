#!/bin/sh
# Runs the test suite in a fresh virtual environment (.venv-test, made from
# scratch every time, so a missing install step cannot hide).
#   scripts/test.sh                 the whole default suite
#   scripts/test.sh -m systemd      the real-systemd tier (boots a container)
#   scripts/test.sh PYTEST-ARGS...  anything else pytest accepts
# Debian packages the tests need are installed when missing (as root).
set -eu
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

need=""
for pair in openssl:openssl prlimit:util-linux setpriv:util-linux ip:iproute2 ps:procps sslscan:sslscan systemd-analyze:systemd; do
    cmd=${pair%%:*} pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || need="$need $pkg"
done
if [ -n "$need" ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "test: installing Debian packages:$need" >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
    else
        echo "test: missing packages:$need (install them, or run as root)" >&2
        exit 1
    fi
fi

case " $* " in
    *" systemd "*|*"-m systemd"*)
        # systemd-nspawn, debootstrap and friends for the real-systemd tier
        scripts/systemd_tier_setup.sh ;;
esac

rm -rf .venv-test
"$python" -m venv .venv-test
.venv-test/bin/pip install --quiet --disable-pip-version-check --upgrade pip
.venv-test/bin/pip install --quiet --disable-pip-version-check ".[test]"

if [ $# -eq 0 ]; then
    set -- -m "not systemd"
fi
status=0
# The pytest script, not `python -m pytest`: the latter would put the
# checkout on sys.path and test the source tree instead of the package.
.venv-test/bin/pytest -p no:cacheprovider --rootdir "$PWD" "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test: pytest collected no tests: that is a failure" >&2
    exit 1
fi
exit "$status"
