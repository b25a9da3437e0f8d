#!/bin/sh
# Attaches an NBD export as a block device on machines without the kernel nbd driver:
# nbdfuse exposes the export as a file and a loop device turns that file into a block
# device. Use it as a volume step's attachCommand / detachCommand:
#
#   attachCommand: /path/to/nbd-attach-fuse.sh attach   (reads HAPAIR_NBD_SOCKET,
#                                                        prints the loop device)
#   detachCommand: /path/to/nbd-attach-fuse.sh detach   (reads HAPAIR_BLOCK_DEVICE)
#
# `nbd-attach-fuse.sh cleanup` tears down everything attached under HAPAIR_ATTACH_DIR
# after a crash (tests and the demo kill agents on purpose).
#
# Needs nbdfuse (libnbd-bin), fusermount3 (fuse3) and losetup.
set -eu

base=${HAPAIR_ATTACH_DIR:-/run}

case "${1:-}" in
attach)
    : "${HAPAIR_NBD_SOCKET:?HAPAIR_NBD_SOCKET must name the NBD socket}"
    dir=$(mktemp -d "$base/hapair-nbdfuse.XXXXXX")
    mkdir "$dir/mnt"
    setsid nbdfuse -P "$dir/pid" "$dir/mnt/disk" --unix "$HAPAIR_NBD_SOCKET" </dev/null >"$dir/log" 2>&1 &
    # Polled finely: this wait is part of every takeover (10 s at most).
    i=0
    while [ ! -s "$dir/pid" ]; do
        i=$((i + 1))
        if [ "$i" -gt 1000 ]; then
            echo "nbdfuse did not start:" >&2
            cat "$dir/log" >&2
            fusermount3 -u "$dir/mnt" 2>/dev/null || true
            rm -rf "$dir"
            exit 1
        fi
        sleep 0.01
    done
    # Recorded for cleanup after a crash: once the mount namespace holding the FUSE file
    # is gone, the loop device's backing file no longer names this directory, and the
    # FUSE connection (named by the mount's device number) may need aborting.
    stat -c %d "$dir/mnt/disk" >"$dir/fuse-connection" 2>/dev/null || true
    dev=$(losetup --find --show "$dir/mnt/disk")
    echo "$dev" >"$dir/loop"
    echo "$dev"
    ;;
cleanup)
    # When an agent is killed, its nbdfuse can end up the last process of the agent's
    # mount namespace: exiting, it unmounts the filesystem on the loop device, whose
    # writes it would have to serve itself. Aborting the FUSE connection breaks that
    # deadlock (the writes fail), after which the loop device frees itself.
    conns=/sys/fs/fuse/connections
    if [ -d "$conns" ] && [ -z "$(ls -A "$conns" 2>/dev/null)" ]; then
        mount -t fusectl none "$conns" 2>/dev/null || true
    fi
    # The abort comes first: anything that touches the loop device or the mount before it
    # can wait forever on a FUSE request nobody will answer. Each step is bounded anyway.
    for dir in "$base"/hapair-nbdfuse.*; do
        [ -d "$dir" ] || continue
        conn=$(cat "$dir/fuse-connection" 2>/dev/null || true)
        [ -n "$conn" ] && [ -e "$conns/$conn/abort" ] && echo 1 >"$conns/$conn/abort" 2>/dev/null || true
        pid=$(cat "$dir/pid" 2>/dev/null || true)
        [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
        dev=$(cat "$dir/loop" 2>/dev/null || true)
        [ -n "$dev" ] && timeout 10 losetup -d "$dev" 2>/dev/null || true
        timeout 10 fusermount3 -u -z "$dir/mnt" 2>/dev/null || true
        timeout 10 rm -rf "$dir" 2>/dev/null || true
    done
    ;;
detach)
    : "${HAPAIR_BLOCK_DEVICE:?HAPAIR_BLOCK_DEVICE must name the loop device}"
    file=$(losetup -n -O BACK-FILE "$HAPAIR_BLOCK_DEVICE")
    dir=$(dirname "$(dirname "$file")")
    losetup -d "$HAPAIR_BLOCK_DEVICE"
    pid=$(cat "$dir/pid" 2>/dev/null || true)
    # The loop device lets go of the file asynchronously; retry the unmount briefly.
    i=0
    until fusermount3 -u "$dir/mnt" 2>/dev/null; do
        i=$((i + 1))
        if [ "$i" -gt 100 ]; then
            fusermount3 -u "$dir/mnt"
            exit 1
        fi
        sleep 0.05
    done
    if [ -n "$pid" ]; then
        i=0
        while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 100 ]; do
            i=$((i + 1))
            sleep 0.05
        done
    fi
    rm -rf "$dir"
    ;;
*)
    echo "usage: $0 attach|detach|cleanup" >&2
    exit 2
    ;;
esac
