#!/usr/bin/env bash
# Runs every check hapair has: formatting, lints, and all tests. CI runs exactly this.
# Needs root (the multi-host tests build network namespaces); installs what it needs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(repo_root)"

ensure_debian_packages iproute2 qemu-utils systemd iputils-ping procps libnbd-bin nbdkit fuse3 e2fsprogs mount util-linux

echo "==> cargo fmt --check"
cargo fmt --all --check

echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> cargo build (binaries used by the end-to-end tests)"
cargo build --workspace --all-targets --locked

echo "==> crdgen --check"
./target/debug/crdgen --check

echo "==> cargo test"
cargo test --workspace --locked --no-fail-fast

bash scripts/test-chart.sh
bash scripts/test-install.sh

echo "==> all checks passed"
