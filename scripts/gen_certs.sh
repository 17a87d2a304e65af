#!/bin/sh
# Generates development certificates with openssl: a CA, a server
# certificate for this machine, and client certificates.
#
#   scripts/gen_certs.sh [--out DIR] [--force] [--host NAME]... [--days N]
#                        [--agent-name NAME]
#
#   ca.crt ca.key             the CA (keep ca.key offline in production)
#   server.crt server.key     ECDSA P-256, serverAuth, SANs localhost,
#                             127.0.0.1, ::1 and every --host
#   scheduler.crt/.key        client identity "scheduler" (clientAuth);
#                             also serverAuth so the reference scheduler
#                             can serve with it (SANs as the server's)
#   client.crt/.key           client identity "client" (a second ordinary
#                             client)
#   admin.crt/.key            client identity "admin"
#   agent.crt/.key            the agent's own client identity (default
#                             "agent", --agent-name to choose), used to
#                             register with the scheduler
#   etcd-ca.crt etcd-ca.key   a CA of etcd's own: only what it signs reaches etcd
#   etcd-server.crt/.key      etcd members' client-facing certificate
#                             (serverAuth, clientAuth; SANs as the server's)
#   etcd-peer.crt/.key        etcd members' peer certificate (same usages)
#   etcd-client.crt/.key      identity "scheduler" for etcd (clientAuth): what
#                             [store] etcd_crt_file / etcd_key_file name
#
# Keys are created under umask 077, so they are 0600 from their first byte
# (never briefly readable by others). Existing files are kept unless
# --force is given. The identity of a client is its certificate's Common
# Name (see README, "Security model").
set -eu

out=""
force=0
days=825
hosts=""
agent_name=agent
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --out=*) out=${1#--out=}; shift ;;
        --force) force=1; shift ;;
        --host) hosts="$hosts $2"; shift 2 ;;
        --host=*) hosts="$hosts ${1#--host=}"; shift ;;
        --days) days=$2; shift 2 ;;
        --agent-name) agent_name=$2; shift 2 ;;
        -h|--help) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gen_certs.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$out" ]; then
    out=$(cd "$(dirname "$0")/.." && pwd)/certs
fi
command -v openssl >/dev/null 2>&1 || {
    echo "gen_certs.sh: openssl is not installed (apt-get install openssl)" >&2; exit 1; }
case "$days" in ''|*[!0-9]*) echo "gen_certs.sh: --days needs a number" >&2; exit 2 ;; esac

umask 077
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

san="DNS:localhost,IP:127.0.0.1,IP:::1"
for h in $hosts; do
    case "$h" in
        *[!0-9.]*) case "$h" in *:*) san="$san,IP:$h" ;; *) san="$san,DNS:$h" ;; esac ;;
        *) san="$san,IP:$h" ;;
    esac
done

made=""
kept=""

exists() { [ -e "$out/$1.crt" ] || [ -e "$out/$1.key" ]; }

newkey() {  # name
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
        -pkeyopt ec_param_enc:named_curve -out "$out/$1.key" 2>/dev/null
    chmod 600 "$out/$1.key"
}

newca() {  # name CN
    if [ "$force" -eq 0 ] && exists "$1"; then
        kept="$kept $1"
        return
    fi
    newkey "$1"
    openssl req -new -x509 -key "$out/$1.key" -subj "/CN=$2" \
        -days 3650 -sha256 \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$out/$1.crt" 2>/dev/null
    chmod 644 "$out/$1.crt"
    made="$made $1"
    # Leaves signed by a CA that is gone are useless: remake them all.
    force=1
}

issuer=ca
leaf() {  # name CN eku [san]   (signed by $issuer)
    name=$1 cn=$2 eku=$3 leafsan=${4:-}
    if [ "$force" -eq 0 ] && exists "$name"; then
        kept="$kept $name"
        return
    fi
    newkey "$name"
    {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature"
        echo "extendedKeyUsage=$eku"
        echo "subjectKeyIdentifier=hash"
        echo "authorityKeyIdentifier=keyid"
        [ -n "$leafsan" ] && echo "subjectAltName=$leafsan"
    } > "$tmp/$name.ext"
    openssl req -new -key "$out/$name.key" -subj "/CN=$cn" -out "$tmp/$name.csr" 2>/dev/null
    openssl x509 -req -in "$tmp/$name.csr" -CA "$out/$issuer.crt" -CAkey "$out/$issuer.key" \
        -CAcreateserial -CAserial "$tmp/ca.srl" -days "$days" -sha256 \
        -extfile "$tmp/$name.ext" -out "$out/$name.crt" 2>/dev/null
    chmod 644 "$out/$name.crt"
    made="$made $name"
}

newca ca "worker-agent dev CA"
leaf server localhost serverAuth "$san"
leaf scheduler scheduler "clientAuth,serverAuth" "$san"
leaf client client clientAuth
leaf admin admin clientAuth
case "$agent_name" in ''|*[!A-Za-z0-9_.-]*)
    echo "gen_certs.sh: --agent-name takes letters, digits, '.', '_', '-'" >&2; exit 2 ;;
esac
leaf agent "$agent_name" clientAuth

# etcd, for schedulers sharing a store ([store] backend = "etcd"): its own CA.
force_main=$force
issuer=etcd-ca
newca etcd-ca "worker-agent dev etcd CA"
leaf etcd-server etcd "serverAuth,clientAuth" "$san"
leaf etcd-peer etcd-peer "serverAuth,clientAuth" "$san"
leaf etcd-client scheduler clientAuth
force=$force_main

for n in $made; do echo "made  $out/$n.crt $out/$n.key"; done
for n in $kept; do echo "kept  $out/$n.crt (exists; --force to replace)"; done
