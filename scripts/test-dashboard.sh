#!/usr/bin/env bash
# Checks the Grafana dashboard (charts/hapair/dashboards/hapair.json) and the docs against the
# metrics the daemons export: the controller's from a real standalone controller's /metrics
# (in its own network namespace), the agent's from the registrations in node-agent/src.
# See tests/dashboard/test_dashboard.py. Needs root; leaves nothing behind.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(repo_root)"

ensure_debian_packages util-linux iproute2 curl
ensure_build_packages

echo "==> building the binaries the check runs"
cargo build --locked -p hapair-operator -p hapair-agent

echo "==> dashboard metrics (charts/hapair/dashboards/hapair.json)"
PYTHONDONTWRITEBYTECODE=1 python3 tests/dashboard/test_dashboard.py
