#!/usr/bin/env bash
# Tests the container images: scripts/build-image.sh on the debug binaries, then the
# archives with skopeo (labels, user, entrypoint, ports), their single layer file by file
# (exactly the binary, the libraries ldd names, the loader, the SBOM; owners and modes), the
# SBOM against dpkg, the names against what the chart renders by default, a rebuild with the
# same SOURCE_DATE_EPOCH pushed (--push) to a registry on loopback giving the same digest,
# and the images run with podman the way the chart runs them: the operator's --help, a
# standalone controller (TLS /healthz, the CLI over mutual TLS, a clean stop on SIGTERM),
# the agent's --help and an unenrolled agent on its default command.
#
# Needs root. Leaves nothing behind: images and containers live in a private store in a
# temporary directory, the whole run is in a private mount namespace with a tmpfs over
# /var/lib/containers (containers/image keeps a blob cache there), and the cgroups podman
# makes are removed. Bounded to HAPAIR_IMAGE_TEST_TIMEOUT seconds (default 300).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(repo_root)"

if [ "${HAPAIR_IMAGE_TEST_INNER:-}" != 1 ]; then
    # runc, not Debian's default crun: crun refuses cgroup v1 "hybrid" hosts (controllers on
    # both hierarchies), which some VMs are; runc runs on v1, hybrid and v2 alike.
    ensure_debian_packages buildah skopeo podman runc docker-registry util-linux python3
    # The Helm SDK at the version scripts/test-chart.sh pins, so the two never fight over it.
    helm_sdk="$(grep -o 'helm-python-sdk==[0-9.]*' scripts/test-chart.sh | head -1)"
    ensure_pip_packages PyYAML "${helm_sdk:-helm-python-sdk}"
    [ -x target/debug/hapair-operator ] && [ -x target/debug/hapair-agent ] && [ -x target/debug/kubectl-hapair ] ||
        cargo build --locked -p hapair-operator -p hapair-agent
    limit="${HAPAIR_IMAGE_TEST_TIMEOUT:-300}"
    made_dir=""
    if [ ! -d /var/lib/containers ]; then
        mkdir -p /var/lib/containers
        made_dir=1
    fi
    rc=0
    HAPAIR_IMAGE_TEST_INNER=1 timeout --kill-after=20 "$limit" \
        unshare --mount --propagation private bash "${BASH_SOURCE[0]}" "$@" || rc=$?
    [ -z "$made_dir" ] || rmdir /var/lib/containers 2>/dev/null || true
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "FAIL: the image test did not finish within ${limit}s" >&2
        echo "==> image test: timed out" >&2
    fi
    exit "$rc"
fi

# From here on: in the private mount namespace.
mount -t tmpfs -o mode=0700,size=64m hapair-image-test /var/lib/containers

scratch="$(mktemp -d -t hapair-image-test.XXXXXX)"
cgroup_parent="hapair-image-test-$$"
podman_cmd=(podman --root "$scratch/podman/root" --runroot "$scratch/podman/run" --tmpdir "$scratch/podman/tmp"
    --storage-driver vfs --cgroup-manager cgroupfs --events-backend none --runtime runc)
registry_pid=""
cleanup() {
    local rc=$?
    set +e
    if [ -n "$registry_pid" ]; then
        kill "$registry_pid" 2>/dev/null
        wait "$registry_pid" 2>/dev/null
    fi
    if [ -d "$scratch/podman/root" ]; then
        timeout 60 "${podman_cmd[@]}" rm --all --force --time 2 >/dev/null 2>&1
        timeout 60 "${podman_cmd[@]}" rmi --all --force >/dev/null 2>&1
    fi
    # The cgroups podman made for conmon and the containers (one tree per hierarchy).
    local dir
    for dir in /sys/fs/cgroup/"$cgroup_parent" /sys/fs/cgroup/*/"$cgroup_parent"; do
        [ -d "$dir" ] && find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null
    done
    # Anything podman left mounted below the scratch directory, deepest first.
    awk -v s="$scratch" '$2 == s || index($2, s "/") == 1 { print $2 }' /proc/self/mounts | sort -r |
        while read -r m; do umount -l "$m"; done
    rm -rf "$scratch"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

failures=0
fail() {
    echo "FAIL: $*" >&2
    failures=$((failures + 1))
}
check() {
    local what="$1"
    shift
    if "$@"; then echo "ok: $what"; else fail "$what"; fi
}
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# Containers get limits they can set: podman's defaults (1048576 files, 4194304 processes)
# need CAP_SYS_RESOURCE, which a sandboxed root may lack.
run_flags=(--ulimit nofile=4096:4096 --ulimit nproc=4096:4096 --cgroup-parent "/$cgroup_parent")
# The chart's operator pod: its UID (the image's), read-only root, no capabilities.
locked=(--read-only --cap-drop all --security-opt no-new-privileges)

version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"$/\1/p' Cargo.toml)"
revision="$(git rev-parse HEAD)"
epoch="$(git log -1 --format=%ct)"
images="$scratch/images"

# Every check of the archives, the layer and the SBOM, one subcommand each.
cat >"$scratch/checks.py" <<'EOF'
import datetime, gzip, hashlib, io, json, os, re, subprocess, sys, tarfile
import yaml

REPO = os.getcwd()

def chart():
    values = yaml.safe_load(open(f"{REPO}/charts/hapair/values.yaml"))
    meta = yaml.safe_load(open(f"{REPO}/charts/hapair/Chart.yaml"))
    return values, meta

def default_ref(component):
    values, meta = chart()
    image = values[component]["image"]
    return f"{image['repository']}:{image['tag'] or meta['appVersion']}"

def archive(path):
    """(ref name, manifest, config, layer TarFile) of a single-image oci-archive."""
    outer = tarfile.open(path)
    blob = lambda digest: outer.extractfile("blobs/sha256/" + digest.split(":", 1)[1]).read()
    index = json.loads(outer.extractfile("index.json").read())
    assert len(index["manifests"]) == 1, f"{len(index['manifests'])} images in {path}"
    entry = index["manifests"][0]
    manifest = json.loads(blob(entry["digest"]))
    config = json.loads(blob(manifest["config"]["digest"]))
    assert len(manifest["layers"]) == 1, f"{len(manifest['layers'])} layers"
    layer = manifest["layers"][0]
    data = blob(layer["digest"])
    assert hashlib.sha256(data).hexdigest() == layer["digest"].split(":", 1)[1], "layer digest"
    if layer["mediaType"].endswith("+gzip"):
        data = gzip.decompress(data)
    assert "sha256:" + hashlib.sha256(data).hexdigest() == config["rootfs"]["diff_ids"][0], "diff_id"
    return entry.get("annotations", {}).get("org.opencontainers.image.ref.name"), manifest, config, tarfile.open(fileobj=io.BytesIO(data))

def host_libs(binary):
    """The libraries ldd names for binary (and the loader), as absolute paths."""
    libs = []
    for line in subprocess.run(["ldd", binary], check=True, capture_output=True, text=True).stdout.splitlines():
        line = line.strip()
        m = re.match(r"^\S+ => (/\S+) \(0x", line) or re.match(r"^(/\S+) \(0x", line)
        if m:
            libs.append(m.group(1))
        elif "linux-vdso" not in line:
            raise AssertionError(f"unexpected ldd line: {line}")
    return libs

def deb_of(path):
    for candidate in (path, os.path.realpath(path)):
        r = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
        if r.returncode == 0:
            pkg = r.stdout.split(":", 1)[0].split(",")[0].strip()
            ver = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], check=True, capture_output=True, text=True).stdout
            return pkg, ver
    raise AssertionError(f"no package owns {path}")

def sha256(data):
    return hashlib.sha256(data).hexdigest()

def cmd_names(images, version):
    """The archives name exactly the chart's default images."""
    values, meta = chart()
    assert meta["appVersion"] == version, f"Chart appVersion {meta['appVersion']} != workspace {version}"
    for component in ("operator", "agent"):
        ref = default_ref(component)
        path = f"{images}/hapair-{component}-{version}.tar"
        got = archive(path)[0]
        assert got == ref, f"{path} names {got}, the chart's default is {ref}"

def cmd_rendered(images, version):
    """What `helm install` with defaults (agent enabled) renders is what the archives hold."""
    import tempfile
    import helm_python as helm
    home = tempfile.mkdtemp(prefix="hapair-image-helm-")
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        os.environ[var] = os.path.join(home, var.lower())
    os.environ.pop("KUBECONFIG", None)
    try:
        with helm.Chart.load(f"{REPO}/charts/hapair") as c, helm.Config(storage_driver="memory", namespace="hapair-system") as cfg:
            release = cfg.install(c, "hapair", {"agent": {"enabled": True}}, namespace="hapair-system", dry_run="client")
    finally:
        subprocess.run(["rm", "-rf", home])
    pods = {}
    for doc in yaml.safe_load_all(release["manifest"]):
        if doc and doc["kind"] in ("Deployment", "DaemonSet"):
            pods[doc["kind"]] = doc["spec"]["template"]["spec"]
    for kind, component in (("Deployment", "operator"), ("DaemonSet", "agent")):
        spec = pods[kind]
        image = spec["containers"][0]["image"]
        ref, _, config, _ = archive(f"{images}/hapair-{component}-{version}.tar")
        assert image == ref, f"the chart's {kind} runs {image}, the build made {ref}"
    # The operator pod runs as the image's user (runAsNonRoot needs a numeric one).
    _, _, config, _ = archive(f"{images}/hapair-operator-{version}.tar")
    sc = pods["Deployment"]["securityContext"]
    assert config["config"]["User"] == f"{sc['runAsUser']}:{sc['runAsGroup']}", f"image user {config['config']['User']}, chart {sc}"

def cmd_labels(inspect_json, config_json, component, version, revision, epoch, profile):
    """skopeo inspect's labels, and the config's user, entrypoint, command and ports."""
    inspect = json.load(open(inspect_json))
    config = json.load(open(config_json))["config"]
    labels = inspect["Labels"]
    created = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    want = {
        "org.opencontainers.image.title": f"hapair-{component}",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.source": "https://github.com/hapair/hapair",
        "org.opencontainers.image.licenses": "Apache-2.0",
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.created": created,
        "dev.hapair.build.profile": profile,
        "dev.hapair.sbom": "/usr/share/doc/hapair/sbom.spdx.json",
    }
    for key, value in want.items():
        assert labels.get(key) == value, f"label {key} is {labels.get(key)!r}, want {value!r}"
    if profile == "debug":
        assert "DEBUG BUILD" in labels["org.opencontainers.image.description"], "description does not say debug"
    assert inspect["Created"] == created, f"Created {inspect['Created']}"
    user = config.get("User", "")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) != 0 and int(gid) != 0, f"user {user!r} is not a numeric non-root UID:GID"
    assert config["Entrypoint"] == [f"/usr/bin/hapair-{component}"], f"entrypoint {config.get('Entrypoint')}"
    if component == "operator":
        assert not config.get("Cmd"), f"operator Cmd {config.get('Cmd')}"
        ports = {"8443/tcp", "9090/tcp"}
    else:
        assert config.get("Cmd") == ["run", "--config", "/etc/hapair/agent.yaml"], f"agent Cmd {config.get('Cmd')}"
        ports = {"9464/tcp"}
    assert set(config.get("ExposedPorts", {})) == ports, f"ports {config.get('ExposedPorts')}"
    assert inspect["Architecture"] == subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    assert inspect["Os"] == "linux"

def cmd_layer(path, component, binary):
    """The layer holds exactly the binary, its libraries and loader, the copyright files of
    their packages, /etc/{passwd,group,nsswitch.conf}, /tmp and the SBOM; root-owned, sane modes."""
    _, _, _, layer = archive(path)
    members = {m.name.lstrip("./").rstrip("/"): m for m in layer.getmembers() if m.name.strip("./")}
    libs = host_libs(binary)
    want_files = {f"usr/bin/hapair-{component}", "etc/passwd", "etc/group", "etc/nsswitch.conf",
                  "usr/share/doc/hapair/sbom.spdx.json"}
    want_files |= {lib.lstrip("/") for lib in libs}
    want_files |= {f"usr/share/doc/{deb_of(lib)[0]}/copyright" for lib in libs}
    files = {n for n, m in members.items() if not m.isdir()}
    assert files == want_files, f"extra: {sorted(files - want_files)}, missing: {sorted(want_files - files)}"
    dirs = {n for n, m in members.items() if m.isdir()}
    want_dirs = {"tmp"} | {os.path.dirname(f) for f in want_files}
    for d in list(want_dirs):
        while d:
            want_dirs.add(d)
            d = os.path.dirname(d)
    assert dirs == want_dirs, f"directories: extra {sorted(dirs - want_dirs)}, missing {sorted(want_dirs - dirs)}"
    for name, m in members.items():
        assert m.uid == 0 and m.gid == 0, f"{name} owned by {m.uid}:{m.gid}"
        assert not m.mode & 0o6000, f"{name} is setuid/setgid"
        assert m.isdir() or m.isfile(), f"{name} is neither a file nor a directory"
        assert not m.mode & 0o002 or name == "tmp", f"{name} is world-writable"
    assert members["tmp"].mode & 0o7777 == 0o1777, f"/tmp mode {oct(members['tmp'].mode)}"
    bin_member = members[f"usr/bin/hapair-{component}"]
    assert bin_member.mode & 0o777 == 0o755, f"binary mode {oct(bin_member.mode)}"
    assert sha256(layer.extractfile(bin_member).read()) == sha256(open(binary, "rb").read()), "binary differs from the one built"
    for lib in libs:
        assert sha256(layer.extractfile(members[lib.lstrip("/")]).read()) == sha256(open(lib, "rb").read()), f"{lib} differs from this host's"
    passwd = layer.extractfile(members["etc/passwd"]).read().decode()
    assert re.search(r"^hapair:x:65532:65532:", passwd, re.M), f"/etc/passwd: {passwd}"

def cmd_sbom(path, component, binary, beside, version):
    """The SBOM in the image equals the one beside the archive and is right about every file:
    SPDX 2.3, the binary with its checksum, each library's Debian package and version."""
    _, _, _, layer = archive(path)
    inside = layer.extractfile("usr/share/doc/hapair/sbom.spdx.json").read()
    assert inside == open(beside, "rb").read(), "SBOM in the image differs from the one beside it"
    doc = json.loads(inside)
    assert doc["spdxVersion"] == "SPDX-2.3" and doc["dataLicense"] == "CC0-1.0" and doc["SPDXID"] == "SPDXRef-DOCUMENT"
    assert doc["documentNamespace"].startswith("https://") and doc["creationInfo"]["creators"]
    packages = {p["name"]: p for p in doc["packages"]}
    app = packages[f"hapair-{component}"]
    assert app["versionInfo"] == version and app["licenseDeclared"] == "Apache-2.0"
    assert {"algorithm": "SHA256", "checksumValue": sha256(open(binary, "rb").read())} in app["checksums"], "binary checksum"
    for lib in host_libs(binary):
        pkg, ver = deb_of(lib)
        assert pkg in packages, f"SBOM lacks {pkg} (provides {lib})"
        assert packages[pkg]["versionInfo"] == ver, f"{pkg}: SBOM says {packages[pkg]['versionInfo']}, dpkg {ver}"
        assert any(r["referenceType"] == "purl" and r["referenceLocator"].startswith(f"pkg:deb/debian/{pkg}@")
                   for r in packages[pkg]["externalRefs"]), f"{pkg} has no purl"
    ids = {p["SPDXID"] for p in doc["packages"]} | {f["SPDXID"] for f in doc["files"]} | {"SPDXRef-DOCUMENT"}
    for r in doc["relationships"]:
        assert r["spdxElementId"] in ids and r["relatedSpdxElement"] in ids, f"dangling relationship {r}"
    members = {m.name.lstrip("./"): m for m in layer.getmembers()}
    listed = set()
    for f in doc["files"]:
        name = f["fileName"].lstrip("./")
        listed.add(name)
        sums = {c["algorithm"]: c["checksumValue"] for c in f["checksums"]}
        data = layer.extractfile(members[name]).read()
        assert sums["SHA256"] == sha256(data) and sums["SHA1"] == hashlib.sha1(data).hexdigest(), f"checksum of {name}"
    every = {n for n, m in members.items() if m.isfile()} - {"usr/share/doc/hapair/sbom.spdx.json"}
    assert listed == every, f"SBOM files {sorted(listed ^ every)} differ from the layer"

def cmd_digest_same(a, b):
    x, y = (json.load(open(p))["Digest"] for p in (a, b))
    assert x == y, f"{x} != {y}"

def cmd_tls_healthz(port, ca):
    import ssl, urllib.request
    ctx = ssl.create_default_context(cafile=ca)
    body = urllib.request.urlopen(f"https://localhost:{port}/healthz", context=ctx, timeout=5).read()
    assert body.strip() == b"ok", body

def cmd_agent_unenrolled(port):
    import time, urllib.request
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            assert urllib.request.urlopen(base + "/healthz", timeout=2).status == 200
            status = json.load(urllib.request.urlopen(base + "/v1/status", timeout=2))
            if "not enrolled" in (status.get("configError") or ""):
                return
        except Exception as e:
            status = e
        if time.monotonic() > deadline:
            raise AssertionError(f"no 'not enrolled' status: {status}")
        time.sleep(0.2)

if __name__ == "__main__":
    try:
        globals()["cmd_" + sys.argv[1].replace("-", "_")](*sys.argv[2:])
    except AssertionError as e:
        sys.exit(f"  {e}")
EOF
py() {
    PYTHONDONTWRITEBYTECODE=1 python3 "$scratch/checks.py" "$@"
}

echo "==> build-image.sh refuses bad arguments"
expect_error() {
    local what="$1" needle="$2"
    shift 2
    local out rc=0
    out="$(timeout 60 bash scripts/build-image.sh "$@" 2>&1)" || rc=$?
    if [ "$rc" -ne 0 ] && grep -qF -- "$needle" <<<"$out"; then
        echo "ok: $what"
    else
        fail "$what (exit $rc): $out"
    fi
}
expect_error "unknown option is refused" "unknown argument: --bogus" --bogus
expect_error "missing binaries directory is named" "no binaries directory $scratch/nope" --bin-dir "$scratch/nope"
mkdir "$scratch/bins"
expect_error "a directory not called debug or release needs --profile" "pass --profile debug or --profile release" --bin-dir "$scratch/bins"
expect_error "a missing binary is named" "no hapair-operator binary at $scratch/bins/hapair-operator" --bin-dir "$scratch/bins" --profile release --output "$scratch/unused"
expect_error "--image takes only operator or agent" "--image must be operator or agent" --image web
expect_error "--push needs a value" "--push needs a value" --push

echo "==> building the images from target/debug"
start=$SECONDS
# The binaries directory through the environment (the flag is tested above).
if ! SOURCE_DATE_EPOCH="$epoch" HAPAIR_IMAGE_BIN_DIR=target/debug timeout 180 \
    bash scripts/build-image.sh --output "$images"; then
    fail "scripts/build-image.sh --bin-dir target/debug"
    echo "==> image test: $failures failure(s)" >&2
    exit 1
fi
echo "figure: build-image.sh (debug, both images): $((SECONDS - start))s"

echo "==> names, labels, configuration (skopeo inspect)"
check "the archives name the chart's default images (repository:appVersion)" py names "$images" "$version"
check "helm install's defaults run exactly these images, as the image's user" py rendered "$images" "$version"
for component in operator agent; do
    archive="$images/hapair-$component-$version.tar"
    inspected=true
    timeout 60 skopeo inspect "oci-archive:$archive" >"$scratch/$component.inspect.json" &&
        timeout 60 skopeo inspect --config "oci-archive:$archive" >"$scratch/$component.config.json" ||
        inspected=false
    check "skopeo inspect reads the $component archive" $inspected
    check "$component: OCI labels (debug build), non-root user, entrypoint, ports" \
        py labels "$scratch/$component.inspect.json" "$scratch/$component.config.json" "$component" "$version" "$revision" "$epoch" debug
    check "$component: the layer holds exactly the binary, the libraries ldd names and the loader" \
        py layer "$archive" "$component" "target/debug/hapair-$component"
    check "$component: SBOM in the image and beside it, right about every file and package" \
        py sbom "$archive" "$component" "target/debug/hapair-$component" "$images/hapair-$component-$version.spdx.json" "$version"
done

echo "==> reproducible build, pushed to a registry on loopback (--push)"
registry_port="$(free_port)"
mkdir -p "$scratch/registry"
cat >"$scratch/registry/config.yml" <<EOF
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $scratch/registry/data
http:
  addr: 127.0.0.1:$registry_port
EOF
docker-registry serve "$scratch/registry/config.yml" >"$scratch/registry/log" 2>&1 &
registry_pid=$!
registry_up() {
    local _
    for _ in $(seq 100); do
        python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$registry_port/v2/', timeout=1)" 2>/dev/null && return 0
        sleep 0.1
    done
    cat "$scratch/registry/log" >&2
    return 1
}
check "registry up on 127.0.0.1:$registry_port" registry_up
pushed=true
SOURCE_DATE_EPOCH="$epoch" HAPAIR_PUSH_FLAGS="--dest-tls-verify=false" timeout 120 \
    bash scripts/build-image.sh --bin-dir target/debug --image agent --output "$scratch/again" \
    --push "127.0.0.1:$registry_port/hapair" >"$scratch/push.log" 2>&1 || {
    pushed=false
    cat "$scratch/push.log" >&2
}
check "build-image.sh --push copies the image to the registry" $pushed
timeout 60 skopeo inspect "oci-archive:$scratch/again/hapair-agent-$version.tar" >"$scratch/again.inspect.json" || true
check "the same SOURCE_DATE_EPOCH gives the same image digest" py digest-same "$scratch/agent.inspect.json" "$scratch/again.inspect.json"
timeout 60 skopeo inspect --tls-verify=false "docker://127.0.0.1:$registry_port/hapair/hapair-agent:$version" >"$scratch/pushed.inspect.json" || true
check "the registry serves it under the chart's name and tag, with the same digest" py digest-same "$scratch/agent.inspect.json" "$scratch/pushed.inspect.json"
kill "$registry_pid" 2>/dev/null || true
wait "$registry_pid" 2>/dev/null || true
registry_pid=""

echo "==> the images run (podman, runc, private vfs store)"
mkdir -p "$scratch/podman"
loaded() {
    local component ref
    for component in operator agent; do
        timeout 120 "${podman_cmd[@]}" load --quiet --input "$images/hapair-$component-$version.tar" >/dev/null || return 1
    done
    "${podman_cmd[@]}" images --format '{{.Repository}}:{{.Tag}}' >"$scratch/loaded"
    for ref in "ghcr.io/hapair/hapair-operator:$version" "ghcr.io/hapair/hapair-agent:$version"; do
        grep -qxF "$ref" "$scratch/loaded" || {
            echo "  podman load gave: $(tr '\n' ' ' <"$scratch/loaded")" >&2
            return 1
        }
    done
}
check "podman load names both images as the chart does" loaded
"${podman_cmd[@]}" images --format 'figure: {{.Repository}}:{{.Tag}} {{.Size}} unpacked' 2>/dev/null || true
for component in operator agent; do
    echo "figure: hapair-$component-$version.tar $(du -h "$images/hapair-$component-$version.tar" | cut -f1) (oci-archive, gzip layer)"
done
operator_image="ghcr.io/hapair/hapair-operator:$version"
agent_image="ghcr.io/hapair/hapair-agent:$version"

runs_with() {
    local needle="$1" out rc=0
    shift
    out="$(timeout 60 "${podman_cmd[@]}" run --rm "${run_flags[@]}" "$@" 2>&1)" || rc=$?
    [ "$rc" -eq 0 ] && grep -qF -- "$needle" <<<"$out" || {
        echo "  exit $rc: $out" >&2
        return 1
    }
}
check "operator image: --help (read-only, no capabilities, no network)" \
    runs_with "Run the controller on a directory of manifests" "${locked[@]}" --network none "$operator_image" --help
check "operator image: --version is $version" \
    runs_with "hapair-operator $version" "${locked[@]}" --network none "$operator_image" --version
check "operator image: plan reads the example manifests" \
    runs_with "HaGroup default/web" "${locked[@]}" --network none -v "$PWD/examples:/manifests:ro" "$operator_image" plan --manifests /manifests

echo "==> a standalone controller from the operator image"
port="$(free_port)"
mkdir -p "$scratch/manifests" "$scratch/state"
cp examples/minimal-pair.yaml "$scratch/manifests/"
# The image's user owns the state directory, as a volume's fsGroup/chown would arrange.
chown 65532:65532 "$scratch/state"
controller="hapair-image-test-$$-controller"
started=true
timeout 60 "${podman_cmd[@]}" run --detach --name "$controller" "${run_flags[@]}" "${locked[@]}" --network host \
    -v "$scratch/manifests:/manifests:ro" -v "$scratch/state:/state" \
    "$operator_image" standalone --manifests /manifests --state /state \
    --listen "127.0.0.1:$port" --server-name localhost >/dev/null || started=false
check "controller container started" $started
serving() {
    local _
    for _ in $(seq 150); do
        "${podman_cmd[@]}" logs "$controller" 2>&1 | grep -q "standalone controller serving listen=127.0.0.1:$port" && return 0
        sleep 0.2
    done
    "${podman_cmd[@]}" logs "$controller" >&2 2>&1 || true
    return 1
}
check "log says 'standalone controller serving' on 127.0.0.1:$port" serving
check "https://localhost:$port/healthz answers ok with the CA from the state directory" py tls-healthz "$port" "$scratch/state/ca.crt"
check "state files written by the image's user (65532)" \
    eval '[ "$(stat -c %u:%g "$scratch/state/ca.key" "$scratch/state/hapair-admin.json" | sort -u)" = 65532:65532 ]'
cli_status() {
    local out rc=0
    out="$(HAPAIR_CONFIG="$scratch/state/hapair-admin.json" timeout 30 target/debug/kubectl-hapair status 2>&1)" || rc=$?
    [ "$rc" -eq 0 ] && grep -q "web" <<<"$out" || {
        echo "  exit $rc: $out" >&2
        return 1
    }
}
check "the CLI reaches it over mutual TLS and lists the example group" cli_status
stopped_cleanly() {
    timeout 60 "${podman_cmd[@]}" stop --time 15 "$controller" >/dev/null || return 1
    local code
    code="$("${podman_cmd[@]}" inspect --format '{{.State.ExitCode}}' "$controller")"
    [ "$code" = 0 ] && "${podman_cmd[@]}" logs "$controller" 2>&1 | grep -q "shutting down" || {
        echo "  exit code $code" >&2
        return 1
    }
}
check "SIGTERM stops it cleanly (exit 0, 'shutting down')" stopped_cleanly
check "controller container removed" eval 'timeout 60 "${podman_cmd[@]}" rm --force "$controller" >/dev/null'
check "nothing listens on $port any more" \
    python3 -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', $port)) == 0)"

echo "==> the agent image"
check "agent image: --help" runs_with "enroll        Enroll this node with a controller" "${locked[@]}" --network none "$agent_image" --help
check "agent image: --version is $version" runs_with "hapair-agent $version" "${locked[@]}" --network none "$agent_image" --version
# As the chart's DaemonSet runs it: UID 0, NET_ADMIN and NET_RAW only, host network,
# read-only root, the host directories mounted; its default command (run --config
# /etc/hapair/agent.yaml). Not enrolled: it must stay up and say so.
agent_port="$(free_port)"
mkdir -p "$scratch/agent/etc" "$scratch/agent/state" "$scratch/agent/run"
sed -e "s#^  listen: .*#  listen: 127.0.0.1:$agent_port#" packaging/agent.yaml >"$scratch/agent/etc/agent.yaml"
agent="hapair-image-test-$$-agent"
started=true
timeout 60 "${podman_cmd[@]}" run --detach --name "$agent" "${run_flags[@]}" --network host --user 0:0 \
    --read-only --cap-drop all --cap-add NET_ADMIN,NET_RAW --security-opt no-new-privileges \
    -v "$scratch/agent/etc:/etc/hapair" -v "$scratch/agent/state:/var/lib/hapair" -v "$scratch/agent/run:/run/hapair" \
    "$agent_image" >/dev/null || started=false
check "agent container started with the image's default command" $started
check "unenrolled agent serves /healthz and reports 'not enrolled'" py agent-unenrolled "$agent_port"
stop_agent() {
    timeout 60 "${podman_cmd[@]}" stop --time 15 "$agent" >/dev/null &&
        timeout 60 "${podman_cmd[@]}" rm --force "$agent" >/dev/null
}
check "agent container stopped and removed" stop_agent
check "no container left in the private store" eval '[ -z "$("${podman_cmd[@]}" ps --all --quiet)" ]'

if [ "$failures" -ne 0 ]; then
    echo "==> image test: $failures failure(s)" >&2
    exit 1
fi
echo "==> image test passed"
