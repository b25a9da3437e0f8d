#!/usr/bin/env bash
# Runs the failover benchmark: kills the primary of real pairs in network namespaces and
# prints the kill-to-first-answer distribution of hapair next to keepalived's (advert_int
# 1 s and 0.1 s). Needs root (it builds network namespaces, loop devices and FUSE mounts for
# the full-stack rows); installs what it needs.
# Arguments go to bench-failover, e.g. --kills 100, --quick, --only hapair-witness,keepalived-0.1s.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(repo_root)"

ensure_debian_packages iproute2 keepalived libnbd-bin fuse3 e2fsprogs util-linux
ensure_build_packages

# The dev profile already optimizes hapair-agent and hapair-tests (opt-level 2, see the root
# Cargo.toml); the figures are governed by heartbeat and advertisement timers of hundreds of
# milliseconds, not by CPU work, so a release build of every dependency buys nothing here.
cargo build -p hapair-tests --bin bench-failover -p hapair-agent --bin hapair-agent -p hapair-operator --bin hapair-operator
exec ./target/debug/bench-failover "$@"
