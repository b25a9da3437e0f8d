# Shared helpers for hapair's scripts. Source it; do not run it.

# Installs the Debian packages named in "$@" that are not installed yet.
ensure_debian_packages() {
    local missing=()
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "==> installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # keepalived's postinst tries to start the daemon; nothing here wants it running.
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        rm -f /usr/sbin/policy-rc.d
    fi
}

# What building the workspace needs besides Rust: protoc, which etcd-client's build script
# runs to generate etcd's gRPC API.
ensure_build_packages() {
    # etcd-client compiles its protos with protoc, which needs the well-known types
    # (google/protobuf/*.proto) from libprotobuf-dev; protoc only recommends it.
    ensure_debian_packages protobuf-compiler libprotobuf-dev
}

# Installs the PyPI packages named in "$@" (name==version) that are not installed at that
# version yet (a bare name accepts any installed version).
ensure_pip_packages() {
    local missing=()
    local spec have
    python3 -m pip --version >/dev/null 2>&1 || ensure_debian_packages python3 python3-pip
    for spec in "$@"; do
        # `pip show` fails for a package that is not installed: that is an answer, not an
        # error (under `set -o pipefail` it would end the calling script).
        have=$(python3 -m pip show "${spec%%=*}" 2>/dev/null | sed -n 's/^Version: //p' || true)
        case "$spec" in
            *==*) [ "$have" = "${spec#*==}" ] || missing+=("$spec") ;;
            *) [ -n "$have" ] || missing+=("$spec") ;;
        esac
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "==> installing PyPI packages: ${missing[*]}"
        # Debian's own python3 is "externally managed" (PEP 668); these are test tools.
        PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --disable-pip-version-check "${missing[@]}"
    fi
}

repo_root() {
    cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd
}
