#!/usr/bin/env bash
# The hapair demo: a pair of servers failing over, end to end, on this one machine.
#
# Three network namespaces stand in for two servers and a client. The standalone controller
# (the embedded default: a directory of manifests, no Kubernetes) runs in the root namespace
# on the servers' LAN; each server enrolls its agent with a one-time token and runs it; the
# agents elect a primary, which starts a small service behind the virtual IP. A client
# connects to the VIP every 20 ms. Then the active server dies as a whole (every process
# killed, every link down) and the client's log shows how long the service was away.
#
# Everything the demo creates is removed on exit, also on failure or Ctrl-C.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(repo_root)"

[[ $(id -u) -eq 0 ]] || { echo "demo.sh: run as root (it creates network namespaces)" >&2; exit 1; }

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
note() { printf '    %s\n' "$*"; }

ensure_debian_packages iproute2 procps socat coreutils libnbd-bin fuse3 e2fsprogs util-linux
ensure_build_packages
# HAPAIR_DEMO_BIN runs already built binaries (the test suite runs the demo on its debug build).
if [[ -n ${HAPAIR_DEMO_BIN:-} ]]; then
    BIN=$(realpath "$HAPAIR_DEMO_BIN")
else
    step "building hapair (release)"
    cargo build --release --locked -p hapair-operator -p hapair-agent
    BIN=$(pwd)/target/release
fi

# Names carry the pid so a second demo (or a test run) never collides with this one.
id=$$
NS_A=hpdemo-a-$id NS_B=hpdemo-b-$id NS_C=hpdemo-cl-$id
LAN=hpd-lan-$id HB=hpd-hb-$id
WORK=$(mktemp -d /tmp/hapair-demo.XXXXXX)
CTL_ADDR=198.18.30.1 VIP=198.18.30.80 PORT=8080
declare -A LAN_ADDR=([a]=198.18.30.11 [b]=198.18.30.12) HB_ADDR=([a]=198.18.31.11 [b]=198.18.31.12)
declare -A NS=([a]=$NS_A [b]=$NS_B)

cleanup() {
    set +e
    for ns in "$NS_A" "$NS_B" "$NS_C"; do
        pids=$(ip netns pids "$ns" 2>/dev/null)
        [[ -n $pids ]] && kill -9 $pids 2>/dev/null
    done
    HAPAIR_ATTACH_DIR="$WORK/attach" scripts/nbd-attach-fuse.sh cleanup
    [[ -n ${CTL_PID:-} ]] && kill "$CTL_PID" 2>/dev/null && wait "$CTL_PID" 2>/dev/null
    for ns in "$NS_A" "$NS_B" "$NS_C"; do ip netns del "$ns" 2>/dev/null; done
    ip link del "$LAN" 2>/dev/null
    ip link del "$HB" 2>/dev/null
    # A killed node's loop device outlives its nbdfuse. Its backing file lived in the dead
    # agent's mount namespace, so it no longer reads as a path under $WORK but as "/disk":
    # free the loop devices created since the demo started that back onto either.
    losetup -n -l -O NAME,BACK-FILE 2>/dev/null |
        awk -v w="$WORK" -v before="${LOOPS_BEFORE:-}" '
            index(" " before " ", " " $1 " ") == 0 && (index($2, w) == 1 || $2 == "/disk") {print $1}' |
        xargs -r -n1 losetup -d 2>/dev/null
    rm -rf "$WORK"
}
LOOPS_BEFORE=$(losetup -n -l -O NAME 2>/dev/null | tr '\n' ' ')
trap cleanup EXIT
trap 'exit 130' INT TERM

step "creating three namespaces: servers a and b, and a client"
ip link add "$LAN" type bridge && ip link set "$LAN" up
ip link add "$HB" type bridge && ip link set "$HB" up
ip addr add "$CTL_ADDR/24" dev "$LAN"
# Attaches namespace $1's interface $2 to bridge $3 with address $4.
attach() {
    local ns=$1 ifname=$2 bridge=$3 addr=$4 host=hpd${RANDOM}
    ip link add "$host" type veth peer name "$ifname" netns "$ns"
    ip link set "$host" master "$bridge" up
    ip -n "$ns" addr add "$addr" dev "$ifname"
    ip -n "$ns" link set "$ifname" up
}
for ns in "$NS_A" "$NS_B" "$NS_C"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
for n in a b; do
    attach "${NS[$n]}" eth0 "$LAN" "${LAN_ADDR[$n]}/24"
    attach "${NS[$n]}" eth1 "$HB" "${HB_ADDR[$n]}/24"
done
attach "$NS_C" eth0 "$LAN" 198.18.30.100/24
note "LAN 198.18.30.0/24 (controller .1, a .11, b .12, client .100, VIP .80); heartbeat link 198.18.31.0/24"

step "writing the manifests: HaGroup demo/web and its ReplicatedVolume demo/web-data"
mkdir -p "$WORK/manifests" "$WORK/controller" "$WORK/attach" "$WORK/mnt"
ATTACH="HAPAIR_ATTACH_DIR=$WORK/attach $(pwd)/scripts/nbd-attach-fuse.sh"
cat >"$WORK/manifests/web.yaml" <<EOF
apiVersion: hapair.dev/v1alpha1
kind: ReplicatedVolume
metadata: {name: web-data, namespace: demo}
spec:
  group: web
  size: 64Mi
  protocol: C
  port: 7790
  backing:
    - {node: a, path: $WORK/a/disk.img, address: ${HB_ADDR[a]}}
    - {node: b, path: $WORK/b/disk.img, address: ${HB_ADDR[b]}}
---
apiVersion: hapair.dev/v1alpha1
kind: HaGroup
metadata: {name: web, namespace: demo}
spec:
  nodes:
    - name: a
      heartbeatAddresses: [${LAN_ADDR[a]}, ${HB_ADDR[a]}]
    - name: b
      heartbeatAddresses: [${LAN_ADDR[b]}, ${HB_ADDR[b]}]
  virtualIPs:
    - name: www
      address: $VIP/24
      interface: eth0
      garp: {count: 3, interval: 100ms}
  flow:
    - name: data
      volume:
        volumeRef: web-data
        mountPath: $WORK/mnt
        mkfs: true
        attachCommand: $ATTACH attach
        detachCommand: $ATTACH detach
      timeout: 60s
    - name: web
      exec:
        start: >-
          setsid socat TCP-LISTEN:$PORT,reuseaddr,fork
          SYSTEM:'n=\$((\$(cat $WORK/mnt/visits 2>/dev/null || echo 0) + 1));
          echo \$n > $WORK/mnt/visits.tmp && sync $WORK/mnt/visits.tmp && mv $WORK/mnt/visits.tmp $WORK/mnt/visits
          && sync $WORK/mnt && echo served-by-\$HAPAIR_NODE visit=\$n'
          </dev/null >/dev/null 2>&1 & echo \$! > $WORK/\$HAPAIR_NODE/web.pid
        stop: >-
          if [ -f $WORK/\$HAPAIR_NODE/web.pid ]; then
          kill \$(cat $WORK/\$HAPAIR_NODE/web.pid); rm $WORK/\$HAPAIR_NODE/web.pid; fi
      check:
        tcp: {port: $PORT}
    - name: www
      virtualIP: {name: www}
EOF
sed 's/^/    /' "$WORK/manifests/web.yaml"

step "starting the standalone controller on $CTL_ADDR:7443"
"$BIN/hapair-operator" standalone --manifests "$WORK/manifests" --state "$WORK/controller" \
    --listen "$CTL_ADDR:7443" --server-name "$CTL_ADDR" >"$WORK/controller.log" 2>&1 &
CTL_PID=$!
export HAPAIR_CONFIG=$WORK/controller/hapair-admin.json
for _ in $(seq 100); do [[ -f $HAPAIR_CONFIG ]] && break; sleep 0.1; done

step "enrolling and starting the agents"
for n in a b; do
    mkdir -p "$WORK/$n/etc" "$WORK/$n/state" "$WORK/$n/run" "$WORK/$n/data"
    out=$("$BIN/hapair-operator" token create --state "$WORK/controller" --node "$n")
    token=$(awk '$1 == "token:" {print $2}' <<<"$out")
    fp=$(awk '$1 == "ca" && $2 == "fingerprint:" {print $3}' <<<"$out")
    # Enroll fills node, controller and tls into this file and keeps the rest.
    cat >"$WORK/$n/etc/agent.yaml" <<AGENT
apiVersion: hapair.dev/v1alpha1
kind: AgentConfig
stateDir: $WORK/$n/state
runtimeDir: $WORK/$n/run
endpoints:
  listen: 127.0.0.1:9464
AGENT
    ip netns exec "${NS[$n]}" "$BIN/hapair-agent" enroll --controller "https://$CTL_ADDR:7443" \
        --node "$n" --token "$token" --ca-fingerprint "$fp" --dir "$WORK/$n/etc" | sed 's/^/    /'
    ip netns exec "${NS[$n]}" "$BIN/hapair-agent" run --config "$WORK/$n/etc/agent.yaml" \
        >"$WORK/$n/agent.log" 2>&1 &
    disown  # killing the node is the point of the demo, not worth a job-control notice
done

# Prints the node that `hapair status` shows as primary of demo/web, if any.
active_node() {
    "$BIN/kubectl-hapair" status -o json 2>/dev/null |
        grep -o '"activeNode": *"[a-z]*"' | head -1 | grep -o '"[a-z]*"$' | tr -d '"' || true
}
# Ready when one node is primary, the other stands by, and the standby's copy of the volume
# is UpToDate (an out-of-date standby would rightly refuse to take over).
for _ in $(seq 300); do
    ACTIVE=$(active_node)
    [[ -n $ACTIVE ]] && "$BIN/kubectl-hapair" status 2>/dev/null | grep ':Standby' | grep -q UpToDate && break
    sleep 0.2
done
[[ -n ${ACTIVE:-} ]] || { echo "no primary with an UpToDate standby after 60 s; agent logs:"; tail -n 30 "$WORK"/{a,b}/agent.log; exit 1; }
"$BIN/kubectl-hapair" status | sed 's/^/    /'

step "the client (198.18.30.100) connects to $VIP:$PORT every 20 ms (an unanswered attempt is given up after 50 ms)"
CLIENT_LOG=$WORK/client.log
ip netns exec "$NS_C" bash -c "
    while :; do
        reply=\$(timeout 0.3 socat -T0.3 - TCP:$VIP:$PORT,connect-timeout=0.05 </dev/null 2>/dev/null | head -1)
        echo \"\$(date +%s%3N) \${reply:-no-answer}\"
        sleep 0.02
    done" >"$CLIENT_LOG" 2>/dev/null &
disown
for _ in $(seq 100); do grep -q served-by "$CLIENT_LOG" 2>/dev/null && break; sleep 0.1; done
note "client sees: $(grep served-by "$CLIENT_LOG" | tail -1 | cut -d' ' -f2)"

STANDBY=$([[ $ACTIVE == a ]] && echo b || echo a)
step "killing server $ACTIVE: every process in its namespace, and its links"
sleep 2
KILL_MS=$(date +%s%3N)
kill -9 $(ip netns pids "${NS[$ACTIVE]}") 2>/dev/null || true
ip -n "${NS[$ACTIVE]}" link set eth0 down
ip -n "${NS[$ACTIVE]}" link set eth1 down
# Server $ACTIVE can still answer until the kill and the link-down have run: the outage is
# timed from when the kill began, and "nothing served after the kill" is judged from here.
GONE_MS=$(date +%s%3N)
note "server $ACTIVE is gone at $(date -d @$((KILL_MS / 1000)) +%T)"

for _ in $(seq 300); do
    awk -v t="$KILL_MS" -v n="served-by-$STANDBY" '$1 > t && $2 == n {found=1} END {exit !found}' "$CLIENT_LOG" && break
    sleep 0.05
done
sleep 1
read -r LAST_OLD FIRST_NEW < <(awk -v t="$KILL_MS" -v old="served-by-$ACTIVE" -v new="served-by-$STANDBY" '
    $2 == old && $1 <= t {last = $1}
    $2 == new && $1 > t && !first {first = $1}
    END {printf "%.0f %.0f\n", last, first}' "$CLIENT_LOG")
[[ $FIRST_NEW -gt 0 ]] || { echo "the client never reached server $STANDBY; agent log:"; tail -n 40 "$WORK/$STANDBY/agent.log"; exit 1; }
OUTAGE_MS=$(( FIRST_NEW - KILL_MS ))
FAILED=$(awk -v t="$KILL_MS" -v f="$FIRST_NEW" '$1 > t && $1 < f && $2 == "no-answer"' "$CLIENT_LOG" | wc -l)

step "the client's view of the failover"
# Runs of identical answers, in ms relative to the kill.
awk -v t="$KILL_MS" -v f="$FIRST_NEW" '
    function flush() { if (n) printf "    %+6d .. %+6d ms  %-14s x%d\n", from - t, to - t, what, n }
    $1 < t - 500 || $1 > f + 500 { next }
    $2 != what { flush(); what = $2; from = $1; n = 0 }
    { to = $1; n++ }
    END { flush() }' "$CLIENT_LOG"
note "kill → first answer from server $STANDBY: ${OUTAGE_MS} ms ($FAILED failed attempts in between)"
# The visit counter lives on the replicated volume: b must continue where a stopped.
LAST_VISIT=$(awk -v t="$KILL_MS" -v old="served-by-$ACTIVE" '$2 == old && $1 <= t {v = $3} END {print v}' "$CLIENT_LOG")
FIRST_VISIT=$(awk -v t="$KILL_MS" -v new="served-by-$STANDBY" '$2 == new && $1 > t {print $3; exit}' "$CLIENT_LOG")
note "the visit counter on the replicated volume: last answer from $ACTIVE ${LAST_VISIT:-?}, first from $STANDBY ${FIRST_VISIT:-?}"
[[ ${FIRST_VISIT#visit=} -gt ${LAST_VISIT#visit=} ]] || { echo "server $STANDBY did not continue the counter: data lost"; exit 1; }

# Never active at once, from the records: server $ACTIVE served nothing once the kill had
# run (the client's log), and server $STANDBY added the VIP only after that (its own agent log).
ADDED_AT=$(grep -a 'virtual IP added' "$WORK/$STANDBY/agent.log" | tail -1 | cut -d' ' -f1)
ADDED_MS=$(( $(date -d "$ADDED_AT" +%s%N) / 1000000 ))
LATE_OLD=$(awk -v t="$GONE_MS" -v old="served-by-$ACTIVE" '$1 > t && $2 == old' "$CLIENT_LOG" | wc -l)
OVERLAP_MS=$(( GONE_MS > ADDED_MS ? GONE_MS - ADDED_MS : 0 ))
note "server $STANDBY added the VIP $(( ADDED_MS - KILL_MS )) ms after the kill; answers from $ACTIVE after the kill: $LATE_OLD; overlap: $OVERLAP_MS ms"
[[ $OVERLAP_MS -eq 0 && $LATE_OLD -eq 0 ]] || { echo "both servers were active at once"; exit 1; }

step "hapair status after the failover"
sleep 2
"$BIN/kubectl-hapair" status | sed 's/^/    /'

step "where the time went, as server $STANDBY recorded it (hapair describe demo/web)"
# The phases run from the last heartbeat server $STANDBY heard from $ACTIVE, on its own clock.
"$BIN/kubectl-hapair" describe demo/web | awk '/^Last failover:/ {on = 1; print; next} on && /^  / {print; next} on {exit}' |
    sed 's/^/    /'

step "summary"
cat <<SUMMARY
    Two servers (namespaces $NS_A and $NS_B) ran the group demo/web under the standalone
    controller, with heartbeats on two links and the controller as witness. Server $ACTIVE
    was active and served $VIP:$PORT; it was killed outright (all processes, both links).
    Server $STANDBY noticed the silence, took the witness lease, promoted its replica of the
    volume demo/web-data (written synchronously, protocol C, on every visit), mounted it,
    brought up the service and the virtual IP and announced it with gratuitous ARP; the
    client's first answer from server $STANDBY came ${OUTAGE_MS} ms after the kill, with no
    cache flush on the client, and the visit counter went on from ${LAST_VISIT#visit=} to
    ${FIRST_VISIT#visit=}: no acknowledged write was lost.
    The two servers were never active at once (measured: $STANDBY added the VIP
    $(( ADDED_MS - KILL_MS )) ms after $ACTIVE died, and no answer came from $ACTIVE after that): an
    active node stops acting the moment its lease lapses, and the witness grants the other
    one a lease only after that. Everything created for the demo is now removed.
SUMMARY
