#!/usr/bin/env bash
# Runs the documentation: every shell block of README.md and docs/**/*.md is either run in a
# sandbox (fresh mount, network and PID namespaces, copy-on-write overlays over the system
# directories, the freshly built binaries on PATH) or marked with the reason it is not (see
# tests/docs/test_docs.py). Needs root; leaves nothing behind.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(repo_root)"

ensure_debian_packages util-linux iproute2 curl openssl jq systemd etcd-server etcd-client
ensure_build_packages

echo "==> building the binaries the docs use"
cargo build --locked -p hapair-operator -p hapair-agent

echo "==> documentation commands (README.md, docs/)"
PYTHONDONTWRITEBYTECODE=1 python3 tests/docs/test_docs.py
