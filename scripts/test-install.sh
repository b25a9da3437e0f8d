#!/usr/bin/env bash
# Tests the bare-metal agent install: scripts/install-agent.sh into a scratch root with the
# debug binary, then the files, their modes, the systemd unit (systemd-analyze verify and
# the hardening keys), the default config, the installed agent running on it (unenrolled: up
# and saying so; a typo refused by name), an upgrade that keeps an edited config, and the
# script's errors. Leaves nothing behind.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(repo_root)"

ensure_debian_packages systemd
ensure_pip_packages PyYAML

binary=target/debug/hapair-agent
[ -x "$binary" ] || cargo build --locked -p hapair-agent

scratch="$(mktemp -d -t hapair-install-test.XXXXXX)"
trap 'rm -rf "$scratch"' EXIT
root="$scratch/root"
mkdir "$root"

failures=0
fail() {
    echo "FAIL: $*" >&2
    failures=$((failures + 1))
}
check() {
    local what="$1"
    shift
    if "$@"; then echo "ok: $what"; else fail "$what"; fi
}
mode_is() {
    local want="$1" path="$2" got
    got="$(stat -c %a "$path" 2>/dev/null || echo missing)"
    [ "$got" = "$want" ] || {
        echo "  $path: mode $got, want $want" >&2
        return 1
    }
}
has_line() {
    grep -qxF -- "$1" "$unit"
}
lacks_key() {
    ! grep -qE "^$1=" "$unit"
}

echo "==> install into a scratch root"
bash scripts/install-agent.sh --root "$root" --binary "$binary" >"$scratch/first.out"
cat "$scratch/first.out"
unit="$root/usr/lib/systemd/system/hapair-agent.service"
config="$root/etc/hapair/agent.yaml"

check "binary installed 0755 and identical" eval 'mode_is 755 "$root/usr/bin/hapair-agent" && cmp -s "$binary" "$root/usr/bin/hapair-agent"'
check "installed binary runs" eval '"$root/usr/bin/hapair-agent" --version | grep -q "^hapair-agent "'
check "unit installed 0644 and identical" eval 'mode_is 644 "$unit" && cmp -s packaging/systemd/hapair-agent.service "$unit"'
check "default config installed 0640" eval 'mode_is 640 "$config" && cmp -s packaging/agent.yaml "$config"'
check "reference config in /usr/share/hapair" cmp -s packaging/agent.yaml "$root/usr/share/hapair/agent.yaml"
check "/etc/hapair is 0750" mode_is 750 "$root/etc/hapair"
check "/var/lib/hapair is 0700" mode_is 700 "$root/var/lib/hapair"
check "files owned by root" eval '[ "$(stat -c %U:%G "$root/usr/bin/hapair-agent" "$config" "$root/etc/hapair" | sort -u)" = root:root ]'
check "nothing installed outside the expected paths" eval '[ "$(cd "$root" && find . -type f | sort | tr "\n" " ")" = "./etc/hapair/agent.yaml ./usr/bin/hapair-agent ./usr/lib/systemd/system/hapair-agent.service ./usr/share/hapair/agent.yaml " ]'
check "next steps name enroll and systemctl" eval 'grep -q "hapair-agent enroll --controller https://" "$scratch/first.out" && grep -q "systemctl enable --now hapair-agent" "$scratch/first.out"'

echo "==> default config"
check "agent.yaml has the documented keys and defaults" python3 - "$config" <<'EOF'
import sys, yaml
config = yaml.safe_load(open(sys.argv[1]))
expected = {
    "apiVersion": "hapair.dev/v1alpha1",
    "kind": "AgentConfig",
    "node": "",
    "controller": "",
    "tls": {"caFile": "/etc/hapair/ca.crt", "certFile": "/etc/hapair/node.crt", "keyFile": "/etc/hapair/node.key"},
    "stateDir": "/var/lib/hapair",
    "runtimeDir": "/run/hapair",
    "endpoints": {"listen": "127.0.0.1:9464"},
    "log": {"format": "text", "level": "info"},
}
if config != expected:
    sys.exit(f"agent.yaml is {config!r}, want {expected!r}")
EOF

echo "==> systemd unit"
check "ExecStart runs the agent with the config" has_line "ExecStart=/usr/bin/hapair-agent run --config /etc/hapair/agent.yaml"
check "restarts always, quickly" eval 'has_line "Restart=always" && has_line "RestartSec=200ms"'
check "a restart leaves the flow's services running" has_line "KillMode=process"
check "no privilege gain through setuid" has_line "NoNewPrivileges=yes"
check "OOM killer spares the agent" has_line "OOMScoreAdjust=-900"
check "system-call deny list" eval 'grep -qE "^SystemCallFilter=~.*@module.*" "$unit" && has_line "SystemCallErrorNumber=EPERM"'
check "state/config/runtime directories with modes" eval 'has_line "ConfigurationDirectoryMode=0750" && has_line "StateDirectoryMode=0700" && has_line "RuntimeDirectoryPreserve=restart"'
check "capability bounding set is exactly the justified one" python3 - "$unit" <<'EOF'
import re, sys
caps = set()
for line in open(sys.argv[1]):
    m = re.match(r"^CapabilityBoundingSet=(.*)$", line.strip())
    if m:
        if m.group(1).startswith("~"):
            sys.exit("CapabilityBoundingSet must be an allow list")
        caps.update(m.group(1).split())
want = {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_ADMIN", "CAP_KILL", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH",
        "CAP_FOWNER", "CAP_CHOWN", "CAP_SETUID", "CAP_SETGID", "CAP_AUDIT_WRITE", "CAP_NET_BIND_SERVICE"}
if caps != want:
    sys.exit(f"bounding set {sorted(caps)}, want {sorted(want)}")
text = open(sys.argv[1]).read()
for cap in want:
    # Each capability is explained in the comment block above the setting.
    if not re.search(rf"^#.*{cap}\b", text, flags=re.MULTILINE):
        sys.exit(f"{cap} has no justification comment")
EOF
# These give the agent a private mount namespace or device policy: replicated-volume mounts
# would not reach the host's services, and /dev/nbd* would be closed. They must stay out.
for key in ProtectSystem ProtectHome PrivateTmp PrivateDevices ReadWritePaths ReadOnlyPaths \
    ProtectKernelTunables ProtectKernelModules ProtectControlGroups ProtectProc DeviceAllow \
    ProtectClock PrivateMounts MountFlags User DynamicUser; do
    check "unit does not set $key=" lacks_key "$key"
done
# Verify against this host's systemd units, with the paths pointing into the scratch root
# so the installed binary is the one checked for being executable.
mkdir "$scratch/verify"
sed "s#/usr/bin/hapair-agent#$root/usr/bin/hapair-agent#; s#/etc/hapair/agent.yaml#$config#" \
    "$unit" >"$scratch/verify/hapair-agent.service"
# verify exits 0 on unknown keys and unparsable values (it only warns), so any output fails.
verify_clean() {
    local out rc=0
    out="$(systemd-analyze verify --man=no "$scratch/verify/hapair-agent.service" 2>&1)" || rc=$?
    [ "$rc" -eq 0 ] && [ -z "$out" ] || {
        echo "  systemd-analyze verify (exit $rc): $out" >&2
        return 1
    }
}
check "systemd-analyze verify accepts the unit without a warning" verify_clean
exposure="$(systemd-analyze security --offline=yes "$scratch/verify/hapair-agent.service" 2>/dev/null | grep -o 'Overall exposure level.*' || true)"
echo "figure: systemd-analyze security (offline): ${exposure:-not available}"

echo "==> second install keeps an edited config and repairs modes"
echo "# edited by the admin" >>"$config"
cp "$config" "$scratch/edited.yaml"
chmod 0755 "$root/etc/hapair" "$root/var/lib/hapair"
bash scripts/install-agent.sh --root "$root" --binary "$binary" >"$scratch/second.out"
check "edited config kept" cmp -s "$scratch/edited.yaml" "$config"
check "second run says it kept the config" grep -q "kept existing" "$scratch/second.out"
check "directory modes repaired" eval 'mode_is 750 "$root/etc/hapair" && mode_is 700 "$root/var/lib/hapair"'
check "binary still installed" cmp -s "$binary" "$root/usr/bin/hapair-agent"

echo "==> the installed agent runs on the installed config"
# Not enrolled yet: it must stay up, serve /healthz and say why it does nothing.
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
sed -e "s#^stateDir: .*#stateDir: $scratch/state#" -e "s#^runtimeDir: .*#runtimeDir: $scratch/run#" \
    -e "s#^  listen: .*#  listen: 127.0.0.1:$port#" "$config" >"$scratch/run.yaml"
"$root/usr/bin/hapair-agent" run --config "$scratch/run.yaml" >"$scratch/run.log" 2>&1 &
agent_pid=$!
trap 'kill "$agent_pid" 2>/dev/null || true; rm -rf "$scratch"' EXIT
unenrolled_status() {
    python3 - "$port" <<'EOF'
import json, sys, time, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
deadline = time.monotonic() + 20
while True:
    try:
        assert urllib.request.urlopen(base + "/healthz", timeout=2).status == 200
        status = json.load(urllib.request.urlopen(base + "/v1/status", timeout=2))
        if "not enrolled" in (status.get("configError") or ""):
            sys.exit(0)
    except Exception as e:
        status = e
    if time.monotonic() > deadline:
        sys.exit(f"no 'not enrolled' status: {status}")
    time.sleep(0.2)
EOF
}
check "unenrolled agent serves /healthz and reports 'not enrolled'" unenrolled_status
kill "$agent_pid" 2>/dev/null || true
wait "$agent_pid" 2>/dev/null || true
sed 's/^stateDir:/stateDirectory:/' "$scratch/run.yaml" >"$scratch/typo.yaml"
typo_refused() {
    local out rc=0
    out="$(timeout 20 "$root/usr/bin/hapair-agent" run --config "$scratch/typo.yaml" 2>&1)" || rc=$?
    [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && grep -qF "$scratch/typo.yaml: stateDirectory: " <<<"$out" || {
        echo "  exit $rc: $out" >&2
        return 1
    }
}
check "a config key with a typo is refused, naming the key" typo_refused

echo "==> errors"
expect_error() {
    local what="$1" needle="$2"
    shift 2
    local out rc=0
    out="$(bash scripts/install-agent.sh "$@" 2>&1)" || rc=$?
    if [ "$rc" -ne 0 ] && grep -qF -- "$needle" <<<"$out"; then
        echo "ok: $what"
    else
        fail "$what (exit $rc): $out"
    fi
}
expect_error "missing binary is named" "no agent binary at $scratch/nope" --root "$root" --binary "$scratch/nope"
expect_error "unknown option is refused" "unknown argument: --rooot" --rooot "$root"
expect_error "root must exist" "is not a directory" --root "$scratch/absent" --binary "$binary"
expect_error "--root needs a value" "--root needs a directory" --root
check "failed runs left the scratch root untouched" eval '[ ! -e "$scratch/absent" ]'

if [ "$failures" -ne 0 ]; then
    echo "==> install test: $failures failure(s)" >&2
    exit 1
fi
echo "==> install test passed"
