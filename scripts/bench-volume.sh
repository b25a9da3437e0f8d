#!/usr/bin/env bash
# Runs the replicated-volume benchmark: write latency and throughput through the NBD
# export (protocol C, protocol A, unreplicated, nbdkit file) and resync cost against
# rsync --inplace. Needs root (it builds network namespaces); installs what it needs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(repo_root)"

ensure_debian_packages iproute2 nbdkit libnbd-bin qemu-utils rsync util-linux fio
ensure_build_packages

cargo build --release -p hapair-tests --bin bench-volume --bin replica-harness
exec ./target/release/bench-volume "$@"
