#!/bin/sh
# Attaches an NBD export as a block device on machines without the kernel nbd driver:
# nbdfuse exposes the export as a file and a loop device turns that file into a block
# device. Use it as a volume step's attachCommand / detachCommand:
#
#   attachCommand: /path/to/nbd-attach-fuse.sh attach   (reads HAPAIR_NBD_SOCKET,
#                                                        prints the loop device)
#   detachCommand: /path/to/nbd-attach-fuse.sh detach   (reads HAPAIR_BLOCK_DEVICE)
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
    i=0
    while [ ! -s "$dir/pid" ]; do
        i=$((i + 1))
        if [ "$i" -gt 200 ]; then
            echo "nbdfuse did not start:" >&2
            cat "$dir/log" >&2
            fusermount3 -u "$dir/mnt" 2>/dev/null || true
            rm -rf "$dir"
            exit 1
        fi
        sleep 0.05
    done
    losetup --find --show "$dir/mnt/disk"
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
    echo "usage: $0 attach|detach" >&2
    exit 2
    ;;
esac
