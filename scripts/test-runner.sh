#!/usr/bin/env bash
# Cargo's runner for the test binaries of scripts/test.sh: runs one binary ("$@") within a
# time budget, so that a test stuck in the kernel (a FUSE request, a loop device) fails the
# run with a report instead of holding CI until its own limit ends it with none.
#
# On overrun it prints every process left with its state, kernel wait channel and, for the
# ones in uninterruptible sleep, the kernel stack: the evidence a hang leaves. It then kills
# the binary, its descendants and whatever runs inside the network namespaces it created,
# deletes those namespaces, and exits 124 (timeout(1)'s code) so cargo records the binary
# as failed and, under --no-fail-fast, goes on with the next.
#
# HAPAIR_TEST_BINARY_BUDGET: seconds per binary (default 600; the slowest takes about 90).
set -uo pipefail

budget=${HAPAIR_TEST_BINARY_BUDGET:-600}
namespaces_before=$(ip netns list 2>/dev/null | awk '{print $1}' | sort)

"$@" &
binary=$!
deadline=$((SECONDS + budget))
while kill -0 "$binary" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
    sleep 1
done
if ! kill -0 "$binary" 2>/dev/null; then
    wait "$binary"
    exit $?
fi

name=$(basename "$1")
echo "==> $name ran past its budget of ${budget} s; the processes left:" >&2
ps -eo pid,ppid,pgid,stat,wchan:32,etimes,args --forest >&2
for stat in /proc/[0-9]*/stat; do
    pid=${stat#/proc/}
    pid=${pid%/stat}
    state=$(awk '{print $3}' "$stat" 2>/dev/null || true)
    if [ "$state" = D ]; then
        echo "--- kernel stack of $pid ($(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)) ---" >&2
        cat "/proc/$pid/stack" >&2 2>/dev/null || echo "(no /proc/$pid/stack)" >&2
    fi
done

# Its descendants go with it: one left holding the output would keep the run waiting.
descendants() {
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$child"
        descendants "$child"
    done
}
doomed=$(descendants "$binary")
kill -KILL "$binary" $doomed 2>/dev/null
namespaces_after=$(ip netns list 2>/dev/null | awk '{print $1}' | sort)
for ns in $(comm -13 <(echo "$namespaces_before") <(echo "$namespaces_after")); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do
        kill -KILL "$pid" 2>/dev/null
    done
    ip netns del "$ns" 2>/dev/null && echo "==> deleted namespace $ns, left by $name" >&2
done
wait "$binary" 2>/dev/null
echo "==> $name: failed, out of time" >&2
exit 124
