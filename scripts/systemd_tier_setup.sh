#!/usr/bin/env bash
# Install what the systemd test tier needs (tests/systemd_tier): systemd-nspawn to boot a
# real systemd in a container, debootstrap to build its Debian rootfs.  Idempotent: a
# second run with everything present changes nothing and does not touch the network.
set -euo pipefail

packages=(systemd-container debootstrap debian-archive-keyring util-linux)

if [[ ${EUID} -ne 0 ]]; then
    echo "systemd_tier_setup.sh: must run as root (apt-get install)" >&2
    exit 1
fi

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("${pkg}")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "systemd_tier_setup.sh: all present: ${packages[*]}"
    exit 0
fi

echo "systemd_tier_setup.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Third-party sources configured on some machines are unreachable; their failure must not
# stop the install from Debian's own repositories.
apt-get update -qq || echo "systemd_tier_setup.sh: apt-get update reported errors, continuing" >&2
apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "systemd_tier_setup.sh: done"
