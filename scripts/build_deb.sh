#!/bin/sh
# Builds the Debian package of the agent into dist/ (no root needed).
#
#   scripts/build_deb.sh [--version VERSION] [--out DIR] [--python PYTHON] [--wheelhouse DIR]
#
#   dist/worker-agent_<version>_<arch>.deb
#
# --version sets the package's version and the agent's own (`worker-agent --version`),
# default agent/__init__.py's __version__: e.g. --version 0.1.1 for an upgrade.
#
# The package is self-contained: a virtual environment in /opt/worker-agent
# with the agent and every Python dependency, built here from the local
# checkout's wheel and PyPI wheels (or --wheelhouse DIR, offline), so that
# `apt install ./worker-agent_*.deb` needs no network. Coupling: the venv is
# built with, and runs on, Debian 12's /usr/bin/python3.11 (package python3.11,
# a dependency of the .deb); compiled wheels (grpcio, cryptography) are cp311 /
# abi3 manylinux wheels for this machine's architecture. Build on Debian 12 (or
# with --python pointing at a CPython 3.11 installed as /usr/bin/python3.11 on
# the target).
#
# Layout installed:
#   /opt/worker-agent/                venv (bin/agent, bin/agentctl, bin/agent-scheduler)
#   /usr/bin/worker-agent             wrapper: AGENT_CONFIG=/etc/worker-agent/config.toml
#   /usr/bin/worker-agentctl, /usr/bin/worker-agent-scheduler   symlinks into the venv
#   /usr/lib/systemd/system/worker-agent.service (+ .d/10-certificates.conf),
#     worker-agent-keeper.service (the job keeper; the privileged variant is in the docs)
#   /usr/lib/sysusers.d/worker-agent.conf, /usr/lib/tmpfiles.d/worker-agent.conf
#   /etc/worker-agent/config.toml, policy.yaml, /etc/logrotate.d/worker-agent (conffiles)
#   /usr/share/man/man8/worker-agent.8.gz, /usr/share/doc/worker-agent/
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/dist
python=/usr/bin/python3.11
wheelhouse=""
version=""
while [ $# -gt 0 ]; do
    case "$1" in
        --version) version=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --python) python=$2; shift 2 ;;
        --wheelhouse) wheelhouse=$2; shift 2 ;;
        -h|--help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build_deb.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
# Valid both as a Debian version and as a Python (PEP 440) one: N.N.N, an optional
# aN/bN/rcN, .postN, and a +local part (0.1.1, 0.2.0rc1, 0.1.0+rebuild1).
if [ -n "$version" ] && ! printf '%s\n' "$version" |
    grep -Eqx '[0-9]+(\.[0-9]+)*((a|b|rc)[0-9]+)?(\.post[0-9]+)?(\+[a-z0-9]+(\.[a-z0-9]+)*)?'; then
    echo "build_deb.sh: --version $version: expected N.N.N, optionally aN/bN/rcN, .postN, +local" >&2
    exit 2
fi
command -v dpkg-deb >/dev/null 2>&1 || {
    echo "build_deb.sh: dpkg-deb is missing (apt-get install dpkg)" >&2; exit 1; }
[ -x "$python" ] || { echo "build_deb.sh: $python not found (apt-get install python3.11 python3.11-venv)" >&2; exit 1; }
case "$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" in
    3.11) ;;
    *) echo "build_deb.sh: $python is not Python 3.11 (Debian 12's python3)" >&2; exit 1 ;;
esac

# The job spawner's C vfork path (agent/keeper/_vspawn.c) is built into the wheel: a
# compiler and the interpreter's headers are needed (without them pip would quietly
# build a package whose spawner forks, three times slower per job).
include=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
if ! command -v cc >/dev/null 2>&1 || [ ! -f "$include/Python.h" ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "build_deb.sh: installing gcc and python3.11-dev (the spawner's C extension)" >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc python3.11-dev >/dev/null
    else
        echo "build_deb.sh: a C compiler and $include/Python.h are needed (apt-get install gcc python3.11-dev)" >&2
        exit 1
    fi
fi

[ -n "$version" ] || version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$root/agent/__init__.py")
arch=$(dpkg --print-architecture)
venv=/opt/worker-agent
deb=$root/packaging/debian

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
stage=$tmp/root
mkdir -p "$stage" "$tmp/wheels" "$out"

echo "build_deb.sh: building worker-agent $version ($arch) with $python" >&2
# The agent's own wheel, from a clean copy of the checkout (no stale build/).
mkdir "$tmp/src"
(cd "$root" && tar -cf - --exclude=./build --exclude=./dist --exclude=./.git \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=./certs .) | tar -xf - -C "$tmp/src"
sed -i "s/^__version__ = \".*\"/__version__ = \"$version\"/" "$tmp/src/agent/__init__.py"
"$python" -m pip wheel -q --no-deps -w "$tmp/wheels" "$tmp/src"
"$python" -m zipfile -l "$tmp"/wheels/worker_agent-*.whl | grep -q 'agent/keeper/_vspawn\.' || {
    echo "build_deb.sh: the wheel has no agent/keeper/_vspawn extension (see the compiler output above)" >&2
    exit 1; }

"$python" -m venv "$stage$venv"
if [ -n "$wheelhouse" ]; then
    set -- --no-index --find-links "$wheelhouse"
else
    set --
fi
"$stage$venv/bin/pip" install -q --no-compile --disable-pip-version-check "$@" \
    "$tmp"/wheels/worker_agent-*.whl
# Not needed at run time: pip/setuptools stay out of the production venv.
"$stage$venv/bin/pip" uninstall -q -y pip setuptools >/dev/null 2>&1 || true
find "$stage$venv" -name direct_url.json -delete
# The venv was made under $stage: point its scripts at the installed location.
grep -rlF "$stage$venv" "$stage$venv/bin" "$stage$venv/pyvenv.cfg" 2>/dev/null | while read -r f; do
    sed -i "s|$stage$venv|$venv|g" "$f"
done
if grep -rqF "$stage" "$stage$venv/bin"; then
    echo "build_deb.sh: staging path left in $venv/bin" >&2; exit 1
fi
rm -f "$stage$venv"/bin/activate* "$stage$venv"/bin/Activate.ps1
# Byte code for the installed paths (the unit's ProtectSystem=strict forbids
# writing it at run time); hash-based, so file times do not matter.
"$stage$venv/bin/python" -m compileall -q -j 0 --invalidation-mode unchecked-hash \
    -s "$stage" -p / "$stage$venv/lib"

install -d "$stage/usr/bin" "$stage/usr/lib/systemd/system/worker-agent.service.d" \
    "$stage/usr/lib/sysusers.d" "$stage/usr/lib/tmpfiles.d" "$stage/etc/worker-agent" \
    "$stage/etc/logrotate.d" "$stage/usr/share/man/man8" "$stage/usr/share/doc/worker-agent"
cat > "$stage/usr/bin/worker-agent" <<EOF
#!/bin/sh
# worker-agent: the agent of $venv, with the packaged configuration by default.
AGENT_CONFIG=\${AGENT_CONFIG:-/etc/worker-agent/config.toml}
export AGENT_CONFIG
exec $venv/bin/agent "\$@"
EOF
chmod 755 "$stage/usr/bin/worker-agent"
ln -s "$venv/bin/agentctl" "$stage/usr/bin/worker-agentctl"
ln -s "$venv/bin/agent-scheduler" "$stage/usr/bin/worker-agent-scheduler"
install -m 0644 "$root/systemd/worker-agent.service" "$root/systemd/worker-agent-keeper.service" \
    "$stage/usr/lib/systemd/system/"
install -m 0644 "$deb/certificates.conf" \
    "$stage/usr/lib/systemd/system/worker-agent.service.d/10-certificates.conf"
install -m 0644 "$root/systemd/worker-agent.sysusers" "$stage/usr/lib/sysusers.d/worker-agent.conf"
install -m 0644 "$root/systemd/worker-agent.tmpfiles" "$stage/usr/lib/tmpfiles.d/worker-agent.conf"
install -m 0644 "$deb/config.toml" "$deb/policy.yaml" "$stage/etc/worker-agent/"
install -m 0644 "$deb/logrotate" "$stage/etc/logrotate.d/worker-agent"
gzip -9n < "$deb/worker-agent.8" > "$stage/usr/share/man/man8/worker-agent.8.gz"
ln -s worker-agent.8.gz "$stage/usr/share/man/man8/worker-agentctl.8.gz"
install -m 0644 "$root/README.md" "$root/docs/deployment.md" "$root/policy.example.yaml" \
    "$root/systemd/worker-agent-keeper-privileged.service" "$stage/usr/share/doc/worker-agent/"

mkdir "$stage/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
    "$deb/control.in" > "$stage/DEBIAN/control"
install -m 0644 "$deb/conffiles" "$stage/DEBIAN/conffiles"
install -m 0755 "$deb/postinst" "$deb/prerm" "$deb/postrm" "$stage/DEBIAN/"

pkg=$out/worker-agent_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz -z6 --build "$stage" "$pkg" >/dev/null
echo "$pkg"
