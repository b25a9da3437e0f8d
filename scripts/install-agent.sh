#!/usr/bin/env bash
# Installs the hapair node agent on a server that is not a Kubernetes node:
#
#   /usr/bin/hapair-agent                          the binary (0755)
#   /usr/lib/systemd/system/hapair-agent.service   the unit (0644)
#   /etc/hapair/agent.yaml                         default config (0640), never overwritten
#   /usr/share/hapair/agent.yaml                   the default config, for comparison (0644)
#   /etc/hapair/ (0750), /var/lib/hapair/ (0700)   config/certificates and state
#
# Run it again to upgrade: the binary and unit are replaced, an existing agent.yaml (with
# its enrollment) is kept, directory modes are repaired. With --root DIR everything goes
# below DIR (packaging, tests) and systemd is left alone.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: install-agent.sh [--root DIR] [--binary PATH]
  --root DIR     install below DIR instead of / (DIR must exist)
  --binary PATH  the hapair-agent binary (default: target/release/hapair-agent of this checkout)
EOF
}

die() {
    echo "install-agent.sh: $*" >&2
    exit 1
}

src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root=""
binary="$src/target/release/hapair-agent"
while [ $# -gt 0 ]; do
    case "$1" in
        --root)
            [ $# -ge 2 ] || die "--root needs a directory"
            root="$2"
            shift 2
            ;;
        --root=*)
            root="${1#*=}"
            shift
            ;;
        --binary)
            [ $# -ge 2 ] || die "--binary needs a path"
            binary="$2"
            shift 2
            ;;
        --binary=*)
            binary="${1#*=}"
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            usage >&2
            die "unknown argument: $1"
            ;;
    esac
done

if [ -n "$root" ]; then
    [ -d "$root" ] || die "--root $root is not a directory"
    root="$(cd "$root" && pwd)"
    [ "$root" != "/" ] || root=""
fi
[ -f "$binary" ] || die "no agent binary at $binary (build it with: cargo build --release -p hapair-agent, or pass --binary)"
[ -x "$binary" ] || die "$binary is not executable"
unit_src="$src/packaging/systemd/hapair-agent.service"
config_src="$src/packaging/agent.yaml"
[ -f "$unit_src" ] && [ -f "$config_src" ] || die "packaging/ files missing below $src"

# Files belong to root on a real system; a scratch root installed by another user keeps
# that user's ownership.
owner=()
if [ "$(id -u)" -eq 0 ]; then
    owner=(-o root -g root)
elif [ -z "$root" ]; then
    die "installing into / needs root"
fi

# install(1) replaces a running binary by unlinking it first, so an upgrade while the agent
# runs is safe; the new binary takes effect at the next restart.
install "${owner[@]}" -D -m 0755 "$binary" "$root/usr/bin/hapair-agent"
install "${owner[@]}" -D -m 0644 "$unit_src" "$root/usr/lib/systemd/system/hapair-agent.service"
install "${owner[@]}" -D -m 0644 "$config_src" "$root/usr/share/hapair/agent.yaml"
install "${owner[@]}" -d -m 0750 "$root/etc/hapair"
install "${owner[@]}" -d -m 0700 "$root/var/lib/hapair"
chmod 0750 "$root/etc/hapair"
chmod 0700 "$root/var/lib/hapair"

config="$root/etc/hapair/agent.yaml"
if [ -e "$config" ] || [ -L "$config" ]; then
    echo "kept existing $config (defaults for comparison: $root/usr/share/hapair/agent.yaml)"
else
    install "${owner[@]}" -m 0640 "$config_src" "$config"
    echo "installed default $config"
fi
echo "installed $root/usr/bin/hapair-agent and $root/usr/lib/systemd/system/hapair-agent.service"

if [ -z "$root" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi

cat <<EOF

Next steps on this server (as root):
  1. Enroll it with the controller (NOTES of the hapair Helm release show the address,
     the CA fingerprint and how to create a token):
       hapair-agent enroll --controller https://ADDRESS:8443 --token TOKEN --node NAME --ca-fingerprint SHA256
  2. Start the agent now and at every boot:
       systemctl enable --now hapair-agent
  3. Services the HaGroup's flow starts must not start at boot by themselves (the agent
     starts them on the active node only):
       systemctl disable SERVICE
  4. For replicated volumes, load the nbd module at boot:
       echo nbd > /etc/modules-load.d/hapair.conf
EOF
