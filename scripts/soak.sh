#!/usr/bin/env bash
# Runs the chaos soak: a real pair (two agents, a protocol C replicated volume, the
# standalone controller as witness) in network namespaces through randomized faults while
# a client writes; prints the dual-active and lost-write counts and the failover
# distribution. Needs root (network namespaces, loop devices, FUSE); installs what it needs.
# Arguments go to the soak binary: --faults N (default 100), --seed S (printed by every run).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(repo_root)"

ensure_debian_packages iproute2 libnbd-bin fuse3 util-linux
ensure_build_packages

# A debug build, as the integration tests use (the dev profile optimizes the agent and the
# tests crate): the soak's timings are governed by heartbeat timers, not CPU work.
cargo build -p hapair-agent --bin hapair-agent
cargo build -p hapair-operator --bins
cargo build -p hapair-tests --bin soak --bin bench-failover
exec ./target/debug/soak "$@"
