#!/bin/sh
# Runs the test suite in a fresh virtual environment (.venv-test, made from
# scratch every time, so a missing install step cannot hide).
#   scripts/test.sh                 the whole default suite (-m "not systemd")
#   scripts/test.sh -m systemd      the real-systemd tier (boots a container)
#   scripts/test.sh PYTEST-ARGS...  anything else pytest accepts; without a -m of
#                                   your own the default -m "not systemd" stays
# Debian packages the tests need are installed when missing (as root); the
# real-systemd tier's set-up (root only) runs only when the -m expression can
# select its tests. AGENT_TEST_DRY_RUN=1 prints those two decisions and stops.
# AGENT_TEST_VENV_RUN=ID (set by .ci/run, one ID per CI run): .venv-test is made
# fresh by the first call with that ID and python, and reused by the next ones,
# so one CI run installs the package once per interpreter, not once per step.
# AGENT_TEST_VENV_DIR=DIR: that directory instead of .venv-test (.ci/run gives
# the 3.10 run its own, as it runs beside the systemd tier's).
set -eu
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

# The marker expression pytest will use: the last -m EXPR / -mEXPR given, if any.
marker=""
has_marker=0
want_value=0
for arg in "$@"; do
    if [ "$want_value" -eq 1 ]; then
        marker=$arg want_value=0
        continue
    fi
    case "$arg" in
        -m) has_marker=1 want_value=1 ;;
        -m*) has_marker=1 marker=${arg#-m} ;;
    esac
done
if [ "$has_marker" -eq 0 ]; then
    marker="not systemd"
    set -- -m "$marker" "$@"
fi
# Whether the expression selects tests because they are marked systemd: true with
# systemd and false without it, for some truth values of the other marker names
# (pytest's expressions are Python's and/or/not over names). "not systemd" does
# not; "systemd", "systemd and not slow" and "slow or systemd" do.
systemd_tier=$("$python" - "$marker" <<'EOF'
import itertools, re, sys
expr, word = sys.argv[1], r"[\w:+.\[\]-]+"  # a marker name, as pytest reads one
names = sorted(set(re.findall(word, expr)) - {"and", "or", "not", "systemd"})
safe = {n: f"_{i}" for i, n in enumerate(names)}
code = re.sub(word, lambda m: safe.get(m.group(), m.group()), expr)
def select(systemd, values):
    return eval(code, {"__builtins__": {}}, {"systemd": systemd, **dict(zip(safe.values(), values))})
try:
    hit = any(select(True, v) and not select(False, v)
              for v in itertools.product((False, True), repeat=len(names)))
except Exception:
    hit = "systemd" in expr  # let pytest report a malformed expression
print("yes" if hit else "no")
EOF
)
if [ "${AGENT_TEST_DRY_RUN:-}" = 1 ]; then
    echo "systemd set-up: $systemd_tier"
    for arg in "$@"; do echo "pytest arg: $arg"; done
    exit 0
fi

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

# etcd for the two-scheduler tests (tests/test_fleet_etcd.py): installed as root;
# without it those tests are skipped, saying why.
if ! command -v etcd >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "test: installing Debian package: etcd-server" >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
    else
        echo "test: etcd-server missing and not root: the etcd tests will be skipped" >&2
    fi
fi

if [ "$systemd_tier" = yes ]; then
    # systemd-nspawn, debootstrap and friends for the real-systemd tier
    scripts/systemd_tier_setup.sh
fi

venv=${AGENT_TEST_VENV_DIR:-.venv-test}
stamp=""
if [ -n "${AGENT_TEST_VENV_RUN:-}" ]; then
    stamp="$AGENT_TEST_VENV_RUN $("$python" -c 'import sys; print(sys.executable, sys.version)')"
fi
if [ -n "$stamp" ] && [ "$(cat "$venv/.made-for" 2>/dev/null)" = "$stamp" ]; then
    echo "test: reusing $venv, made earlier in this CI run" >&2
else
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip
    "$venv/bin/pip" install --quiet --disable-pip-version-check ".[test]"
    if [ -n "$stamp" ]; then
        printf '%s\n' "$stamp" >"$venv/.made-for"
    fi
fi

status=0
# The pytest script, not `python -m pytest`: the latter would put the
# checkout on sys.path and test the source tree instead of the package.
"$venv/bin/pytest" -p no:cacheprovider --rootdir "$PWD" "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test: pytest collected no tests: that is a failure" >&2
    exit 1
fi
exit "$status"
