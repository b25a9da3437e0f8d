#!/usr/bin/env bash
# hapair demo. Until the standalone controller lands, this validates the example manifests
# and prints the plan the controller would run for them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(repo_root)"

echo "==> building hapair (release)"
cargo build --release --locked -p hapair-operator -p hapair-agent
echo "==> validated plan of examples/"
./target/release/hapair-operator plan --manifests examples
