#!/usr/bin/env bash
# Runs every check hapair has: formatting, lints, and all tests. CI runs exactly this.
# Needs root (the multi-host tests build network namespaces); installs what it needs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(repo_root)"

# With it set, the engine tests print what the engine emits instead of checking it (for
# writing new tests); a full run must check, so refuse rather than report a run that did not.
if [[ -n "${ENGINE_TEST_RECORD+set}" ]]; then
    echo "scripts/test.sh: ENGINE_TEST_RECORD is set, which turns the engine tests' assertions into recordings; unset it (unset ENGINE_TEST_RECORD) and run again" >&2
    exit 2
fi

ensure_debian_packages iproute2 qemu-utils systemd iputils-ping procps libnbd-bin nbdkit fuse3 e2fsprogs mount util-linux keepalived fio etcd-server chromium chromium-driver
ensure_build_packages

echo "==> cargo fmt --check"
cargo fmt --all --check

echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> cargo build (binaries used by the end-to-end tests)"
cargo build --workspace --all-targets --locked

echo "==> crdgen --check (CRDs in the chart, CRD reference in docs/reference)"
./target/debug/crdgen --check
./target/debug/crdgen --docs --check

echo "==> cargo test"
# Each test binary runs under a time budget (scripts/test-runner.sh), so a hang fails the
# run with the evidence instead of stalling it.
host=$(rustc -vV | sed -n 's/^host: //p')
runner="CARGO_TARGET_$(echo "$host" | tr 'a-z-' 'A-Z_')_RUNNER"
env "$runner=$PWD/scripts/test-runner.sh" cargo test --workspace --locked --no-fail-fast

bash scripts/test-chart.sh
bash scripts/test-install.sh
bash scripts/test-image.sh
bash scripts/test-docs.sh
bash scripts/test-dashboard.sh

echo "==> the demo (README's first command), on the debug build"
HAPAIR_DEMO_BIN=target/debug bash scripts/demo.sh

echo "==> all checks passed"
