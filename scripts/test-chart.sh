#!/usr/bin/env bash
# Tests the Helm chart: real Helm (helm-python-sdk) renders and lints it, kubernetes-validate
# checks every manifest for each Kubernetes minor the chart claims, the CRDs must equal
# crdgen's output, and invalid values must be rejected naming the field. No cluster needed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(repo_root)"

ensure_pip_packages helm-python-sdk==0.2.2 kubernetes-validate==1.37.0

echo "==> chart tests (charts/hapair)"
# Bytecode caches would be left in the source tree.
PYTHONDONTWRITEBYTECODE=1 python3 tests/chart/test_chart.py
